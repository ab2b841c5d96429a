"""The two files of an ONNX artifact: ``model.onnx`` (the graph) and ``weights.bin`` (every initializer
of at least :data:`EXTERNAL_MIN_BYTES` as external data, each on a 64-byte boundary). The export
writes them, int8 quantization rewrites them, tests and benchmarks read them back.

Also the reader of a model's ``.safetensors`` as its bytes stream in (:class:`TensorStream`): each
tensor in memory of its own, handed over as soon as it is complete, so that the export can write
it into ``weights.bin`` and drop it before the next one arrives.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import IntegrityError

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
_ALIGN = 64  # every tensor in weights.bin starts on a cache line (and an AVX-512 register)
# Smaller tensors (shape constants, scales, zero points) stay in the graph: ONNX Runtime's shape
# inference must read them before the external data is attached.
EXTERNAL_MIN_BYTES = 1024


class WeightsWriter:
    """Lays tensors out in one ``weights.bin`` buffer, each on a 64-byte boundary.

    The buffer grows by appending: a large ``bytearray`` grows in place (``mremap``), while
    ``bytearray(size)`` would write zeros over the whole final size up front, committing it
    all before the source weights are released.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()

    def put(self, data: np.ndarray) -> tuple[int, int]:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self.buffer += bytes(_aligned(len(self.buffer)) - len(self.buffer))
        offset = len(self.buffer)
        self.buffer += memoryview(raw)  # type: ignore[arg-type]  # numpy arrays are buffers
        return offset, raw.nbytes


# Where the bytes of a laid-out ``weights.bin`` go instead of a buffer: ``place(k, data, pad)``
# receives the k-th tensor of the layout (in any order, possibly again after a restart) and the
# number of zero bytes that follow it before the next one.
Place = Callable[[int, memoryview, int], object]


