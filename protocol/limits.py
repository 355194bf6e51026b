"""What decoding one message may cost: structural limits, and the scan that enforces them.

``msgpack.unpackb`` allocates a Python object for every msgpack object it reads, and an empty
array is one byte on the wire but a 56-byte list (plus a pointer in its parent) in memory: a
16 MiB message of nested or repeated empty arrays becomes more than 1 GiB of objects, and
seconds of work on the event loop, before any field is checked. A byte limit alone therefore
bounds nothing useful. :func:`check_structure` walks the msgpack *type bytes* of a message
before msgpack builds anything, and refuses it as soon as it crosses

* ``max_depth``  -- containers nested inside one another (a map of scalars is depth 1, a map
  holding a list of scalars depth 2; a lone scalar is depth 0);
* ``max_items``  -- msgpack objects in the whole message, every one counted: the top-level
  value, each container, each scalar, each map key;
* ``max_container_len`` -- elements of one array, or entries of one map;
* ``max_str_len`` -- bytes of one string (a ``bin`` is bounded by the message size only: it is
  one copy, whatever its length);

and refuses ext types (no enclaveq message uses them), the never-used byte 0xC1, truncated
messages and trailing bytes.

Why this bounds both CPU and memory:

* the scan reads one header per object and jumps over ``str``/``bin`` payloads by their
  declared length, so it stops after at most ``max_items`` steps, whatever the message size;
  a container declaring more children than the items left is refused at its header, so a
  declared length of 2**32 costs one step;
* it allocates nothing per object: a counter, and a stack of "children left" counts that is
  at most ``max_depth`` deep;
* msgpack runs only on a message that passed, so it builds at most ``max_items`` objects whose
  payloads together are at most the message's size (one copy of each ``str``/``bin``);
  it is also given the per-container limits, in case the scan and msgpack ever disagree.

So refusing a message costs O(max_items) steps and O(max_depth) memory; accepting it costs
O(max_items) objects plus one copy of its bytes. Each parser passes limits that fit its exact
shape (protocol.codec's ``unpack_map`` defaults fit every clear-text control message).
"""

from __future__ import annotations

from .errors import MalformedMessage, OversizedMessage

# Defaults of protocol.codec.unpack_map: every clear-text message on the network is a map whose
# values are scalars or one level of small containers (a statement map, the 4-element chunk
# position of a request header) with at most ~33 objects in all (EpochAnnounce). A control
# message needing more passes its own, explicit limits (e.g. ModelSyncRequest's "have" list).
CLEAR_MAX_DEPTH = 2
CLEAR_MAX_ITEMS = 64
# The longest clear string is a ControlError message: 2048 characters, up to 4 UTF-8 bytes each.
CLEAR_MAX_STR_LEN = 8192

# Defaults of protocol.codec.unpack (content that is sealed, or read back from sealed state):
# bounded, but loose enough for a sync end marker of 2 x 512 signed records or a long list of
# delete orders. Parsers of attacker-reachable bodies pass tighter limits of their own.
CONTENT_MAX_DEPTH = 8
CONTENT_MAX_ITEMS = 65536


def check_structure(data: bytes | bytearray, *, max_depth: int, max_items: int,
                    max_container_len: int, max_str_len: int, what: str) -> None:
    """Raise ``OversizedMessage`` if ``data`` is one msgpack value beyond the limits, and
    ``MalformedMessage`` if it is not exactly one msgpack value (truncated, trailing bytes,
    an ext type or the reserved byte). Allocates nothing per object; see the module docstring."""
    # This runs on every job header, so the loop is written for speed: a fixed-size object
    # (most of them) costs one table lookup, and objects are counted when a container
    # declares them rather than one by one (the total is 1 + the sum of declared children).
    end = len(data)
    pos = 0
    items = 1
    todo = 1        # objects still to read in the innermost open container (or at the top)
    outer: list[int] = []  # the same count for each enclosing container; len(outer) is the depth
    fixed = _FIXED_SIZE
    widths = _LENGTH_WIDTH
    try:
        while True:
            while todo:
                b = data[pos]
                todo -= 1
                step = fixed[b]
                if step:
                    pos += step
                    continue
                width = widths[b]
                if width:                                   # bin 8/16/32, str 8/16/32
                    if width == 1:
                        size = data[pos + 1]
                    elif width == 2:
                        size = data[pos + 1] << 8 | data[pos + 2]
                    else:
                        size = int.from_bytes(data[pos + 1:pos + 5], "big")
                    if b >= 0xD9 and size > max_str_len:
                        raise OversizedMessage(f"{what}: a string of {size} bytes exceeds {max_str_len}")
                    pos += 1 + width + size
                    continue
                if b <= 0x9F:                               # fixmap 0x80-0x8F, fixarray 0x90-0x9F
                    count = b & 0x0F
                    pos += 1
                    children = count * 2 if b <= 0x8F else count
                elif b >= 0xDC:                             # array 16/32, map 16/32
                    width = 2 if b in (0xDC, 0xDE) else 4
                    count = int.from_bytes(data[pos + 1:pos + 1 + width], "big")
                    pos += 1 + width
                    children = count if b <= 0xDD else count * 2
                else:                                       # 0xC1 (never used), ext 8/16/32, fixext 1-16
                    raise MalformedMessage(f"{what}: unsupported msgpack type 0x{b:02x}")
                if len(outer) >= max_depth:                 # an empty container is still a level
                    raise OversizedMessage(f"{what}: containers nested deeper than {max_depth}")
                if count > max_container_len:
                    raise OversizedMessage(f"{what}: a container of {count} elements exceeds {max_container_len}")
                items += children
                if items > max_items:                       # refused at the header, before reading a child
                    raise OversizedMessage(f"{what}: more than {max_items} msgpack objects")
                if children:
                    outer.append(todo)
                    todo = children
            if not outer:
                break
            todo = outer.pop()
    except IndexError:  # data[pos] past the end: a container or string longer than what is left
        raise MalformedMessage(f"{what}: truncated msgpack") from None
    if pos != end:
        raise MalformedMessage(f"{what}: truncated msgpack" if pos > end else f"{what}: trailing bytes after the message")


def _fixed_size(b: int) -> int:
    """Total size of the object starting with byte ``b`` if that byte alone says it, else 0."""
    if b <= 0x7F or b >= 0xE0:          # positive / negative fixint
        return 1
    if 0xA0 <= b <= 0xBF:               # fixstr: the byte holds the length
        return 1 + (b & 0x1F)
    return {
        0xC0: 1, 0xC2: 1, 0xC3: 1,            # nil, false, true
        0xCA: 5, 0xCB: 9,                     # float 32/64
        0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,   # uint 8/16/32/64
        0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9,   # int 8/16/32/64
    }.get(b, 0)


# Header byte -> size of a fixed-size object, 0 for strings, bins, containers and the refused types.
_FIXED_SIZE = tuple(_fixed_size(b) for b in range(256))
# Header byte -> width of the length field of a bin or (non-fix) str, 0 for every other type.
_LENGTH_WIDTH = tuple({0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}.get(b, 0) for b in range(256))
