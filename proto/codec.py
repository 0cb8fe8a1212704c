"""Tensors on the wire: numpy arrays <-> `aet.v1.Tensor` (raw little-endian bytes, C order).

Shared by the server and the clients. Decoding is zero-copy (a read-only view of the message
bytes); a `TensorCodecError` names the field, the expected and the received value.
"""

from __future__ import annotations

import math

import numpy as np

from aet.proto import embedding_pb2

DataType = embedding_pb2.DataType
WIRE_DTYPES: dict[np.dtype, embedding_pb2.DataType] = {
    np.dtype("<f4"): embedding_pb2.FLOAT32,
    np.dtype("u1"): embedding_pb2.UINT8,
    np.dtype("<f2"): embedding_pb2.FLOAT16,
}
NUMPY_DTYPES: dict[int, np.dtype] = {wire: dtype for dtype, wire in WIRE_DTYPES.items()}


class TensorCodecError(ValueError):
    """A tensor's dtype, shape or byte length is not what its declaration says."""


def dtype_name(wire_dtype: int) -> str:
    """`FLOAT32`, `UINT8`, ... for a `DataType` value (the number itself if unknown)."""
    try:
        return DataType.Name(wire_dtype)
    except ValueError:
        return str(wire_dtype)


def numpy_dtype(wire_dtype: int, field: str = "dtype") -> np.dtype:
    """The little-endian numpy dtype of a `DataType` value."""
    try:
        return NUMPY_DTYPES[wire_dtype]
    except KeyError:
        expected = ", ".join(dtype_name(d) for d in NUMPY_DTYPES)
        raise TensorCodecError(
            f"{field}: expected one of {expected}, got {dtype_name(wire_dtype)}"
        ) from None


def encode_tensor(array: np.ndarray) -> embedding_pb2.Tensor:
    """An `aet.v1.Tensor` holding `array` (float32, uint8 or float16) as little-endian bytes."""
    tensor = embedding_pb2.Tensor()
    fill_tensor(tensor, array)
    return tensor


def fill_tensor(tensor: embedding_pb2.Tensor, array: np.ndarray) -> None:
    """Write `array` into an empty `tensor` in place, e.g. a response's own field (no copy of
    a separately built message)."""
    array = np.asarray(array)
    # A little-endian (native) dtype is found directly; only big-endian arrays pay the lookup.
    wire_dtype = WIRE_DTYPES.get(array.dtype)
    if wire_dtype is None:
        wire_dtype = WIRE_DTYPES.get(array.dtype.newbyteorder("<"))
    if wire_dtype is None:
        expected = ", ".join(str(d) for d in NUMPY_DTYPES.values())
        raise TensorCodecError(f"array dtype: expected one of {expected}, got {array.dtype}")
    little = array.astype(NUMPY_DTYPES[wire_dtype], order="C", copy=False)
    tensor.dtype = wire_dtype
    tensor.shape.extend(little.shape)
    tensor.data = little.tobytes()


def decode_tensor(tensor: embedding_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """A read-only numpy view of `tensor`; `field` names it in errors (e.g. "inputs")."""
    return decode_raw(tensor.data, tensor.shape, numpy_dtype(tensor.dtype, f"{field}.dtype"), field)


def decode_raw(data: bytes, shape, dtype: np.dtype, field: str = "tensor") -> np.ndarray:
    """A read-only view of `data` as `shape` of `dtype`, checking dimensions and byte length.

    Usable for any raw-bytes tensor protocol (e.g. KServe's `raw_input_contents`).
    """
    dims = tuple(shape)
    if not dims or min(dims) < 0:
        raise TensorCodecError(
            f"{field}.shape: expected at least one dimension, none negative, got {list(dims)}"
        )
    expected = math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise TensorCodecError(
            f"{field}.data: expected {expected} bytes for shape {list(dims)} of {dtype.name}, "
            f"got {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=dtype).reshape(dims)
