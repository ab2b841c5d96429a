"""The two files of an ONNX artifact: ``model.onnx`` (the graph) and ``weights.bin`` (every initializer
of at least :data:`EXTERNAL_MIN_BYTES` as external data, each on a 64-byte boundary). The export
writes them, int8 quantization rewrites them, tests and benchmarks read them back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
