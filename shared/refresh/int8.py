"""The ``int8`` artifact: the fp32 graph quantized one initializer at a time, with no temporary file.

The weights of the chosen MatMuls become symmetric int8 (per channel by default); their
activations are quantized with STATIC scales calibrated on ``calibration.json`` (text written for
this project), so an item's answer never depends on what else is in its batch. Calibration runs
the fp32 artifact itself in ONNX Runtime (its weights shared with the buffer they are in, no
copy), with a ReduceMin and a ReduceMax added on every activation a MatMul reads: only those
scalars leave the session.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import mmap
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IntegrityError
from ..memory import release_pages
from .onnx_weights import EXTERNAL_MIN_BYTES, WEIGHTS_FILE, WeightsWriter, initializer_views

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
_MIN_QUANTIZED_COLUMNS = 16  # the span head (2 columns) stays fp32: it is tiny and decides the answer


@dataclass(frozen=True)
class Int8Recipe:
    """How the ``int8`` artifact is made from the fp32 graph.

    Attributes:
        name: recorded in the artifact's record.
        per_channel: one weight scale per output column (else one per matrix).
        ffn_output_fp32: keep the feed-forward output projections (the MatMuls whose input is
            wider than their output, after the activation function) in fp32; their inputs have
            the outliers that a static 8-bit scale loses most on.
        reduce_range: 7-bit weights, for CPUs without VNNI whose u8 x s8 instructions can
            saturate.
    """

    name: str
    per_channel: bool = True
    ffn_output_fp32: bool = True
    reduce_range: bool = False


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Int8Recipe("per-channel, FFN output fp32, static"),
        Int8Recipe("per-channel, all int8, static", ffn_output_fp32=False),
        Int8Recipe("per-tensor, FFN output fp32, static", per_channel=False),
        Int8Recipe("per-channel, FFN output fp32, static, reduce_range", reduce_range=True),
        # for CPUs without VNNI: ONNX Runtime's AVX2 u8 x s8 kernel (vpmaddubsw) adds two
        # products in int16 and saturates past 32,767, which 8-bit weights reach (2 x 255 x 127)
        # and 7-bit ones cannot (2 x 255 x 63); seen under qemu -cpu Haswell (docs/benchmarks.md, int8 on AVX2)
        Int8Recipe("per-channel, all int8, static, reduce_range", ffn_output_fp32=False, reduce_range=True),
    )
}
# Chosen by bench/quality.py and bench/onnx_build_load.py (docs/benchmarks.md, "int8 recipes"): on all
# 5,609 SQuAD part-B questions it loses 0.74 F1 against fp32 (95% interval 0.20-1.27) with 84.7% of
# answers identical, 0.16 F1 less than the same recipe with 8-bit weights, and its 7-bit weights
# keep every pair of products within int16, so AVX2-only CPUs compute the exact sums VNNI ones do
# (tests/unit/test_onnx.py checks the bound). bert-large's int8 artifact keeps its size (431 MB,
# about 0.6 GiB served). Keeping the FFN outputs in fp32 loses less (0.34 F1) but its 733 MB of
# weights serve in just over 1 GiB.
DEFAULT_RECIPE = "per-channel, all int8, static, reduce_range"


def _quantizable(graph: Any, recipe: Int8Recipe | None) -> dict[int, Any]:
    """The MatMul nodes (by position) whose weight is a 2-D initializer the recipe quantizes."""
    shapes = {t.name: tuple(t.dims) for t in graph.graph.initializer}
    chosen = {}
    for index, node in enumerate(graph.graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        shape = shapes.get(node.input[1])
        if shape is None or len(shape) != 2 or shape[1] < _MIN_QUANTIZED_COLUMNS:
            continue
        if recipe is not None and recipe.ffn_output_fp32 and shape[0] > shape[1]:
            continue  # feed-forward output projection (wide in, narrow out)
        chosen[index] = node
    return chosen


def calibration_items() -> list[Any]:
    """The project's calibration questions (plus a few over all contexts joined: several windows)."""
    from ..engine.question_answering import QAItem

    doc = json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))
    items = [QAItem(question=p["question"], context=p["context"]) for p in doc["pairs"]]
    joined = " ".join(dict.fromkeys(p["context"] for p in doc["pairs"]))
    items += [QAItem(question=q, context=joined) for q in doc["long_questions"]]
    return items