class WeightsLayout:
    """``weights.bin`` laid out before its bytes arrive: each tensor at a 64-byte boundary, in the
    order given (the order the graph's nodes first read them, so that a part of the graph can be
    loaded as soon as its bytes have arrived: ``shared.engine.onnx_parts``), written as each
    arrives, in any order: into ``buffer``, or, with ``place``, handed on (the refresh stages each
    tensor as a block of the artifact's blob, so the build never holds the whole file).
    """

    def __init__(self, sizes: list[tuple[str, int]], place: Place | None = None) -> None:
        self.offsets: dict[str, int] = {}
        self.index: dict[str, int] = {}
        end = 0
        for k, (name, size) in enumerate(sizes):
            start = _aligned(end)
            self.offsets[name], self.index[name] = start, k
            end = start + size
        self.sizes = dict(sizes)
        self.size = end
        self._place = place
        self.buffer = bytearray(end) if place is None else bytearray()

    def put(self, name: str, data: np.ndarray) -> tuple[int, int]:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if raw.nbytes != self.sizes[name]:
            raise ValueError(f"{name}: {raw.nbytes} bytes where {self.sizes[name]} were laid out")
        offset = self.offsets[name]
        if self._place is not None:
            self._place(self.index[name], memoryview(raw), self._padding_after(name))  # type: ignore[arg-type]
        else:
            self.buffer[offset : offset + raw.nbytes] = memoryview(raw)  # type: ignore[arg-type]  # numpy arrays are buffers
        return offset, raw.nbytes

    def _padding_after(self, name: str) -> int:
        end = self.offsets[name] + self.sizes[name]
        return _aligned(end) - end if end < self.size else 0


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def initializer_views(graph: Any, weights: bytes | bytearray) -> dict[str, np.ndarray]:
    """Every initializer of ``graph`` (an ``onnx.ModelProto``): numpy views into ``weights`` (no copy)
    for external ones, small arrays for those stored in the graph."""
    from onnx import helper, numpy_helper

    views = {}
    for tensor in graph.graph.initializer:
        if tensor.data_location != tensor.EXTERNAL:
            views[tensor.name] = numpy_helper.to_array(tensor)
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        offset, length = int(entries["offset"]), int(entries["length"])
        views[tensor.name] = np.frombuffer(weights, dtype=dtype, count=length // dtype.itemsize, offset=offset).reshape(tuple(tensor.dims))
    return views


# --- safetensors, as the bytes stream in ---------------------------------------------------------

# safetensors dtype -> numpy dtype of the stored bytes (BF16 as its raw 16 bits, widened by to_float32)
_SAFETENSORS_NUMPY: dict[str, np.dtype[Any]] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors header: its dtype code, shape and byte range in the data section."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def header_length(first8: bytes) -> int:
    """The length of the JSON header announced by a safetensors file's first 8 bytes.

    Raises:
        IntegrityError: fewer than 8 bytes, or an implausible length.
    """
    if len(first8) < 8:
        raise IntegrityError("too short to be a safetensors file")
    (length,) = struct.unpack("<Q", first8[:8])
    if length > _MAX_HEADER:
        raise IntegrityError(f"a safetensors header of {length} bytes")
    return int(length)


def parse_header(header: bytes, *, name: str) -> list[StoredTensor]:
    """The tensors a safetensors JSON header lists, by offset.

    Raises:
        IntegrityError: not JSON, an unknown dtype, or a byte range that does not fit the shape.
    """
    try:
        entries = json.loads(header)
        tensors = []
        for key, meta in entries.items():
            if key == "__metadata__":
                continue
            dtype = str(meta["dtype"])
            shape = tuple(int(x) for x in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
            count = int(np.prod(shape, dtype=np.int64))
            if dtype not in _SAFETENSORS_NUMPY or begin < 0 or end - begin != count * _SAFETENSORS_NUMPY[dtype].itemsize:
                raise ValueError(f"{key}: dtype {dtype} or byte range [{begin}, {end}) does not fit shape {list(shape)}")
            tensors.append(StoredTensor(key, dtype, shape, begin, end))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise IntegrityError(f"{name} is not a readable safetensors file ({err})") from None
    return sorted(tensors, key=lambda t: t.begin)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A floating tensor in float32, as the model is loaded (``bfloat16`` widened bit-exactly)."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F64"):
        return array.astype(np.float32)
    return array


class TensorStream:
    """A sink for one ``.safetensors`` file's bytes, in order (``ModelStore.stream_file``, a file's
    blocks): ``on_tensor(key, array)`` receives each tensor as soon as its last byte arrived, in
    memory of its own that the receiver may keep or drop; no whole-file buffer exists.

    ``header``: the header read beforehand (the export needs the tensor list before the weights);
    the streamed one must be the same bytes. :meth:`restart` starts over (the file changed while
    it was read); the sha256 check of the whole file is the caller's (the store's).

    Raises (from the sink):
        IntegrityError: the header differs from ``header`` or is malformed.
    """

    def __init__(self, name: str, on_tensor: Callable[[str, np.ndarray], None], *, header: bytes | None = None) -> None:
        self.name = name
        self.on_tensor = on_tensor
        self.expected = header
        self.restart()

    def restart(self) -> None:
        self._head = bytearray()
        self._length: int | None = None
        self._tensors: list[StoredTensor] = []
        self._index = 0
        self._current: np.ndarray | None = None
        self._offset = 0  # bytes of the data section seen so far
        self.delivered: list[str] = []

    def __call__(self, chunk: memoryview) -> None:
        data = memoryview(chunk).cast("B")
        if self._length is None or len(self._head) < 8 + self._length:
            data = self._take_header(data)
        while data.nbytes and self._index < len(self._tensors):
            data = self._take_data(data)
        self._offset += data.nbytes  # bytes past the last tensor (padding): counted, not kept

    def _take_header(self, data: memoryview) -> memoryview:
        if self._length is None:
            need = 8 - len(self._head)
            self._head += data[:need]
            data = data[need:]
            if len(self._head) < 8:
                return data
            self._length = header_length(bytes(self._head))
        need = 8 + self._length - len(self._head)
        self._head += data[:need]
        data = data[need:]
        if len(self._head) == 8 + self._length:
            header = bytes(self._head[8:])
            if self.expected is not None and header != self.expected:
                raise IntegrityError(f"{self.name}: the header changed since it was first read")
            self._tensors = parse_header(header, name=self.name)
        return data

    def _take_data(self, data: memoryview) -> memoryview:
        tensor = self._tensors[self._index]
        if self._offset < tensor.begin:  # a gap before this tensor
            skip = min(tensor.begin - self._offset, data.nbytes)
            self._offset += skip
            return data[skip:]
        if self._current is None:
            self._current = np.empty(tensor.end - tensor.begin, dtype=np.uint8)
        at = self._offset - tensor.begin
        take = min(tensor.end - self._offset, data.nbytes)
        self._current[at : at + take] = data[:take]
        self._offset += take
        if self._offset == tensor.end:
            array = self._current.view(_SAFETENSORS_NUMPY[tensor.dtype]).reshape(tensor.shape)
            self._current = None
            self._index += 1
            self.delivered.append(tensor.key)
            self.on_tensor(tensor.key, to_float32(array, tensor.dtype) if tensor.dtype in ("BF16", "F16", "F64") else array)
        return data[take:]

    def check_complete(self) -> None:
        """Raise :class:`IntegrityError` if the bytes ended before the last tensor."""
        if self._length is None or len(self._head) < 8 + self._length:
            raise IntegrityError(f"{self.name} ends inside its safetensors header")
        if self._index < len(self._tensors):
            raise IntegrityError(f"{self.name} ends before its last tensor")
