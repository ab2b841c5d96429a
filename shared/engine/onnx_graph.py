"""The external initializers of an ONNX graph (``model.onnx``), read straight from its protobuf bytes.

Serving hands ONNX Runtime each weight as a view into the downloaded ``weights.bin`` and needs to
know where each one lies; the ``onnx`` package would parse the graph too, but it is a build-time
dependency that serving does not import (nor torch, nor transformers). Only the fields that locate
a tensor are read (ModelProto.graph, GraphProto.initializer, and a TensorProto's dims, data type,
name, external data and data location); everything else is skipped by its wire type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import IntegrityError

# TensorProto.DataType -> numpy dtype, for the types an artifact's external data can hold
_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int8),
    4: np.dtype(np.uint16),
    5: np.dtype(np.int16),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    9: np.dtype(np.bool_),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
    12: np.dtype(np.uint32),
    13: np.dtype(np.uint64),
}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class ExternalTensor:
    """Where one initializer's bytes lie: ``length`` bytes at ``offset`` of the file ``location``."""

    name: str
    dtype: np.dtype[Any]
    dims: tuple[int, ...]
    location: str
    offset: int
    length: int

    def view(self, weights: np.ndarray) -> np.ndarray:
        """The tensor as a view into ``weights`` (the whole file as a ``uint8`` array), no copy.

        Raises:
            IntegrityError: the bytes do not fit the file or the tensor's shape and type.
        """
        count = int(np.prod(self.dims, dtype=np.int64))
        if self.offset < 0 or self.offset + self.length > weights.size or count * self.dtype.itemsize != self.length:
            raise IntegrityError(f"initializer {self.name!r} does not fit weights.bin (offset {self.offset}, length {self.length})")
        if self.offset % self.dtype.itemsize:
            raise IntegrityError(f"initializer {self.name!r} is not aligned to its type in weights.bin")
        return weights[self.offset : self.offset + self.length].view(self.dtype).reshape(self.dims)


def external_initializers(model: bytes | bytearray | memoryview) -> list[ExternalTensor]:
    """Every initializer of the main graph whose data is external, in the graph's order.

    Raises:
        IntegrityError: the bytes are not a well-formed ModelProto, or an external initializer
            lacks its location, offset or length, or has a data type serving does not know.
    """
    data = memoryview(model).cast("B")
    try:
        found = []
        for field, value in _fields(data):
            if field == 7 and isinstance(value, memoryview):  # ModelProto.graph
                for graph_field, tensor in _fields(value):
                    if graph_field == 5 and isinstance(tensor, memoryview):  # GraphProto.initializer
                        parsed = _tensor(tensor)
                        if parsed is not None:
                            found.append(parsed)
        return found
    except (IndexError, ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(f"model.onnx is not a well-formed ONNX graph ({err})") from None


def _tensor(data: memoryview) -> ExternalTensor | None:
    dims: list[int] = []
    data_type, name, location = 0, "", 0
    entries: dict[str, str] = {}
    for field, value in _fields(data):
        if field == 1:  # dims: packed or one varint each
            dims.extend(_packed_varints(value) if isinstance(value, memoryview) else [int(value)])
        elif field == 2 and isinstance(value, int):
            data_type = value
        elif field == 8 and isinstance(value, memoryview):
            name = bytes(value).decode("utf-8")
        elif field == 13 and isinstance(value, memoryview):  # external_data: StringStringEntryProto
            pair = {f: bytes(v).decode("utf-8") for f, v in _fields(value) if isinstance(v, memoryview)}
            entries[pair.get(1, "")] = pair.get(2, "")
        elif field == 14 and isinstance(value, int):
            location = value
    if location != _EXTERNAL:
        return None
    if data_type not in _DTYPES:
        raise IntegrityError(f"initializer {name!r} has data type {data_type}, which serving does not read")
    try:
        return ExternalTensor(
            name=name,
            dtype=_DTYPES[data_type],
            dims=tuple(dims),
            location=entries["location"],
            offset=int(entries.get("offset", "0")),
            length=int(entries["length"]),
        )
    except (KeyError, ValueError) as err:
        raise IntegrityError(f"initializer {name!r} has incomplete external data ({err})") from None


def _fields(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of a protobuf message: ints for varint and fixed fields, views for
    length-delimited ones."""
    at, end = 0, len(data)
    while at < end:
        key, at = _varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
            yield field, value
        elif wire == 1:
            yield field, int.from_bytes(data[at : at + 8], "little")
            at += 8
        elif wire == 2:
            size, at = _varint(data, at)
            if at + size > end:
                raise ValueError("a field runs past the end of its message")
            yield field, data[at : at + size]
            at += size
        elif wire == 5:
            yield field, int.from_bytes(data[at : at + 4], "little")
            at += 4
        else:
            raise ValueError(f"wire type {wire} is not used by ONNX")
    if at != end:
        raise ValueError("the last field runs past the end of its message")


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("a varint is longer than 10 bytes")


def _packed_varints(data: memoryview) -> list[int]:
    values, at = [], 0
    while at < len(data):
        value, at = _varint(data, at)
        values.append(value - (1 << 64) if value >= 1 << 63 else value)
    return values