def activation_inputs(graph: Any) -> list[str]:
    """The activations (first inputs) of every MatMul over a 2-D initializer, once each, in graph
    order: what any recipe may quantize."""
    shapes = {t.name: len(t.dims) for t in graph.graph.initializer}
    found = []
    for node in graph.graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and shapes.get(node.input[1]) == 2 and node.input[0] not in found:
            found.append(node.input[0])
    return found


def calibrate(graph: bytes, weights: Any, spec: Any, facts: Mapping[str, Any]) -> tuple[dict[str, tuple[float, float]], int]:
    """Min/max of every MatMul activation over the calibration windows, in ONNX Runtime.

    Args:
        graph, weights: the fp32 artifact (``weights`` a writable buffer: the session reads it in place).
        spec: the tokenizer; ``facts``: the fp32 record (window geometry, input names).

    The windows are those the serving engine makes (same tokenizer, geometry and code), run one
    at a time so that no padding enters the ranges.

    Returns:
        ({activation name: (min, max)}, number of windows seen)
    """
    import onnx

    from ..engine.onnx_runner import (
        WeightsFileNeeded,
        copied_session,
        session_options,
        shrinking_run_options,
        weights_shared_session,
        with_outputs,
    )

    targets = activation_inputs(onnx.load_from_string(graph))
    calibration_graph, outputs = with_outputs(graph, targets)
    try:
        session, holds = weights_shared_session(weights, calibration_graph, session_options(threads=None), "fp32 artifact (calibration)")
    except WeightsFileNeeded:
        session, holds = copied_session(weights, calibration_graph, session_options(threads=None), "fp32 artifact (calibration)"), ()
    run_options = shrinking_run_options()  # each window's activations handed back, as serving does
    ranges: dict[str, tuple[float, float]] = {}
    windows = calibration_windows(spec, facts)
    for window in windows:
        _widen(ranges, targets, dict(zip(outputs, session.run(outputs, window, run_options), strict=True)))
    del holds
    return ranges, len(windows)


def _widen(ranges: dict[str, tuple[float, float]], targets: Sequence[str], found: Mapping[str, Any]) -> None:
    """Widen each target's (min, max) by one window's ``calibration_min_*`` / ``calibration_max_*``."""
    for name in targets:
        low, high = float(found[f"calibration_min_{name}"]), float(found[f"calibration_max_{name}"])
        old = ranges.get(name, (low, high))
        ranges[name] = (min(old[0], low), max(old[1], high))


