"""Serve an ONNX artifact (see :mod:`shared.refresh.onnx_export`) with ONNX Runtime, without torch or transformers.

The session is built from the verified in-memory download, one of two ways:

- **repacked** (``prepack=True``, where memory allows): ``weights.bin`` is handed to ONNX Runtime
  as the contents of the external-data file; it copies each initializer out of it, repacks the
  matrices for its kernels, and the download buffer is then released. Fastest, but the load holds
  the weights twice (bert-large fp32: 2,742 MiB at its peak).
- **shared** (``prepack=False``): each initializer is handed over as a view into the download
  buffer (``SessionOptions.add_initializer``), which ONNX Runtime uses as it is: no copy, no
  repacking, the buffer *is* the session's weights for its whole life (bert-large fp32: about
  1,370 MiB at the peak of the load and after it). Repacking is off because ONNX Runtime would
  keep the packed copy beside the shared buffer; the matrix products then pack their weight
  blocks as they go (measured 4-10% more CPU per run for bert-large fp32).

Each run's activations can be bounded (``memory_mb``): a run whose estimate exceeds what is left
after the load is split into runs of fewer windows, which gives the same logits row for row.
The tokenizer comes from ``tokenizer.json`` through ``tokenizers`` alone, with the special-token
ids and input names recorded when the artifact was built. Windowing and span decoding are those
of :class:`~shared.engine.question_answering.QAEngine`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IntegrityError, UnsafeModelError
from ..memory import large_blocks_mapped, release_free_heap, release_pages, resident_bytes
from .batching import AUTO, BatchWindows
from .onnx_graph import ExternalTensor, external_initializers
from .onnx_parts import GraphPart, split_graph, still_needed
from .question_answering import Limits, QAEngine, TokenizerSpec

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
SUPPORTED_FORMAT = 1
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


# Activation bytes of one token of a run, for a model of hidden size H and a run of width W
# tokens: 72 H + 0.3125 H W. Measured on bert-large fp32 (H 1024, ONNX Runtime 1.32, 2 threads):
# a 384-token window adds 62-68 MiB at the peak of its run (the estimate: 75.5 MB), 8 windows of
# 160 tokens 134-147 MiB (estimate: 149 MB); the W term is the attention's scores (heads x W per
# token, H / 64 heads, a few live at once), the rest the feed-forward and projections.
_BYTES_PER_TOKEN_H = 72
_BYTES_PER_TOKEN_HW = 0.3125
# What the process may still grow by besides a run: tokenizer, request and answer objects, threads,
# and what the heap and the arena keep once the first runs are done (bert-large fp32 served part by
# part under QA_MEMORY_MB=1776: 1,424-1,444 MiB resident after the load, about 120 MiB more after
# the first runs). With 64 MiB here the bench's peak reached 1,712-1,729 MiB (1,806 once); with
# 192, 1,638 (bench/memory_limit.py).
_RESERVE_BYTES = 192 << 20


def run_activation_bytes(rows: int, width: int, hidden: int) -> int:
    """Estimated activation bytes at the peak of one run of ``rows`` windows of ``width`` tokens."""
    return int(rows * width * hidden * (_BYTES_PER_TOKEN_H + _BYTES_PER_TOKEN_HW * width))


def shrinking_run_options() -> Any:
    """``RunOptions`` that have the CPU arena hand a run's memory back when the run ends."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class OnnxRunner:
    """The model call of the engine on an ``onnxruntime.InferenceSession`` (thread safe).

    Each run hands its activation memory back to the system when it ends (arena shrinkage):
    otherwise the arena keeps the largest batch's activations for good, about 500 MB more RSS
    for bert-large after one batch of 4 or more 384-token windows.

    Args:
        session: the session.
        input_names: the graph's inputs, in the engine's order.
        run_bytes: activation bytes one run may take (``None``: no bound); a run estimated
            above it goes through the session in parts of fewer rows, concatenated.
        hidden: the model's hidden size, for that estimate.
        holds: objects the session reads from (the shared weights buffer and its views), kept
            alive as long as the runner.
    """

    def __init__(
        self,
        session: Any,
        input_names: tuple[str, ...],
        *,
        run_bytes: int | None = None,
        hidden: int = 1024,
        holds: Sequence[Any] = (),
    ) -> None:
        self.session = session
        self.input_names = input_names
        self.run_bytes = run_bytes
        self.hidden = hidden
        self._holds = tuple(holds)
        self._run_options = shrinking_run_options()

    def rows_per_run(self, width: int) -> int:
        """How many windows of ``width`` tokens one session run takes (at least 1)."""
        if self.run_bytes is None:
            return 1 << 30
        return max(1, self.run_bytes // max(1, run_activation_bytes(1, width, self.hidden)))

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        rows, width = next(iter(inputs.values())).shape
        step = self.rows_per_run(width)
        if rows <= step:
            start, end = self.session.run(["start_logits", "end_logits"], dict(inputs), self._run_options)
            return start, end
        # every row is computed on its own (no op mixes rows), so parts give the same logits
        parts = [
            self.session.run(["start_logits", "end_logits"], {k: v[first : first + step] for k, v in inputs.items()}, self._run_options)
            for first in range(0, rows, step)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def onnx_engine(
    files: Mapping[str, bytes | bytearray],
    record: Mapping[str, Any],
    tokenizer_files: Mapping[str, bytes | bytearray],
    *,
    limits: Limits | None = None,
    batch_windows: BatchWindows = AUTO,
    threads: int | None = None,
    prepack: bool = True,
    memory_mb: int | None = None,
    max_concurrent: int = 1,
) -> QAEngine:
    """A :class:`QAEngine` over an ONNX artifact held in memory.

    Args:
        files: ``model.onnx`` and ``weights.bin`` as downloaded (and verified).
        record: the artifact's record (input names, special-token ids, window geometry).
        tokenizer_files: the version's tokenizer files by name; ``tokenizer.json`` is needed.
        limits, batch_windows: as for :class:`QAEngine`.
        threads: intra-op threads of the session (default: :func:`default_threads` with 1
            inference at a time).
        prepack: ``True``: ONNX Runtime copies the weights and repacks them for its kernels
            (fastest; the load holds them twice), then a ``bytearray`` download is emptied (its
            memory freed). ``False``: the session reads the weights from ``weights.bin``'s buffer
            itself (no copy, no repacking: one copy of the weights while loading and after);
            the buffer must then be writable (a ``bytearray`` or an ``mmap``) and is kept by the engine.
            :func:`prepack_fits` chooses from the memory at hand.
        memory_mb: the memory the process may use (``QA_MEMORY_MB``): runs are split so that the
            activations of ``max_concurrent`` of them fit beside what the process holds once
            loaded. ``None``: no bound.
        max_concurrent: runs that may go through the session at once (``QA_MAX_CONCURRENT``).

    Raises:
        IntegrityError: a file is missing, or the record does not match the graph.
        UnsafeModelError: the record's format is unknown, or there is no ``tokenizer.json``.
    """
    input_names, max_seq_len, doc_stride, variant = _record_facts(record)
    missing = [name for name in (MODEL_FILE, WEIGHTS_FILE) if name not in files]
    if missing:
        raise IntegrityError(f"the ONNX artifact lacks {', '.join(missing)}")
    spec = tokenizer_spec(record, tokenizer_files.get("tokenizer.json"))

    options = session_options(threads=threads or default_threads(None, 1))
    graph = bytes(files[MODEL_FILE])
    tensors = external_initializers(graph)
    holds: tuple[Any, ...] = ()
    if not prepack:
        try:
            session, holds = weights_shared_session(files[WEIGHTS_FILE], graph, options, f"{variant} artifact")
        except WeightsFileNeeded:
            log.warning("ONNX Runtime reads weights of the %s artifact while it optimizes the graph: they are copied and repacked", variant)
            options, prepack = session_options(threads=threads or default_threads(None, 1)), True
    if prepack:
        session = _repacked_session(files, graph, options, variant)
    return _engine(session, holds, spec, input_names, variant, hidden_size(tensors), max_seq_len, doc_stride,
                   limits=limits, batch_windows=batch_windows, memory_mb=memory_mb, max_concurrent=max_concurrent)  # fmt: skip


def _engine(
    session: Any,
    holds: tuple[Any, ...],
    spec: TokenizerSpec,
    input_names: tuple[str, ...],
    variant: str,
    hidden: int,
    max_seq_len: int,
    doc_stride: int,
    *,
    limits: Limits | None,
    batch_windows: BatchWindows,
    memory_mb: int | None,
    max_concurrent: int,
) -> QAEngine:
    graph_inputs = tuple(i.name for i in session.get_inputs())
    graph_outputs = {o.name for o in session.get_outputs()}
    if set(graph_inputs) != set(input_names) or not {"start_logits", "end_logits"} <= graph_outputs:
        raise IntegrityError(f"the ONNX graph's inputs {graph_inputs} do not match its record {input_names}")
    run_bytes = None
    if memory_mb is not None:
        left = (memory_mb << 20) - (resident_bytes() or 0) - _RESERVE_BYTES
        run_bytes = max(0, left) // max(1, max_concurrent)
    runner = OnnxRunner(session, input_names, run_bytes=run_bytes, hidden=hidden, holds=holds)
    if run_bytes is not None:
        log.info(
            "ONNX runs bounded to %d MiB of activations each (%d at once, QA_MEMORY_MB=%s): at most %d windows of %d tokens per run",
            run_bytes >> 20, max_concurrent, memory_mb, runner.rows_per_run(max_seq_len), max_seq_len,
        )  # fmt: skip
    return QAEngine(
        runner,
        spec,
        limits=limits,
        batch_windows=batch_windows,
        quantize="int8" if variant == "int8" else "none",
        max_seq_len=max_seq_len,
        doc_stride=doc_stride,
    )


def _record_facts(record: Mapping[str, Any]) -> tuple[tuple[str, ...], int, int, str]:
    if record.get("format") != SUPPORTED_FORMAT:
        raise UnsafeModelError(f"ONNX artifact format {record.get('format')!r} is not supported by this app (expected {SUPPORTED_FORMAT})")
    try:
        return tuple(str(n) for n in record["input_names"]), int(record["max_seq_len"]), int(record["doc_stride"]), str(record["variant"])
    except (KeyError, TypeError, ValueError) as err:
        raise IntegrityError(f"the ONNX artifact's record is incomplete ({type(err).__name__}: {err})") from err


# --- repacked part by part, as weights.bin streams in --------------------------------------------


def staged_parts(graph: bytes, weights_bytes: int, memory_mb: int | None) -> list[GraphPart] | None:
    """The parts a repacking load of ``graph`` builds one at a time (:mod:`~shared.engine.onnx_parts`),
    when it fits ``memory_mb`` that way and not in one piece; ``None`` otherwise (then the weights
    are served shared, not repacked).

    While part ``k`` is built the process holds the parts before it (repacked: about their size),
    part ``k`` twice (the download and ONNX Runtime's copy) and the runtime: with parts of an
    eighth, about 1.125 times the weights at the peak instead of 2.
    """
    if memory_mb is None or prepack_fits(weights_bytes, memory_mb):
        return None
    part_bytes = part_size(weights_bytes, _STAGES)
    if weights_bytes + part_bytes + _STAGED_HEADROOM_BYTES > memory_mb << 20:
        return None
    return split_graph(graph, part_bytes=part_bytes)


def part_size(weights_bytes: int, parts: int = 8) -> int:
    """Bytes of weights per part when a graph is cut (:func:`~shared.engine.onnx_parts.split_graph`)
    into about ``parts`` parts: eighths for a staged load (whose parts all stay), sixteenths for a
    :class:`PartwiseRun` (one part at a time: the smaller, the lower the peak)."""
    return max(weights_bytes // parts, _MIN_PART_BYTES)


_STAGES = 8
_MIN_PART_BYTES = 16 << 20
# Beside the weights and two parts while loading: the serving process's runtime and what ONNX
# Runtime allocates while it builds a session (about 150 MiB each).
_STAGED_HEADROOM_BYTES = 300 << 20


class SessionChain:
    """Sessions of a graph's parts run one after the other, as one session would be (``run``,
    ``get_inputs``, ``get_outputs``); values a part gives are kept only while a later part needs them."""

    class _Arg:
        def __init__(self, name: str) -> None:
            self.name = name

    def __init__(self, parts: Sequence[GraphPart], sessions: Sequence[Any]) -> None:
        self.parts, self.sessions = tuple(parts), tuple(sessions)
        made = {name for part in self.parts for name in part.outputs}
        self._inputs = tuple(dict.fromkeys(n for part in self.parts for n in part.inputs if n not in made))
        self._outputs = self.parts[-1].outputs
        self._last_needed = {name: k for k, part in enumerate(self.parts) for name in part.inputs}

    def get_inputs(self) -> list[Any]:
        return [self._Arg(name) for name in self._inputs]

    def get_outputs(self) -> list[Any]:
        return [self._Arg(name) for name in self._outputs]

    def run(self, output_names: Sequence[str], feeds: Mapping[str, Any], run_options: Any = None) -> list[Any]:
        """The outputs of the chain; ``run_options`` apply to the last part's run alone.

        The parts share one arena, and the runner's options ask it to hand its memory back after a
        run: after every part, it would free what the next part takes again at once. On bert-large
        fp32 in 8 parts (bench/memory_limit.py's scenarios under the 2 GB limit), shrinking after
        every part took 3x the page faults of shrinking once per chain run (5.6-6.0 million against
        1.9), 12-14 s of system time against 5, and peaked higher (1,700-1,735 MiB against 1,638):
        each regrowth asks for a larger region.
        """
        values = dict(feeds)
        last = len(self.parts) - 1
        for k, (part, session) in enumerate(zip(self.parts, self.sessions, strict=True)):
            found = session.run(list(part.outputs), {name: values[name] for name in part.inputs}, run_options if k == last else None)
            values.update(zip(part.outputs, found, strict=True))
            for name in [n for n in values if self._last_needed.get(n, len(self.parts)) <= k and n not in output_names]:
                del values[name]
        return [values[name] for name in output_names]


class StagedLoad:
    """A sink for ``weights.bin``'s bytes in order (``ModelStore.stream_file``) that builds each
    part's session, repacked, as soon as the part's bytes have arrived, then hands back the pages
    of the download no later part reads (and makes them inaccessible: nothing may read them).

    ONNX Runtime copies the weights it is given as ``add_external_initializers`` into memory of
    its own and repacks them there, so a part's session never points into the download.
    """

    def __init__(self, parts: Sequence[GraphPart], size: int, options: Callable[[], Any], what: str) -> None:
        self.parts, self.size, self.options, self.what = list(parts), size, options, what
        self.restart()

    def restart(self) -> None:
        # private: madvise(MADV_DONTNEED) frees a private mapping's pages, but only unmaps those of
        # a shared one (mmap's default), which stay charged to the cgroup as shmem while RSS drops
        self.buffer = mmap.mmap(-1, max(1, self.size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.offset = 0
        self.sessions: list[Any] = []

    def __call__(self, chunk: memoryview) -> None:
        data = memoryview(chunk).cast("B")
        if self.offset + data.nbytes > self.size:
            raise IntegrityError(f"weights.bin of the {self.what} is larger than recorded")
        self.buffer[self.offset : self.offset + data.nbytes] = data
        self.offset += data.nbytes
        while len(self.sessions) < len(self.parts) and self.parts[len(self.sessions)].ready_at <= self.offset:
            self._build(len(self.sessions))

    def _build(self, index: int) -> None:
        self._use(index, self._session(index, self.parts[index].graph))
        self._release(index)

    def _release(self, index: int) -> None:
        """Hand back the pages of the download that no part after ``index`` reads."""
        gaps, at = [], 0
        for start, end in still_needed(self.parts, index + 1):
            gaps.append((at, min(start, self.offset)))
            at = max(at, end)
        gaps.append((at, self.offset))
        for start, end in gaps:
            if end > start:
                release_pages(self.buffer, start, end, protect=True)
        release_free_heap()

    def _session(self, index: int, graph: bytes) -> Any:
        import onnxruntime as ort

        part = self.parts[index]
        options = self.options()
        everything = np.frombuffer(self.buffer, dtype=np.uint8)
        values = [ort.OrtValue.ortvalue_from_numpy(tensor.view(everything)) for tensor in part.tensors]
        options.add_external_initializers([t.name for t in part.tensors], values)
        try:
            with large_blocks_mapped():
                return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except _session_errors() as err:
            raise IntegrityError(f"ONNX Runtime refused part {index + 1} of the {self.what} ({type(err).__name__})") from err

    def _use(self, index: int, session: Any) -> None:
        self.sessions.append(session)

    def finish(self) -> SessionChain:
        """The chain, once every byte arrived (and the caller checked their sha256).

        Raises:
            IntegrityError: the stream ended before every part could be built.
        """
        if len(self.sessions) < len(self.parts) or self.offset != self.size:
            raise IntegrityError(f"weights.bin of the {self.what} ended after {self.offset} of {self.size} bytes")
        release_pages(self.buffer, 0, self.size, protect=True)
        return SessionChain(self.parts, self.sessions)


class PartwiseRun(StagedLoad):
    """Every feed run through the graph one part at a time while ``weights.bin`` streams in once
    (a sink for ``ModelStore.stream_file``, as :class:`StagedLoad`): each part's session is built
    as soon as its bytes have arrived, runs every feed, and is dropped with the download's pages
    no later part reads. The process holds one part (twice while its session is built), the
    values that cross between parts for every feed, and one run's activations: a fraction of the
    weights, where a session over the whole graph holds all of them.

    ``extra_outputs[k]`` names values of part ``k`` to return as well (``ReduceMin`` / ``ReduceMax``
    nodes that :func:`with_outputs` added, for the int8 calibration); ``results[i]`` has the graph's
    outputs and those extra values of ``feeds[i]`` once :meth:`finish_run` returned.
    """

    def __init__(
        self,
        parts: Sequence[GraphPart],
        size: int,
        options: Callable[[], Any],
        what: str,
        feeds: Sequence[Mapping[str, np.ndarray]],
        *,
        graphs: Sequence[bytes] | None = None,
        extra_outputs: Sequence[Sequence[str]] | None = None,
    ) -> None:
        self.feeds = [dict(feed) for feed in feeds]
        self.graphs = list(graphs) if graphs is not None else [part.graph for part in parts]
        self.extra_outputs = [list(names) for names in extra_outputs] if extra_outputs is not None else [[] for _ in parts]
        self._last_needed = {name: k for k, part in enumerate(parts) for name in part.inputs}

        def without_arena() -> Any:
            # each part's session is dropped once it has run: with ONNX Runtime's CPU arena, what a
            # dropped session held stayed in the process (bert-large fp32 in 8 parts: 1,702 MiB
            # resident after the last part; without the arena, 106 MiB)
            built = options()
            built.enable_cpu_mem_arena = False
            return built

        super().__init__(parts, size, without_arena, what)

    def restart(self) -> None:
        super().restart()
        self.values = [dict(feed) for feed in self.feeds]
        self.results: list[dict[str, np.ndarray]] = [{} for _ in self.feeds]

    def _build(self, index: int) -> None:
        session = self._session(index, self.graphs[index])
        part, extra, last = self.parts[index], self.extra_outputs[index], index == len(self.parts) - 1
        for values, result in zip(self.values, self.results, strict=True):
            found = session.run([*part.outputs, *extra], {name: values[name] for name in part.inputs})
            values.update(zip(part.outputs, found, strict=False))
            result.update(zip(extra, found[len(part.outputs) :], strict=True))
            if last:
                result.update(zip(part.outputs, found, strict=False))
            for name in [n for n in values if self._last_needed.get(n, -1) <= index]:
                del values[name]  # no later part reads it
        del session
        self.sessions.append(None)  # counted, not kept
        self._release(index)

    def finish_run(self) -> list[dict[str, np.ndarray]]:
        """The results, once every byte arrived (and the caller checked their sha256).

        Raises:
            IntegrityError: the stream ended before every part could be run.
        """
        if len(self.sessions) < len(self.parts) or self.offset != self.size:
            raise IntegrityError(f"weights.bin of the {self.what} ended after {self.offset} of {self.size} bytes")
        with contextlib.suppress(BufferError):  # a view still held somewhere: the mapping goes with it
            self.buffer.close()
        return self.results


class PartwiseRunner(OnnxRunner):
    """The model call of an engine that runs each call through the graph part by part while
    ``weights.bin`` streams in again (:class:`PartwiseRun`): every call reads the whole file, so it
    is for a check that asks a question or two in little memory (the refresh's canary of an
    artifact whose weights do not fit twice), never for serving."""

    def __init__(
        self,
        parts: Sequence[GraphPart],
        size: int,
        stream: Callable[[Any], None],
        options: Callable[[], Any],
        what: str,
        input_names: tuple[str, ...],
    ) -> None:
        super().__init__(None, input_names)
        self.parts, self.size, self.stream, self.options, self.what = tuple(parts), size, stream, options, what

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        run = PartwiseRun(self.parts, self.size, self.options, self.what, [inputs])
        self.stream(run)
        result = run.finish_run()[0]
        return result["start_logits"], result["end_logits"]


def partwise_engine(
    graph: bytes,
    record: Mapping[str, Any],
    tokenizer_files: Mapping[str, bytes | bytearray],
    *,
    parts: Sequence[GraphPart],
    weights_bytes: int,
    stream: Callable[[Any], None],
    limits: Limits | None = None,
) -> QAEngine:
    """A :class:`QAEngine` over a :class:`PartwiseRunner` (each call streams ``weights.bin`` again).

    Raises:
        UnsafeModelError: the record's format is unknown, or there is no ``tokenizer.json``.
    """
    input_names, max_seq_len, doc_stride, variant = _record_facts(record)
    spec = tokenizer_spec(record, tokenizer_files.get("tokenizer.json"))
    runner = PartwiseRunner(parts, weights_bytes, stream, lambda: session_options(threads=None), f"{variant} artifact", input_names)
    return QAEngine(
        runner,
        spec,
        limits=limits,
        quantize="int8" if variant == "int8" else "none",
        max_seq_len=max_seq_len,
        doc_stride=doc_stride,
    )


def with_outputs(graph: bytes, reduced: Sequence[str]) -> tuple[bytes, list[str]]:
    """``graph`` with the min and max of each value of ``reduced`` it computes or reads as extra
    outputs (``ReduceMin`` / ``ReduceMax``, scalars), and their names in the order min, max."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load_from_string(graph)
    seen = {name for node in proto.graph.node for name in (*node.input, *node.output)}
    outputs = []
    for name in [n for n in reduced if n in seen]:
        for kind in ("Min", "Max"):
            out = f"calibration_{kind.lower()}_{name}"
            proto.graph.node.append(helper.make_node(f"Reduce{kind}", [name], [out], keepdims=0, name=out))
            proto.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))
            outputs.append(out)
    return proto.SerializeToString(), outputs


def staged_engine(
    graph: bytes,
    record: Mapping[str, Any],
    tokenizer_files: Mapping[str, bytes | bytearray],
    *,
    parts: Sequence[GraphPart],
    weights_bytes: int,
    stream: Callable[[StagedLoad], None],
    limits: Limits | None = None,
    batch_windows: BatchWindows = AUTO,
    threads: int | None = None,
    memory_mb: int | None = None,
    max_concurrent: int = 1,
) -> QAEngine:
    """A :class:`QAEngine` whose graph is built and repacked part by part as ``weights.bin`` streams
    in (:func:`staged_parts`); ``stream(sink)`` feeds the sink every byte in order, calls its
    ``restart`` if it starts over, and raises if the bytes do not verify.

    Raises:
        IntegrityError: the graph or a part is refused, or the bytes end early.
        UnsafeModelError: the record's format is unknown, or there is no ``tokenizer.json``.
    """
    input_names, max_seq_len, doc_stride, variant = _record_facts(record)
    spec = tokenizer_spec(record, tokenizer_files.get("tokenizer.json"))

    def options() -> Any:
        # one arena for every part (they run one after the other): with one each, the parts'
        # arenas together kept about 200 MiB more after a run of 4 windows of 384 tokens
        built = session_options(threads=threads or default_threads(None, 1))
        if _shared_arena():
            built.add_session_config_entry("session.use_env_allocators", "1")
        return built

    load = StagedLoad(parts, weights_bytes, options, f"{variant} artifact")
    stream(load)
    chain = load.finish()
    hidden = hidden_size(external_initializers(graph))
    return _engine(chain, (), spec, input_names, variant, hidden, max_seq_len, doc_stride,
                   limits=limits, batch_windows=batch_windows, memory_mb=memory_mb, max_concurrent=max_concurrent)  # fmt: skip


@functools.cache
def _shared_arena() -> bool:
    """Register, once per process, the CPU arena that part sessions share; ``False`` if ONNX Runtime refuses."""
    import onnxruntime as ort

    try:
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))  # the defaults: grow by powers of two
    except _session_errors():
        log.warning("ONNX Runtime refused a shared arena: each part of a staged load keeps its own", exc_info=True)
        return False
    return True


def prepack_fits(weights_bytes: int, memory_mb: int | None) -> bool:
    """Whether a load that repacks (holding the weights twice, plus the runtime and a run's
    activations) fits in ``memory_mb``; always where memory is not bounded."""
    if memory_mb is None:
        return True
    return 2 * weights_bytes + _PREPACK_HEADROOM_BYTES <= memory_mb << 20


# Beside twice the weights: interpreter, Azure SDK, ONNX Runtime and tokenizers (about 150 MiB in a
# serving process), the session's own structures, and a run of 8 bert-large windows (about 540 MiB).
_PREPACK_HEADROOM_BYTES = 700 << 20


def hidden_size(tensors: Sequence[ExternalTensor]) -> int:
    """The model's hidden size as its weights show it: the most common last dimension of its
    matrices (bert-large: 1024); 1024 when the graph keeps none outside (a tiny model)."""
    widths = collections.Counter(t.dims[-1] for t in tensors if len(t.dims) == 2)
    return widths.most_common(1)[0][0] if widths else 1024


def _repacked_session(files: Mapping[str, bytes | bytearray], graph: bytes, options: Any, variant: str) -> Any:
    """ONNX Runtime copies every initializer out of ``weights.bin`` and repacks the matrices; the
    download buffers are emptied afterwards and the heap's free pages handed back."""
    import onnxruntime as ort

    weights = files[WEIGHTS_FILE]
    options.add_external_initializers_from_files_in_memory([WEIGHTS_FILE], [weights], [len(weights)])
    try:
        with large_blocks_mapped():  # ONNX Runtime's transient copies leave nothing resident behind
            return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except _session_errors() as err:
        raise IntegrityError(f"ONNX Runtime refused the {variant} artifact ({type(err).__name__})") from err
    finally:
        del weights
        for data in files.values():
            if isinstance(data, bytearray):
                data.clear()  # the session holds its own copy now
        release_free_heap()


class WeightsFileNeeded(Exception):
    """ONNX Runtime's graph optimizer reads an initializer from the external file itself (it folds a
    constant expression over a weight: seen with DeBERTa-v3), which a shared session cannot offer."""


def weights_shared_session(weights: Any, graph: bytes, options: Any, what: str) -> tuple[Any, tuple[Any, ...]]:
    """A session whose initializers are views into ``weights`` (no copy, no repacking).

    ``weights`` is ``weights.bin`` in a writable buffer (``bytearray`` or ``mmap``), which must not
    change while the session lives; ``what`` names the graph in errors.

    ONNX Runtime still checks that each initializer's external file exists before it takes the
    shared value instead: the graph's ``weights.bin`` resolves to an empty *directory* in a
    temporary folder, so that any attempt to read from it fails loudly instead of reading bytes
    that are not the model's. The folder is removed once the session exists.

    Returns:
        The session, and what must stay alive as long as it (the buffer, its views and values).

    Raises:
        WeightsFileNeeded: the graph's optimizer wanted to read weights from the file (use
            :func:`copied_session`, or the repacked load).
        IntegrityError: ONNX Runtime refused the graph for another reason.
    """
    import onnxruntime as ort

    tensors = external_initializers(graph)
    strange = sorted({t.location for t in tensors} - {WEIGHTS_FILE})
    if strange:
        raise IntegrityError(f"the ONNX graph points at external files other than {WEIGHTS_FILE}: {strange}")
    everything = np.frombuffer(weights, dtype=np.uint8)
    values = []
    for tensor in tensors:
        value = ort.OrtValue.ortvalue_from_numpy(tensor.view(everything))  # shares the memory
        options.add_initializer(tensor.name, value)
        values.append(value)
    options.add_session_config_entry("session.disable_prepacking", "1")
    folder = tempfile.mkdtemp(prefix="onnx-shared-")
    try:
        os.mkdir(os.path.join(folder, WEIGHTS_FILE))
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except _session_errors() as err:
        if folder in str(err):
            raise WeightsFileNeeded(str(err)) from None
        raise IntegrityError(f"ONNX Runtime refused the {what} ({type(err).__name__})") from err
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return session, (weights, everything, tuple(values))


def copied_session(weights: Any, graph: bytes, options: Any, what: str) -> Any:
    """A session over a copy of ``weights`` that ONNX Runtime makes (and keeps), without repacking;
    ``weights`` is left as it was. Twice the weights in memory: for graphs a shared session cannot serve."""
    import onnxruntime as ort

    options.add_session_config_entry("session.disable_prepacking", "1")
    options.add_external_initializers_from_files_in_memory([WEIGHTS_FILE], [weights], [len(weights)])
    try:
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except _session_errors() as err:
        raise IntegrityError(f"ONNX Runtime refused the {what} ({type(err).__name__})") from err


def _session_errors() -> tuple[type[BaseException], ...]:
    """What ``InferenceSession`` raises for a model it cannot load: its own exception classes
    (``Fail``, ``InvalidProtobuf``, ``InvalidGraph``, ...), which derive from ``Exception`` only."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented", "RuntimeException")
    return (RuntimeError, ValueError, *(getattr(state, name) for name in names if hasattr(state, name)))


def tokenizer_spec(record: Mapping[str, Any], tokenizer_json: bytes | bytearray | None) -> TokenizerSpec:
    """The engine's tokenizer from ``tokenizer.json`` and the facts recorded at build time.

    Raises:
        UnsafeModelError: no ``tokenizer.json``.
    """
    from tokenizers import Tokenizer

    if not tokenizer_json:
        raise UnsafeModelError("the version has no tokenizer.json; the ONNX backend needs it")
    return TokenizerSpec(
        backend=Tokenizer.from_str(bytes(tokenizer_json).decode("utf-8")),
        model_max_length=int(record["max_seq_len"]),
        cls_token_id=record.get("cls_token_id"),
        pad_token_id=record.get("pad_token_id"),
        input_names=tuple(record["input_names"]),
    )


def session_options(*, threads: int | None) -> Any:
    """Session options for serving: ``threads`` intra-op threads, sequential, full graph optimization.

    ONNX Runtime's own fusions at this level are exact (LayerNorm, SkipLayerNorm, BiasGelu with
    ``erf``, MatMul + Add); none approximates (no FastGelu, no fp16).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    # Memory patterns pre-plan one block per input shape; with the engine's varying (batch,
    # width) they only add to the arena (bert-large int8, 4x384 tokens: 1.38 GB RSS with them,
    # 1.08 GB without, same speed).
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers are noise in function logs
    return options


def default_threads(settings_threads: int | None, max_concurrent: int) -> int:
    """Intra-op threads of one session: ``QA_THREADS``, else the CPUs this process may use
    (the cgroup v2 quota, else the affinity mask or ``os.cpu_count()``) divided among the
    ``QA_MAX_CONCURRENT`` inferences that may run at once; at least 1."""
    if settings_threads:
        return settings_threads
    return max(1, cpu_quota() // max(1, max_concurrent))


def cpu_quota() -> int:
    """Whole CPUs available: ``cpu.max`` of cgroup v2 when it sets a quota, else the CPU count."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            return max(1, math.floor(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
