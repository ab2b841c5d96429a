"""Serve an ONNX artifact (see :mod:`shared.refresh.onnx_export`) with ONNX Runtime, without torch or transformers.

The session is built from the verified in-memory download: ``weights.bin`` is handed to ONNX
Runtime as the contents of the external-data file (ONNX Runtime copies each initializer out of
it while the session is created), then the download buffer is released and the C heap's free
pages returned to the system, so the steady state holds the weights once. The tokenizer comes
from ``tokenizer.json`` through ``tokenizers`` alone, with the special-token ids and input names recorded when the artifact was built.
Windowing and span decoding are those of :class:`~shared.engine.question_answering.QAEngine`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IntegrityError, UnsafeModelError
from ..memory import large_blocks_mapped, release_free_heap
from .batching import AUTO, BatchWindows
from .question_answering import Limits, QAEngine, TokenizerSpec

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
SUPPORTED_FORMAT = 1
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


class OnnxRunner:
    """The model call of the engine on an ``onnxruntime.InferenceSession`` (thread safe).

    Each run hands its activation memory back to the system when it ends (arena shrinkage):
    otherwise the arena keeps the largest batch's activations for good, about 500 MB more RSS
    for bert-large after one batch of 4 or more 384-token windows.
    """

    def __init__(self, session: Any, input_names: tuple[str, ...]) -> None:
        import onnxruntime as ort

        self.session = session
        self.input_names = input_names
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.session.run(["start_logits", "end_logits"], dict(inputs), self._run_options)
        return start, end


def onnx_engine(
    files: Mapping[str, bytes | bytearray],
    record: Mapping[str, Any],
    tokenizer_files: Mapping[str, bytes | bytearray],
    *,
    limits: Limits | None = None,
    batch_windows: BatchWindows = AUTO,
    threads: int | None = None,
    prepack: bool = True,
) -> QAEngine:
    """A :class:`QAEngine` over an ONNX artifact held in memory.

    Args:
        files: ``model.onnx`` and ``weights.bin`` as downloaded (and verified). A ``bytearray``
            is emptied (its memory freed) once the session holds the weights.
        record: the artifact's record (input names, special-token ids, window geometry).
        tokenizer_files: the version's tokenizer files by name; ``tokenizer.json`` is needed.
        limits, batch_windows: as for :class:`QAEngine`.
        threads: intra-op threads of the session (default: :func:`default_threads` with 1
            inference at a time).
        prepack: let ONNX Runtime repack the weights for its kernels (faster serving); ``False``
            for a one-off check where the extra copy made while packing would set the peak
            (the refresh's canary of an artifact).

    Raises:
        IntegrityError: a file is missing, or the record does not match the graph.
        UnsafeModelError: the record's format is unknown, or there is no ``tokenizer.json``.
    """
    import onnxruntime as ort

    if record.get("format") != SUPPORTED_FORMAT:
        raise UnsafeModelError(f"ONNX artifact format {record.get('format')!r} is not supported by this app (expected {SUPPORTED_FORMAT})")
    missing = [name for name in (MODEL_FILE, WEIGHTS_FILE) if name not in files]
    if missing:
        raise IntegrityError(f"the ONNX artifact lacks {', '.join(missing)}")
    try:
        input_names = tuple(str(n) for n in record["input_names"])
        max_seq_len, doc_stride = int(record["max_seq_len"]), int(record["doc_stride"])
        variant = str(record["variant"])
    except (KeyError, TypeError, ValueError) as err:
        raise IntegrityError(f"the ONNX artifact's record is incomplete ({type(err).__name__}: {err})") from err
    spec = tokenizer_spec(record, tokenizer_files.get("tokenizer.json"))

    options = session_options(threads=threads or default_threads(None, 1))
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    weights = files[WEIGHTS_FILE]
    options.add_external_initializers_from_files_in_memory([WEIGHTS_FILE], [weights], [len(weights)])
    try:
        with large_blocks_mapped():  # ONNX Runtime's transient copies leave nothing resident behind
            session = ort.InferenceSession(bytes(files[MODEL_FILE]), options, providers=["CPUExecutionProvider"])
    except _session_errors() as err:
        raise IntegrityError(f"ONNX Runtime refused the {variant} artifact ({type(err).__name__})") from err
    finally:
        del weights
        for data in files.values():
            if isinstance(data, bytearray):
                data.clear()  # the session holds its own copy now
        release_free_heap()
    graph_inputs = tuple(i.name for i in session.get_inputs())
    graph_outputs = {o.name for o in session.get_outputs()}
    if set(graph_inputs) != set(input_names) or not {"start_logits", "end_logits"} <= graph_outputs:
        raise IntegrityError(f"the ONNX graph's inputs {graph_inputs} do not match its record {input_names}")
    return QAEngine(
        OnnxRunner(session, input_names),
        spec,
        limits=limits,
        batch_windows=batch_windows,
        quantize="int8" if variant == "int8" else "none",
        max_seq_len=max_seq_len,
        doc_stride=doc_stride,
    )


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
    """Session options for serving: ``threads`` intra-op threads, sequential, full graph optimization,
    weights prepacked for the CPU's kernels (1.8x faster than without for bert-large fp32).

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
