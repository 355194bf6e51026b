"""Strict msgpack encoding and decoding shared by every message type.

One place decides how bytes become Python values, so that every parser in the package refuses
the same things the same way: non-msgpack bytes, trailing garbage, maps with non-string keys,
and anything larger than the caller's limits -- in bytes, and in structure (depth, number of
objects, container and string lengths; see :mod:`protocol.limits`), checked before msgpack
allocates anything.
"""

from __future__ import annotations

from typing import Any, Literal, overload
from collections.abc import Mapping

import msgpack

from .errors import MalformedMessage, OversizedMessage, UnsupportedVersion
from .limits import CLEAR_MAX_DEPTH, CLEAR_MAX_ITEMS, CLEAR_MAX_STR_LEN, CONTENT_MAX_DEPTH, CONTENT_MAX_ITEMS, check_structure

PROTOCOL_VERSION = 1

# Upper bound for a whole message unless the caller passes its own. RabbitMQ 3.10 accepts
# 128 MiB, 4.x only 16 MiB by default; models and large tensors are chunked below this.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def pack(value: Any) -> bytes:
    """Canonical encoding: msgpack, binary type for bytes, UTF-8 strings."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, what: str = "message",
           max_depth: int = CONTENT_MAX_DEPTH, max_items: int = CONTENT_MAX_ITEMS,
           max_container_len: int | None = None, max_str_len: int | None = None) -> Any:
    """Decode one msgpack value, refusing it *before* anything is built if it is larger than
    ``max_bytes`` or beyond the structural limits (see :mod:`protocol.limits`, which says why
    that bounds CPU and memory). ``max_container_len`` defaults to ``max_items`` and
    ``max_str_len`` to ``max_bytes``. The defaults suit sealed content; every parser of bytes
    an attacker can write passes limits that fit its own message."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedMessage(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise OversizedMessage(f"{what}: {len(data)} bytes exceeds the limit of {max_bytes}")
    container_len = max_items if max_container_len is None else max_container_len
    str_len = max_bytes if max_str_len is None else max_str_len
    check_structure(data, max_depth=max_depth, max_items=max_items, max_container_len=container_len,
                    max_str_len=str_len, what=what)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            # Already enforced by check_structure; repeated so msgpack refuses too if they ever disagree.
            max_str_len=str_len,
            max_bin_len=max_bytes,
            max_array_len=container_len,
            max_map_len=container_len,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise MalformedMessage(f"{what}: trailing bytes after the message") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        # e.g. a map key that is not a string, or a string that is not UTF-8.
        raise MalformedMessage(f"{what}: not valid msgpack ({type(exc).__name__})") from None


def unpack_map(data: bytes, *, kind: str | None, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
               max_depth: int = CLEAR_MAX_DEPTH, max_items: int = CLEAR_MAX_ITEMS,
               max_container_len: int | None = None, max_str_len: int | None = CLEAR_MAX_STR_LEN,
               what: str | None = None) -> dict[str, Any]:
    """Decode a versioned message map and check its version and (optionally) its type tag.

    The structural defaults fit every clear-text message (see :mod:`protocol.limits`): a
    message with a longer list or a deeper shape must pass its own, explicit limits."""
    what = what or kind or "message"
    value = unpack(data, max_bytes=max_bytes, what=what, max_depth=max_depth, max_items=max_items,
                   max_container_len=max_container_len, max_str_len=max_str_len)
    if not isinstance(value, dict):
        raise MalformedMessage(f"{what}: expected a map")
    version = value.get("v")
    if version != PROTOCOL_VERSION:
        if isinstance(version, int) and not isinstance(version, bool):
            raise UnsupportedVersion(f"{what}: protocol version {version} is not supported (speaks {PROTOCOL_VERSION})")
        raise MalformedMessage(f"{what}: missing or invalid protocol version")
    if kind is not None and value.get("t") != kind:
        raise MalformedMessage(f"{what}: wrong message type {value.get('t')!r}")
    return value


def field(m: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, what: str, optional: bool = False) -> Any:
    """Fetch a typed field; bool is never accepted where an int is expected."""
    if name not in m or m[name] is None:
        if optional:
            return None
        raise MalformedMessage(f"{what}: missing field {name!r}")
    value = m[name]
    if isinstance(value, bool) and kind in (int, (int,)):
        raise MalformedMessage(f"{what}: field {name!r} must be an integer")
    if not isinstance(value, kind):
        raise MalformedMessage(f"{what}: field {name!r} has the wrong type")
    return value


def fixed_bytes(m: Mapping[str, Any], name: str, size: int, *, what: str) -> bytes:
    value: bytes = field(m, name, bytes, what=what)
    if len(value) != size:
        raise MalformedMessage(f"{what}: field {name!r} must be {size} bytes, got {len(value)}")
    return value


@overload
def bounded_str(m: Mapping[str, Any], name: str, *, what: str, max_len: int = 256,
                optional: Literal[False] = False) -> str: ...
@overload
def bounded_str(m: Mapping[str, Any], name: str, *, what: str, max_len: int = 256,
                optional: bool) -> str | None: ...
def bounded_str(m: Mapping[str, Any], name: str, *, what: str, max_len: int = 256, optional: bool = False) -> str | None:
    value: str | None = field(m, name, str, what=what, optional=optional)
    if value is not None and len(value) > max_len:
        raise MalformedMessage(f"{what}: field {name!r} longer than {max_len} characters")
    return value
