"""Named tensors on the wire: dtype name, shape, C-order little-endian bytes.

Every numeric dtype onnxruntime runs is supported; the dtype travels by *name* (never a numpy
``str(dtype)`` with a byte-order prefix) so both ends agree regardless of platform. Strings
(ONNX ``tensor(string)``: raw text into a tokenizer graph, labels out of a classifier) travel as
dtype ``string`` with a list of UTF-8 strings in place of the bytes; numpy holds them as an
object array of ``str``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import MalformedMessage, OversizedMessage, TensorError

# Wire name -> little-endian numpy dtype.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<") if np.dtype(name).itemsize > 1 else np.dtype(name)
    for name in (
        "bool", "float16", "float32", "float64",
        "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64",
    )
}

# ONNX Runtime's type strings ("tensor(float)") -> wire names; used to check inputs early.
ONNX_TYPES: dict[str, str] = {
    "tensor(bool)": "bool", "tensor(float16)": "float16", "tensor(float)": "float32",
    "tensor(double)": "float64", "tensor(int8)": "int8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64",
    "tensor(string)": "string",
}
STRING = "string"

MAX_RANK = 32
MAX_TENSORS = 256
MAX_NAME_LEN = 256


@dataclass(frozen=True)
class TensorLimits:
    max_tensor_bytes: int = 32 * 1024 * 1024
    max_total_bytes: int = 64 * 1024 * 1024


def dtype_name(array: np.ndarray) -> str:
    dtype = array.dtype
    known = _WIRE_NAMES.get(dtype)  # numpy's dtype.name is slow enough to show in a profile
    if known is not None:
        return known
    if dtype.kind == "U" or (dtype.kind == "O" and all(isinstance(v, str) for v in array.flat)):
        return STRING
    kind = dtype.newbyteorder("=") if dtype.byteorder not in "|=" else dtype
    name = np.dtype(kind).name
    if name not in DTYPES:
        raise TensorError(f"dtype {array.dtype} is not supported; supported: {', '.join(DTYPES)}, string")
    return name


# The native-order numeric dtypes and their wire names (strings and objects are decided per array).
_WIRE_NAMES: dict[np.dtype, str] = {np.dtype(name): name for name in DTYPES}


def misfit(expected: Mapping[str, tuple[str | None, Sequence[object] | None]], tensors: Mapping[str, Any], *,
           subject: str = "the model") -> str | None:
    """Why ``tensors`` cannot be the inputs ``expected`` describes, or None when they fit.
    ``expected``: each input's wire dtype (None: a type enclaveq cannot carry) and shape (None:
    not known; a dimension that is not an int is free). One rule, kept in one place, for the
    worker before ONNX Runtime sees a job's inputs and for a publisher before it seals an event
    (the pool lists a pipeline's event inputs); ``subject`` names whose inputs these are."""
    if tensors.keys() != expected.keys():
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        return f"{subject} expects inputs {sorted(expected)}; missing {missing}, unexpected {extra}"
    for name, value in tensors.items():
        want, shape = expected[name]
        if want is None:
            return f"input {name!r} has a type enclaveq cannot carry"
        array = np.asarray(value)
        got = STRING if array.dtype.kind in "OU" else array.dtype.name  # decoded strings are objects
        if got != want:
            return f"input {name!r} must be {want}, got {got}"
        if shape is not None and (len(shape) != array.ndim or any(
                isinstance(d, int) and d != n for d, n in zip(shape, array.shape))):
            shown = ", ".join(str(d) if isinstance(d, int) else "?" for d in shape)
            return f"input {name!r} must have shape [{shown}], got {list(array.shape)}"
    return None


def encode_tensors(tensors: Mapping[str, Any]) -> list[list[Any]]:
    """numpy arrays (or anything np.asarray accepts) -> wire list. Inputs are never modified."""
    if len(tensors) > MAX_TENSORS:
        raise TensorError(f"{len(tensors)} tensors exceed the limit of {MAX_TENSORS}")
    wire = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise TensorError(f"tensor names must be non-empty strings of at most {MAX_NAME_LEN} characters")
        array = np.asarray(value)
        dname = dtype_name(array)
        if dname == STRING:
            wire.append([name, dname, list(array.shape), [str(v) for v in array.flat]])
            continue
        le = array.astype(DTYPES[dname], order="C", copy=False)  # ascontiguousarray would make 0-d arrays 1-d
        wire.append([name, dname, list(le.shape), le.tobytes()])
    return wire


def decode_tensors(wire: Any, limits: TensorLimits = TensorLimits()) -> dict[str, np.ndarray]:
    """Wire list -> name: read-only ndarray views (no copy). Every inconsistency is a typed error."""
    if not isinstance(wire, list):
        raise MalformedMessage("tensors: expected a list")
    if len(wire) > MAX_TENSORS:
        raise TensorError(f"{len(wire)} tensors exceed the limit of {MAX_TENSORS}")
    out: dict[str, np.ndarray] = {}
    total = 0
    for item in wire:
        if not (isinstance(item, list) and len(item) == 4):
            raise MalformedMessage("tensor: expected [name, dtype, shape, data]")
        name, dname, shape, data = item
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise MalformedMessage("tensor: invalid name")
        if name in out:
            raise TensorError(f"tensor {name!r} appears twice")
        if not isinstance(dname, str) or (dname not in DTYPES and dname != STRING):  # a list is not hashable
            raise TensorError(f"tensor {name!r}: dtype {str(dname)[:32]!r} is not supported")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape
        ):
            raise TensorError(f"tensor {name!r}: shape must be at most {MAX_RANK} non-negative integers")
        if dname == STRING:
            total += _string_bytes(name, shape, data, limits)
            if total > limits.max_total_bytes:
                raise OversizedMessage(f"tensors exceed the total limit of {limits.max_total_bytes} bytes")
            strings = np.empty(len(data), dtype=object)
            strings[:] = data
            out[name] = strings.reshape(shape)
            continue
        if not isinstance(data, bytes):
            raise MalformedMessage(f"tensor {name!r}: data must be bytes")
        if len(data) > limits.max_tensor_bytes:
            raise OversizedMessage(f"tensor {name!r}: {len(data)} bytes exceed the limit of {limits.max_tensor_bytes}")
        total += len(data)
        if total > limits.max_total_bytes:
            raise OversizedMessage(f"tensors exceed the total limit of {limits.max_total_bytes} bytes")
        dtype = DTYPES[dname]
        count = 1
        for d in shape:
            count *= d
        if count * dtype.itemsize != len(data):
            raise TensorError(f"tensor {name!r}: shape {shape} of {dname} needs {count * dtype.itemsize} bytes, got {len(data)}")
        try:
            array = np.frombuffer(data, dtype=dtype).reshape(shape)
        except ValueError:  # e.g. a zero-size tensor whose dimensions numpy cannot index
            raise TensorError(f"tensor {name!r}: numpy cannot hold a tensor of shape {shape}") from None
        # Native byte order for onnxruntime on big-endian hosts; a no-op on little-endian ones.
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        out[name] = array
    return out


def _string_bytes(name: str, shape: list[int], data: Any, limits: TensorLimits) -> int:
    """Check a string tensor's data (a list of str, one per element) and return its UTF-8 size."""
    if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
        raise MalformedMessage(f"tensor {name!r}: string data must be a list of strings")
    count = 1
    for d in shape:
        count *= d
    if count != len(data):
        raise TensorError(f"tensor {name!r}: shape {shape} of string needs {count} strings, got {len(data)}")
    size = sum(len(v.encode("utf-8", "surrogatepass")) for v in data)
    if size > limits.max_tensor_bytes:
        raise OversizedMessage(f"tensor {name!r}: {size} bytes exceed the limit of {limits.max_tensor_bytes}")
    return size