def calibration_windows(spec: Any, facts: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    """The windows the serving engine makes of the calibration text (same tokenizer, geometry and
    code as :func:`calibrate`), one feed of one window each, in the order :func:`calibrate` runs them."""
    from ..engine.onnx_runner import OnnxRunner
    from ..engine.question_answering import Limits, QAEngine

    windows: list[dict[str, np.ndarray]] = []

    class Recorder(OnnxRunner):  # keeps each window and answers nothing (the answers are not used)
        def __call__(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            windows.append({name: np.array(value) for name, value in inputs.items()})
            shape = next(iter(inputs.values())).shape
            return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    input_names = tuple(str(n) for n in facts["input_names"])
    engine = QAEngine(
        Recorder(None, input_names),
        spec,
        limits=Limits(max_windows=1000, max_items=1000),
        batch_windows=1,
        max_seq_len=int(facts["max_seq_len"]),
        doc_stride=int(facts["doc_stride"]),
    )
    for item in calibration_items():
        engine.answer([item])
    return windows


def calibrate_by_parts(
    graph: bytes, parts: Any, size: int, stream: Callable[[Any], None], spec: Any, facts: Mapping[str, Any]
) -> tuple[dict[str, tuple[float, float]], int]:
    """:func:`calibrate` with the graph run one part at a time while its ``weights.bin`` (``size``
    bytes) streams in once (:class:`~shared.engine.onnx_runner.PartwiseRun`): the build holds a
    part of the weights, not all of them. Each part computes what its nodes compute in the whole
    graph, so the ranges are those of :func:`calibrate`.

    ``stream(sink)`` feeds the sink every byte in order and raises if they do not verify.
    """
    import onnx

    from ..engine.onnx_runner import PartwiseRun, session_options, with_outputs

    targets = activation_inputs(onnx.load_from_string(graph))
    graphs, extra = zip(*(with_outputs(part.graph, targets) for part in parts), strict=True)
    windows = calibration_windows(spec, facts)
    run = PartwiseRun(
        parts, size, lambda: session_options(threads=None), "fp32 artifact (calibration)", windows, graphs=graphs, extra_outputs=extra
    )
    stream(run)
    ranges: dict[str, tuple[float, float]] = {}
    for result in run.finish_run():
        _widen(ranges, targets, result)
    return ranges, len(windows)


def calibration_facts(windows: int) -> dict[str, Any]:
    raw = CALIBRATION_FILE.read_bytes()
    doc = json.loads(raw)
    return {
        "file": CALIBRATION_FILE.name,
        "version": doc["version"],
        "sha256": hashlib.sha256(raw).hexdigest(),
        "windows": windows,
        "run_by": "onnxruntime, fp32 artifact",
    }


# --- int8: quantization ------------------------------------------------------------------------


def quantize(
    graph: bytes,
    weights: Any,
    ranges: Mapping[str, tuple[float, float]],
    recipe: Int8Recipe,
    *,
    release: bool = False,
    streamed: StreamedWeights | None = None,
) -> tuple[bytes, bytearray, int]:
    """The int8 graph and weights: chosen MatMuls become ``MatMulIntegerToFloat`` over int8 weights.

    Each activation is quantized once (``QuantizeLinear``, uint8, its calibrated fixed scale and
    zero point) and shared by the MatMuls that read it. The new ``weights.bin`` is written in the
    order of the fp32 one, one tensor at a time; with ``release`` (``weights`` a writable buffer
    that nothing reads afterwards) the pages of the fp32 weights already rewritten are handed back
    to the system as it goes, so the peak is about the fp32 weights, not them plus the int8 ones.
    With ``streamed`` (``weights`` is its buffer, still arriving) each fp32 tensor is read once its
    bytes have arrived and its pages are handed back right after: the peak is the int8 weights
    and the stream's window.

    Returns:
        (graph, weights, number of MatMuls quantized)
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load_from_string(graph)
    views = initializer_views(proto, weights)
    weight_limit = 63 if recipe.reduce_range else 127
    # new initializers: (name, numpy dtype, shape, how to compute it): int8 matrices are made
    # one at a time while being written, never all at once
    new_tensors: list[tuple[str, np.dtype[Any], tuple[int, ...], Callable[[], np.ndarray], int]] = []
    offsets = _external_offsets(proto)  # where each fp32 initializer lies in weights.bin (-1: in the graph)
    plans: dict[int, tuple[Any, Any]] = {}
    weights_planned: set[str] = set()
    for position, node in _quantizable(proto, recipe).items():
        activation, weight = node.input[0], node.input[1]
        if activation not in ranges:
            continue  # never reached by calibration (an unused branch): leave it fp32
        a_base, w_base = _safe(activation), f"{_safe(weight)}_int8"
        if not any(name == f"{a_base}_scale" for name, *_ in new_tensors):
            low, high = min(ranges[activation][0], 0.0), max(ranges[activation][1], 0.0)
            a_scale = np.array(max(high - low, 1e-8) / 255.0, dtype=np.float32)
            a_zero = np.array(np.clip(round(-low / float(a_scale)), 0, 255), dtype=np.uint8)
            new_tensors.append((f"{a_base}_scale", a_scale.dtype, (), partial(_same, a_scale), -1))
            new_tensors.append((f"{a_base}_zero_point", a_zero.dtype, (), partial(_same, a_zero), -1))
        if w_base not in weights_planned:
            # a weight shared by several MatMuls (ALBERT's layers, DeBERTa's shared attention key)
            # is quantized once: a second initializer of the same name was left without its bytes
            weights_planned.add(w_base)
            source = views[weight]
            at = offsets.get(weight, -1)
            # the scales are computed when the weight is written (its bytes may still be arriving)
            scale = functools.cache(partial(_weight_scales, source, recipe.per_channel, weight_limit))
            shape = (source.shape[-1],) if recipe.per_channel else ()
            new_tensors.append((w_base, np.dtype(np.int8), source.shape, partial(_int8_of, source, scale, weight_limit), at))
            new_tensors.append((f"{w_base}_scale", np.dtype(np.float32), shape, scale, at))
            new_tensors.append((f"{w_base}_zero_point", np.dtype(np.int8), shape, partial(np.zeros, shape, np.int8), at))
        quantize_node = helper.make_node(
            "QuantizeLinear", [activation, f"{a_base}_scale", f"{a_base}_zero_point"], [f"{a_base}_quantized"], name=f"{a_base}_quantize"
        )
        matmul = helper.make_node(
            "MatMulIntegerToFloat",
            [f"{a_base}_quantized", w_base, f"{a_base}_scale", f"{w_base}_scale", f"{a_base}_zero_point", f"{w_base}_zero_point"],
            list(node.output),
            name=f"{node.name or f'{w_base}_{position}'}_int8",
            domain="com.microsoft",
        )
        plans[position] = (quantize_node, matmul)

    # each activation is quantized once, just before the first MatMul that reads it
    nodes, emitted = [], set()
    for position, node in enumerate(proto.graph.node):
        plan = plans.get(position)
        if plan is None:
            nodes.append(node)
            continue
        quantize_node, matmul = plan
        if quantize_node.output[0] not in emitted:
            emitted.add(quantize_node.output[0])
            nodes.append(quantize_node)
        nodes.append(matmul)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)

    # weights: the initializers still used and the new ones, into a fresh buffer in the order of
    # the fp32 bytes they come from (new tensors of no fp32 source first); each fp32 range is
    # released once nothing after it reads it
    used = {name for node in nodes for name in node.input}
    entries: list[tuple[str, np.dtype[Any], tuple[int, ...], Callable[[], np.ndarray], int]] = [
        (t.name, np.dtype(views[t.name].dtype), tuple(views[t.name].shape), partial(_same, views[t.name]), offsets.get(t.name, -1))
        for t in proto.graph.initializer
        if t.name in used
    ]
    entries += new_tensors
    entries.sort(key=lambda entry: entry[4])  # stable: the graph's order within one source
    ends = {offsets[name]: offsets[name] + view.nbytes for name, view in views.items() if offsets.get(name, -1) >= 0}
    del views
    writer = WeightsWriter()
    initializers = []
    for index, (name, dtype, dims, make, origin) in enumerate(entries):
        if streamed is not None:
            streamed.wait(ends.get(origin, 0))
        array = make()
        if int(np.prod(dims, dtype=np.int64)) * dtype.itemsize < EXTERNAL_MIN_BYTES:
            initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype).reshape(dims), name))
            continue
        offset, length = writer.put(array)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=list(dims))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        initializers.append(tensor)
        del array
        if release and index + 1 < len(entries) and entries[index + 1][4] > 0:
            # every source before the next one is done
            streamed.release(entries[index + 1][4]) if streamed is not None else release_pages(weights, 0, entries[index + 1][4])
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(initializers)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto.SerializeToString(), writer.buffer, len(plans)


def _external_offsets(graph: Any) -> dict[str, int]:
    offsets = {}
    for tensor in graph.graph.initializer:
        if tensor.data_location == tensor.EXTERNAL:
            offsets[tensor.name] = int({e.key: e.value for e in tensor.external_data}.get("offset", "0"))
    return offsets


def _same(array: np.ndarray) -> np.ndarray:
    return array


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def _weight_scales(weight: np.ndarray, per_channel: bool, limit: int) -> np.ndarray:
    """Symmetric scales of a (K, N) weight: one per output column, or one for the matrix."""
    absmax = np.abs(weight).max(axis=0) if per_channel else np.array(np.abs(weight).max())
    return (np.where(absmax > 0, absmax, 1.0) / limit).astype(np.float32)


def _int8_weights(weight: np.ndarray, scale: np.ndarray, limit: int) -> np.ndarray:
    return np.clip(np.rint(weight / scale), -limit, limit).astype(np.int8)


def _int8_of(weight: np.ndarray, scale: Callable[[], np.ndarray], limit: int) -> np.ndarray:
    return _int8_weights(weight, scale(), limit)


class StreamedWeights:
    """An fp32 ``weights.bin`` arriving on a thread of its own (``stream(sink)``, as
    ``ModelStore.stream_file`` feeds a sink) into a private mapping, which :func:`quantize` reads
    in order while it arrives: :meth:`wait` until a tensor's bytes are in, :meth:`release` the
    pages behind it. The stream runs at most ``window`` bytes ahead of what was released, so the
    build never holds the whole file.
    """

    def __init__(self, size: int, stream: Callable[[Any], None], *, window: int) -> None:
        self.size, self.window = size, window
        self.buffer = mmap.mmap(-1, max(1, size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._arrived = self._released = 0
        self._done = self._stopped = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), name="fp32-weights", daemon=True)
        self._thread.start()

    def __call__(self, chunk: memoryview) -> None:
        data = memoryview(chunk).cast("B")
        with self._changed:
            while self._arrived - self._released > self.window and not self._stopped:
                self._changed.wait()
            if self._stopped:
                raise _Stopped
            at = self._arrived
        if at + len(data) > self.size:
            raise IntegrityError("weights.bin of the fp32 artifact is larger than recorded")
        self.buffer[at : at + len(data)] = data
        with self._changed:
            self._arrived += len(data)
            self._changed.notify_all()

    def restart(self) -> None:
        raise IntegrityError("weights.bin of the fp32 artifact was rewritten while the int8 build read it; the next build starts over")

    def _run(self, stream: Callable[[Any], None]) -> None:
        try:
            stream(self)
        except _Stopped:
            pass
        except Exception as err:  # noqa: BLE001 - handed to the reader: wait() and finish() raise it
            self._error = err
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def wait(self, end: int) -> None:
        """Return once the first ``end`` bytes have arrived.

        Raises:
            the stream's error, or IntegrityError: it ended before ``end`` bytes.
        """
        with self._changed:
            while self._arrived < end and not self._done:
                self._changed.wait()
            arrived = self._arrived
        if arrived < end:
            raise self._error or IntegrityError(f"weights.bin of the fp32 artifact ended after {arrived} of {self.size} bytes")

    def release(self, upto: int) -> None:
        """Hand back the pages before ``upto`` (nothing reads them again)."""
        if upto > self._released:
            release_pages(self.buffer, self._released, min(upto, self._arrived))
            with self._changed:
                self._released = max(self._released, min(upto, self._arrived))
                self._changed.notify_all()

    def finish(self) -> None:
        """Wait for the stream's end (its sha256 verified).

        Raises:
            the stream's error, or IntegrityError: it ended early.
        """
        self.wait(self.size)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop the stream (the build failed) and free the mapping."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self._thread.join()
        with contextlib.suppress(BufferError):  # views of a failed build still in a traceback: freed with them
            self.buffer.close()


class _Stopped(Exception):
    """The reader stopped the stream."""
