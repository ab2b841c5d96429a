"""Build the ONNX serving artifacts of a verified model: ``fp32`` and ``int8``.

``fp32`` is the model's ``AutoModelForQuestionAnswering`` exported by ``torch.onnx.export``
(dynamo) with dynamic batch and sequence axes; only the exporter's own exact rewrites (constant
folding, dead code) are applied, so spans stay those of the torch engine. ``int8`` is that graph
quantized by :mod:`shared.refresh.int8`, calibrated with ONNX Runtime on the fp32 artifact.

The graph does not depend on the weights' values, so the export runs on a model whose weights are
*placeholders* (:func:`_placeholder_model`): each one a small vector broadcast to the weight's
shape, no memory of its size. Every initializer of the exported graph is then traced back to the
checkpoint tensor it came from (the placeholder's memory it points into, and how: as it is, or
transposed), and ``weights.bin`` is written from the ``.safetensors`` as they stream in, one
tensor at a time (:class:`~shared.refresh.onnx_weights.TensorStream`): the build holds
``weights.bin`` and one checkpoint tensor, never a second copy of the model. A graph constant the
exporter computed from a weight could not be traced that way: the export is run a second time
with other placeholder values, and a floating-point constant that changed with them sends the
build to the way that loads the real weights into torch first (:func:`_export_with_weights`),
as does a checkpoint that transformers does not load key for key.

An artifact is two files: ``model.onnx`` (the graph; every initializer of 1 KiB or more points
into ``weights.bin`` as external data) and ``weights.bin``, plus a JSON record of what serving
needs and what the artifact was built from. Building needs torch and transformers; serving
(:mod:`shared.engine.onnx_runner`) needs neither.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import gc
import logging
import mmap
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.cpu import cpu_facts
from ..engine.onnx_graph import external_initializers
from ..errors import IntegrityError, StorageUnavailableError, UnsafeModelError
from ..memory import large_blocks_mapped, release_memory
from ..settings import ARTIFACT_VARIANTS
from .int8 import DEFAULT_RECIPE, RECIPES, StreamedWeights, calibrate, calibrate_by_parts, calibration_facts, quantize
from .model_checks import check_vocabulary
from .onnx_weights import (
    EXTERNAL_MIN_BYTES,
    MODEL_FILE,
    WEIGHTS_FILE,
    Place,
    StoredTensor,
    TensorStream,
    WeightsLayout,
    WeightsWriter,
    header_length,
    parse_header,
)

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1
OUTPUT_NAMES = ("start_logits", "end_logits")
MAX_SEQ_LEN = 384
DOC_STRIDE = 128
_SMALL_SUFFIXES = (".json", ".txt")
_SMALL_LIMIT = 64 << 20

Sink = Callable[[memoryview], object]


@dataclass
class OnnxArtifact:
    """The files of one artifact and its record.

    ``files`` is exactly ``{"model.onnx": graph, "weights.bin": weights}``, or only the graph when
    ``placed_weights`` is set: then ``weights.bin``'s bytes (that many) went to the build's
    ``place`` as they arrived instead (:class:`~shared.refresh.onnx_weights.WeightsLayout`).
    ``record`` is JSON-able.
    """

    files: dict[str, bytes | bytearray]
    record: dict[str, Any]
    placed_weights: int | None = None

    @property
    def size(self) -> int:
        return sum(len(data) for data in self.files.values()) + (self.placed_weights or 0)


@dataclass(frozen=True)
class StreamedArtifact:
    """An fp32 artifact in storage whose ``weights.bin`` (``size`` bytes) the int8 build reads as
    it needs it, never whole: ``stream(sink)`` feeds the sink every byte in order (calling its
    ``restart`` if it starts over) and raises if they do not verify."""

    graph: bytes
    record: dict[str, Any]
    size: int
    stream: Callable[[Any], None]


@dataclass(frozen=True)
class WeightFile:
    """One ``.safetensors`` file of a model: its JSON header (read first: the export needs the list
    of tensors before their bytes) and a way to stream all its bytes, in order, to a sink.
    ``stream(sink, restart)`` calls ``restart`` before starting over (the file changed meanwhile)
    and raises :class:`IntegrityError` when the bytes do not verify."""

    name: str
    header: bytes
    stream: Callable[[Sink, Callable[[], object]], None]


@dataclass
class ModelSource:
    """A verified model: its small files in memory (config, tokenizer) and its weights to stream."""

    files: dict[str, bytearray]
    weights: list[WeightFile] = field(default_factory=list)
    where: str = "the model"

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelSource:
        """A local model folder (its ``.safetensors`` are read in blocks, never mapped whole).

        Raises:
            UnsafeModelError: no ``.safetensors``, or one whose header is unreadable.
        """
        weight_files = sorted(model_dir.glob("*.safetensors"))
        if not weight_files:
            raise UnsafeModelError(f"{model_dir} has no safetensors weights to export")
        small = {
            path.name: bytearray(path.read_bytes())
            for path in model_dir.iterdir()
            if path.is_file() and path.suffix in _SMALL_SUFFIXES and path.stat().st_size < _SMALL_LIMIT
        }
        weights = []
        for path in weight_files:
            with path.open("rb") as handle:
                try:
                    header = handle.read(header_length(handle.read(8)))
                except IntegrityError as err:
                    raise UnsafeModelError(f"{path.name}: {err.message}") from err
            weights.append(WeightFile(path.name, header, _file_streamer(path)))
        return cls(files=small, weights=weights, where=str(model_dir))


def _file_streamer(path: Path) -> Callable[[Sink, Callable[[], object]], None]:
    def stream(sink: Sink, restart: Callable[[], object]) -> None:
        with path.open("rb") as handle:
            while block := handle.read(8 << 20):
                sink(memoryview(block))

    return stream


def build_onnx(
    model_dir: Path | str | ModelSource,
    variant: str,
    *,
    progress: Callable[[str], None] | None = None,
    recipe: str = DEFAULT_RECIPE,
) -> OnnxArtifact:
    """Export ``model_dir`` (safetensors, config, ``tokenizer.json``) to the ``variant`` artifact.

    Args:
        model_dir: a verified local model folder, or a verified model whose weights stream from
            elsewhere (the refresh's way, from storage: no temporary copy on disk).
        variant: ``fp32`` or ``int8`` (built from the fp32 artifact, calibrated on it).
        progress: called with a short line at each step (export, weights, calibration, quantization).
        recipe: the int8 recipe, a key of :data:`RECIPES` (benchmarks compare them).

    Raises:
        ValueError: unknown variant or recipe (a programming error).
        UnsafeModelError: the folder has no safetensors, no question-answering head, no
            ``tokenizer.json``, or the exporter cannot trace the model.
        IntegrityError: (a streamed source) a weights file is malformed or does not verify.
    """
    if variant not in ARTIFACT_VARIANTS:
        raise ValueError(f"unknown ONNX variant {variant!r}; expected one of {ARTIFACT_VARIANTS}")
    if recipe not in RECIPES:
        raise ValueError(f"unknown int8 recipe {recipe!r}")
    say = progress or (lambda line: log.info("%s", line))
    if isinstance(model_dir, ModelSource):
        source, fp32 = model_dir, build_fp32(model_dir, say)
    else:
        source = ModelSource.from_dir(Path(model_dir))
        try:
            fp32 = build_fp32(source, say)
        except IntegrityError as err:  # a local file that is not a readable checkpoint
            raise UnsafeModelError(f"{source.where}: {err.message}") from err
    if variant == "fp32":
        return fp32
    return build_int8(fp32, source.files["tokenizer.json"], recipe=recipe, progress=say)


def build_fp32(source: ModelSource, say: Callable[[str], None], *, place: Place | None = None) -> OnnxArtifact:
    """The fp32 artifact of ``source``: the graph exported over placeholder weights, ``weights.bin``
    written from the streamed checkpoint (or, when that cannot be traced, the real-weights export).
    With ``place``, the export over placeholders hands each tensor of ``weights.bin`` to it as it
    arrives and keeps none (``placed_weights``); the real-weights export keeps ``weights.bin`` in
    ``files`` whatever ``place`` is.

    Raises:
        UnsafeModelError: as :func:`build_onnx`.
    """
    from ..engine.torch_model import question_answering_config, tokenizer_spec_from_files

    if "tokenizer.json" not in source.files:
        raise UnsafeModelError(f"{source.where} has no tokenizer.json; the ONNX path reads the tokenizer from it alone")
    if not source.weights:
        raise UnsafeModelError(f"{source.where} has no safetensors weights to export")
    model_class, config, config_dict = question_answering_config(source.files)
    check_vocabulary(source.files, config_dict, where=source.where)
    spec = tokenizer_spec_from_files(source.files)
    try:
        graph, weights, facts, model_type, opset = _export_over_placeholders(model_class, config, spec, source, say, place)
        how = "placeholder weights, checkpoint streamed into weights.bin"
    except _NotTraceable as err:
        log.info("The export over placeholder weights cannot be traced back to the checkpoint (%s): exporting with the weights loaded", err)
        say(f"exporting with the weights loaded ({err})")
        graph, weights, facts, model_type, opset = _export_with_weights(model_class, config, spec, source, say)
        how = "weights loaded into torch"
    record: dict[str, Any] = {
        "format": ARTIFACT_FORMAT,
        "variant": "fp32",
        "recipe": "fp32 export, exact rewrites only",
        "export": how,
        "model_type": model_type,
        "opset": opset,
        **facts,
        "output_names": list(OUTPUT_NAMES),
        "versions": _versions(),
        "cpu": cpu_facts(),
    }
    if isinstance(weights, int):
        say(f"fp32 artifact: graph {len(graph) / 1e6:.1f} MB, weights {weights / 1e6:.1f} MB (placed as they arrived)")
        return OnnxArtifact(files={MODEL_FILE: graph}, record=record, placed_weights=weights)
    say(f"fp32 artifact: graph {len(graph) / 1e6:.1f} MB, weights {len(weights) / 1e6:.1f} MB")
    return OnnxArtifact(files={MODEL_FILE: graph, WEIGHTS_FILE: weights}, record=record)


def build_int8(
    fp32: OnnxArtifact | StreamedArtifact,
    tokenizer_json: bytes | bytearray,
    *,
    recipe: str = DEFAULT_RECIPE,
    progress: Callable[[str], None] | None = None,
) -> OnnxArtifact:
    """The int8 artifact of an fp32 one: activation ranges calibrated by running the fp32 graph in
    ONNX Runtime over its own weights (no copy of them), then the weights quantized one at a time.

    An :class:`OnnxArtifact`'s ``weights.bin`` must be a writable buffer (``bytearray`` or ``mmap``)
    that nothing reads afterwards: the pages of each fp32 weight are handed back to the system as
    soon as it is rewritten, so the build holds about one copy of the fp32 weights, not them and
    the int8 ones. A :class:`StreamedArtifact` whose graph can be cut into parts
    (:func:`~shared.engine.onnx_parts.split_graph`) is read twice instead and never held whole:
    once for the calibration, run one part at a time as the weights arrive, once for the
    quantization, each tensor as it arrives (the build holds the int8 weights and a window of the
    fp32 ones); the ranges, and so the artifact, are the same.

    Raises:
        UnsafeModelError: the calibration text cannot be run through the model.
        IntegrityError, StorageUnavailableError: (streamed) the fp32 weights could not be read.
    """
    from ..engine.onnx_parts import split_graph
    from ..engine.onnx_runner import part_size, tokenizer_spec

    say = progress or (lambda line: log.info("%s", line))
    chosen = RECIPES[recipe]
    graph = bytes(fp32.graph if isinstance(fp32, StreamedArtifact) else fp32.files[MODEL_FILE])
    spec = tokenizer_spec(fp32.record, tokenizer_json)
    parts = split_graph(graph, part_bytes=part_size(fp32.size, 16)) if isinstance(fp32, StreamedArtifact) else None
    weights: Any = None
    if isinstance(fp32, StreamedArtifact) and parts is None:
        say("reading the fp32 artifact back for int8 (its graph cannot be run part by part)")
        weights = bytearray(fp32.size)
        fp32.stream(_Into(weights))
    elif not isinstance(fp32, StreamedArtifact):
        weights = fp32.files[WEIGHTS_FILE]
    say("calibrating activation scales with the fp32 artifact" + (f", {len(parts)} parts as its weights stream in" if parts else ""))
    try:
        if parts is not None:
            assert isinstance(fp32, StreamedArtifact)
            ranges, windows = calibrate_by_parts(graph, parts, fp32.size, fp32.stream, spec, fp32.record)
        else:
            ranges, windows = calibrate(graph, weights, spec, fp32.record)
    except (IntegrityError, StorageUnavailableError):
        raise  # reading the fp32 weights, not the model
    except Exception as err:  # the model cannot run the project's text: a reason to record, not a crash
        log.info("int8 calibration failed", exc_info=True)
        raise UnsafeModelError(
            f"int8 calibration failed: the model cannot answer the calibration text ({type(err).__name__}: {err})"
        ) from err
    say(f"quantizing ({chosen.name})")
    if parts is not None:
        assert isinstance(fp32, StreamedArtifact)
        largest = max((t.length for t in external_initializers(graph)), default=0)
        streamed = StreamedWeights(fp32.size, fp32.stream, window=max(256 << 20, largest + (16 << 20)))
        try:
            int8_graph, int8_weights, quantized = quantize(graph, streamed.buffer, ranges, chosen, release=True, streamed=streamed)
            streamed.finish()  # every byte arrived and verified: only then is the result used
        finally:
            streamed.stop()
    else:
        int8_graph, int8_weights, quantized = quantize(graph, weights, ranges, chosen, release=True)
    record = {
        **fp32.record,
        "variant": "int8",
        "recipe": chosen.name,
        "recipe_details": {**asdict(chosen), "quantized_matmuls": quantized, "activation_scales": "static, min/max"},
        "calibration": calibration_facts(windows),
        # torch and transformers made the fp32 graph this one rewrites: its record names them
        "versions": {**fp32.record.get("versions", {}), **_quantizer_versions()},
        "cpu": cpu_facts(),
    }
    say(f"int8 artifact: graph {len(int8_graph) / 1e6:.1f} MB, weights {len(int8_weights) / 1e6:.1f} MB")
    return OnnxArtifact(files={MODEL_FILE: int8_graph, WEIGHTS_FILE: int8_weights}, record=record)


class _Into:
    """A sink that writes a stream's bytes, in order, into a buffer of their size."""

    def __init__(self, buffer: bytearray) -> None:
        self.buffer, self.at = buffer, 0

    def __call__(self, chunk: memoryview) -> None:
        data = memoryview(chunk).cast("B")
        self.buffer[self.at : self.at + len(data)] = data
        self.at += len(data)

    def restart(self) -> None:
        self.at = 0


# --- the export over placeholder weights -----------------------------------------------------------


class _NotTraceable(Exception):
    """The placeholder export cannot be traced back to the checkpoint: use the real weights."""


@dataclass(frozen=True)
class _Placeholder:
    """A checkpoint tensor's stand-in: a vector over its first dimension, broadcast to its shape."""

    tensor: StoredTensor
    value: Any  # the torch tensor given to transformers
    start: int  # address range of the vector
    end: int


def _placeholders(source: ModelSource, base: float) -> dict[str, _Placeholder]:
    """One stand-in per floating checkpoint tensor, its values unique to it (so the exporter never
    merges two as duplicates): ``base * (k + 1) + row``."""
    import torch

    stand_ins: dict[str, _Placeholder] = {}
    for weight_file in source.weights:
        for tensor in parse_header(weight_file.header, name=weight_file.name):
            if tensor.dtype not in ("F32", "F16", "BF16", "F64"):
                continue  # integer buffers: transformers' own values, checked as constants below
            rows = tensor.shape[0] if tensor.shape else 1
            vector = torch.arange(rows, dtype=torch.float32) + base * (len(stand_ins) + 1)
            value = vector.reshape(rows, *([1] * (len(tensor.shape) - 1))).expand(tensor.shape) if tensor.shape else vector[0]
            start = vector.data_ptr()
            stand_ins[tensor.key] = _Placeholder(tensor, value, start, start + vector.nbytes)
    return stand_ins


def _placeholder_model(model_class: Any, config: Any, stand_ins: dict[str, _Placeholder]) -> Any:
    """The model with every parameter a view of its stand-in, as transformers maps checkpoint keys
    to parameters (prefixes, renames, tied weights).

    Raises:
        _NotTraceable: a parameter is missing from the checkpoint, or not a plain view of one stand-in.
    """
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with _quiet("transformers"):
        model, info = model_class.from_pretrained(
            None, config=config, state_dict={k: p.value for k, p in stand_ins.items()}, dtype=torch.float32, output_loading_info=True
        )
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise _NotTraceable(f"transformers does not find every weight in the checkpoint ({sorted(info.get('missing_keys') or [])[:3]})")
    spans = sorted((p.start, p.end) for p in stand_ins.values())
    for name, parameter in model.named_parameters():
        at = bisect.bisect_right(spans, (parameter.data_ptr(), float("inf"))) - 1
        if at < 0 or not spans[at][0] <= parameter.data_ptr() < spans[at][1]:
            raise _NotTraceable(f"parameter {name} is not a checkpoint tensor as it is")
    return model.eval()


def _export_over_placeholders(
    model_class: Any, config: Any, spec: Any, source: ModelSource, say: Callable[[str], None], place: Place | None = None
) -> tuple[bytes, bytearray | int, dict[str, Any], str, int]:
    """Export the model over stand-ins, trace each initializer back to its checkpoint tensor, and
    write ``weights.bin`` from the streamed checkpoint.

    Raises:
        _NotTraceable: an initializer cannot be traced (see the module's docstring).
        UnsafeModelError: the exporter cannot trace the model.
    """
    stand_ins = _placeholders(source, base=1000.0)
    model = _placeholder_model(model_class, config, stand_ins)
    facts = _serving_facts(model, spec)
    model_type = model.config.model_type
    say(f"exporting {model_type} to ONNX over placeholder weights ({', '.join(facts['input_names'])})")
    ir_model = _export(model, facts["input_names"], max_seq_len=facts["max_seq_len"])
    del model
    plan, constants = _trace(ir_model, stand_ins)
    if constants:
        # constants the exporter computed: the same again over other stand-in values, or they came from a weight
        say("checking the exported constants against a second export")
        other_stand_ins = _placeholders(source, base=7000.0)
        other = _export(_placeholder_model(model_class, config, other_stand_ins), facts["input_names"], max_seq_len=facts["max_seq_len"])
        _, other_constants = _trace(other, other_stand_ins)
        changed = sorted(n for n, a in constants.items() if n not in other_constants or not np.array_equal(a, other_constants[n]))
        del other, other_stand_ins, other_constants
        if changed:
            raise _NotTraceable(f"the exporter computed {len(changed)} constant(s) from the weights, e.g. {changed[0]}")
    del stand_ins
    gc.collect()
    say("writing weights.bin from the checkpoint as it streams in")
    weights = _write_weights(ir_model, plan, source, place)
    graph, opset = _serialize(ir_model)
    del ir_model
    release_memory()
    return graph, weights, facts, model_type, opset


@dataclass(frozen=True)
class _Use:
    """An initializer made of one checkpoint tensor: ``transposed`` or as it is."""

    initializer: str
    key: str
    transposed: bool


def _trace(ir_model: Any, stand_ins: dict[str, _Placeholder]) -> tuple[dict[str, list[_Use]], dict[str, np.ndarray]]:
    """Which checkpoint tensor each initializer is (by the stand-in memory it points into and its
    strides), and the floating-point constants that are none (to compare across exports).

    Returns:
        ({checkpoint key: its uses}, {initializer: floating constant})

    Raises:
        _NotTraceable: an initializer points into a stand-in in another layout than as it is or transposed.
    """
    spans = sorted((p.start, p.end, key) for key, p in stand_ins.items())
    starts = [span[0] for span in spans]
    plan: dict[str, list[_Use]] = collections.defaultdict(list)
    constants: dict[str, np.ndarray] = {}
    for name, value in ir_model.graph.initializers.items():
        tensor = value.const_value
        raw: Any = getattr(tensor, "raw", None)
        if hasattr(raw, "data_ptr"):
            address, shape = raw.data_ptr(), tuple(raw.shape)
            strides = tuple(s * raw.element_size() for s in raw.stride())
        elif isinstance(raw, np.ndarray):
            address, shape, strides = raw.__array_interface__["data"][0], raw.shape, raw.strides
        else:
            array = tensor.numpy()
            address, shape, strides = array.__array_interface__["data"][0], array.shape, array.strides
        at = bisect.bisect_right(starts, address) - 1
        if at >= 0 and address < spans[at][1]:
            key = spans[at][2]
            stored = stand_ins[key].tensor.shape
            row = (4,) + (0,) * (len(stored) - 1) if stored else ()
            if shape == stored and (strides == row or stored[0] == 1 or not stored):
                plan[key].append(_Use(name, key, transposed=False))
            elif len(stored) == 2 and shape == stored[::-1] and (strides == row[::-1] or stored[0] == 1):
                plan[key].append(_Use(name, key, transposed=True))
            else:
                raise _NotTraceable(f"initializer {name} is checkpoint tensor {key} rearranged (shape {shape})")
            continue
        array = tensor.numpy()
        if np.issubdtype(array.dtype, np.floating):
            constants[name] = np.array(array, copy=True)
    return dict(plan), constants


def _write_weights(ir_model: Any, plan: dict[str, list[_Use]], source: ModelSource, place: Place | None = None) -> bytearray | int:
    """Stream every checkpoint file; each tensor, as it completes, goes into ``weights.bin`` (or
    into the graph when it is small) for every initializer made of it, then is dropped. The other
    large initializers (constants of the graph) follow. ``weights.bin`` is laid out in the order
    the graph's nodes first read its tensors (:class:`WeightsLayout`), whatever order the
    checkpoint streams them in. With ``place`` each tensor goes there instead and the size of
    ``weights.bin`` is returned.

    Raises:
        _NotTraceable: an initializer's checkpoint tensor never arrived.
        IntegrityError: a checkpoint file is malformed or does not verify.
    """
    import onnx_ir as ir

    initializers = ir_model.graph.initializers
    first_use = {name: len(initializers) + index for index, name in enumerate(initializers)}  # unread ones last
    for index, node in enumerate(ir_model.graph):
        for value in node.inputs:
            if value is not None and value.name in first_use:
                first_use[value.name] = min(first_use[value.name], index)
    large = [name for name, v in initializers.items() if v.const_value is not None and v.const_value.nbytes >= EXTERNAL_MIN_BYTES]
    layout = WeightsLayout([(name, initializers[name].const_value.nbytes) for name in sorted(large, key=first_use.__getitem__)], place)
    written: set[str] = set()

    def put(name: str, array: np.ndarray) -> None:
        value = initializers[name]
        old = value.const_value
        if name not in layout.offsets:
            value.const_value = ir.Tensor(np.ascontiguousarray(array), name=name)
        else:
            offset, length = layout.put(name, array)
            value.const_value = ir.ExternalTensor(WEIGHTS_FILE, offset, length, old.dtype, shape=old.shape, name=name, base_dir="")
        written.add(name)

    def on_tensor(key: str, array: np.ndarray) -> None:
        for use in plan.get(key, ()):
            put(use.initializer, array.astype(np.float32, copy=False).T if use.transposed else array.astype(np.float32, copy=False))

    for weight_file in source.weights:
        stream = TensorStream(weight_file.name, on_tensor, header=weight_file.header)

        def restart(stream: TensorStream = stream) -> None:
            for key in stream.delivered:  # the file changed while it was read: its tensors come again
                for use in plan.get(key, ()):
                    written.discard(use.initializer)
            stream.restart()

        with large_blocks_mapped():  # each tensor's memory goes back to the system when it is dropped
            weight_file.stream(stream, restart)
        stream.check_complete()
    missing = sorted(use.initializer for uses in plan.values() for use in uses if use.initializer not in written)
    if missing:
        raise _NotTraceable(f"initializer {missing[0]} has no tensor in the checkpoint")
    for name in large:
        if name not in written:
            put(name, initializers[name].const_value.numpy())
    return layout.size if place is not None else layout.buffer


def _serialize(ir_model: Any) -> tuple[bytes, int]:
    import onnx_ir as ir

    for node in ir_model.graph:
        node.metadata_props.clear()  # the exporter's FX provenance: megabytes nobody reads at serving
    proto = ir.serde.serialize_model(ir_model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return proto.SerializeToString(), int(opset)


# --- the export with the weights loaded (models the placeholders cannot trace) ---------------------


def _export_with_weights(
    model_class: Any, config: Any, spec: Any, source: ModelSource, say: Callable[[str], None]
) -> tuple[bytes, bytearray, dict[str, Any], str, int]:
    """The way before placeholders: the checkpoint streamed into torch tensors of their own, the
    model built on them, exported, and each weight freed as it moves into ``weights.bin`` (about
    one copy of the weights at a time, plus the exporter's working memory)."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..engine.torch_model import SafetensorsStream

    state_dict: dict[str, Any] = {}
    for weight_file in source.weights:
        stream = SafetensorsStream(weight_file.name)
        weight_file.stream(stream, stream.restart)
        stream.check_complete()
        state_dict.update(stream.tensors)
        del stream
    hf_logging.disable_progress_bar()
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.float32).eval()
    state_dict.clear()
    facts = _serving_facts(model, spec)
    owners = _rehome(model)
    model_type = model.config.model_type
    say(f"exporting {model_type} to ONNX ({', '.join(facts['input_names'])})")
    ir_model = _export(model, facts["input_names"], max_seq_len=facts["max_seq_len"])
    del model
    gc.collect()
    say("packing the weights into weights.bin")
    graph, weights, opset = _pack_ir(ir_model, owners)
    del owners, ir_model
    release_memory()
    return graph, weights, facts, model_type, opset


def _rehome(model: Any) -> list[tuple[int, int, mmap.mmap]]:
    """Move every parameter and buffer of ``model`` into an anonymous memory map of its own.

    The exporter's initializers are these tensors or numpy views of them (a transposed weight
    is a view), referenced from places the export leaves behind; a memory map's pages can be
    handed back to the system with ``madvise`` whoever still refers to them, so
    :func:`_pack_ir` frees each weight as soon as it is in ``weights.bin``.

    Returns:
        (first address, end address, map) of every tensor moved.
    """
    import torch

    moved: dict[int, Any] = {}
    owners = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or tensor.nbytes < EXTERNAL_MIN_BYTES or not tensor.is_contiguous():
                    continue
                if tensor.data_ptr() not in moved:
                    memory = mmap.mmap(-1, tensor.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                    home = torch.frombuffer(memory, dtype=tensor.dtype, count=tensor.numel()).reshape(tensor.shape)
                    home.copy_(tensor.detach())
                    moved[tensor.data_ptr()] = home
                    owners.append((home.data_ptr(), home.data_ptr() + home.nbytes, memory))
                home = moved[tensor.data_ptr()]
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = home
                else:
                    table[name] = home
    return owners


def _serving_facts(model: Any, spec: Any) -> dict[str, Any]:
    """What the runner needs besides the graph, as the torch engine would compute it."""
    from ..engine.torch_model import TorchRunner

    max_seq_len = min(spec.model_max_length, MAX_SEQ_LEN)
    return {
        "input_names": [n for n in TorchRunner(model).input_names if n in spec.input_names or n == "token_type_ids"],
        "max_seq_len": max_seq_len,
        "doc_stride": min(max_seq_len // 2, DOC_STRIDE),
        "cls_token_id": spec.cls_token_id,
        "pad_token_id": spec.pad_token_id,
    }


def _export(model: Any, input_names: Sequence[str], *, max_seq_len: int) -> Any:
    """The model as an ``onnx_ir.Model`` with dynamic (batch, sequence) inputs."""
    import torch

    sequence = max(2, min(16, max_seq_len - 1))
    ids = torch.ones((2, sequence), dtype=torch.long)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    kwargs = {name: example[name] for name in input_names}
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    sequence_dim = torch.export.Dim("sequence", min=2, max=max_seq_len)
    try:
        with _quiet("torch.onnx", "torch._export", "torch.export", "onnxscript", "onnx_ir"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecations inside torch.export, not ours to act on
            program = torch.onnx.export(
                model,
                (),
                kwargs=kwargs,
                dynamo=True,
                external_data=True,
                dynamic_shapes={name: {0: batch_dim, 1: sequence_dim} for name in input_names},
                input_names=list(input_names),
                output_names=list(OUTPUT_NAMES),
                optimize=True,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; all mean "cannot export this model"
        log.info("ONNX export failed", exc_info=True)
        raise UnsafeModelError(f"the model cannot be exported to ONNX ({type(err).__name__})") from err
    if program is None:
        raise UnsafeModelError("the ONNX exporter returned no program")
    _release_rewriter_state()
    return program.model


def _release_rewriter_state() -> None:
    """Forget the graph onnxscript's pattern matchers saw last.

    The exporter's rewrite rules are module-level objects whose matchers keep the last graph
    they matched, and through it every exported weight (1.3 GB for bert-large) for the life of
    the process. Their state is per match, so clearing it after the export is safe.
    """
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:  # a future onnxscript: nothing known to clear
        return
    with warnings.catch_warnings():
        # isinstance() on every live object touches torch.distributed's deprecated reduce_op
        # class, whose check warns (FutureWarning) into the user's terminal on every export
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op", category=FutureWarning)
        for obj in gc.get_objects():
            if isinstance(obj, PatternMatcher):
                for attribute in ("_graph", "_match", "_current_node", "_tracer"):
                    if attribute in vars(obj):
                        setattr(obj, attribute, None)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The exporter logs a line per missing optional package (torchvision ops) and per graph
    pass at INFO: noise in a refresh's log."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --- packing: graph + weights.bin --------------------------------------------------------------


def _pack_ir(ir_model: Any, owners: Sequence[tuple[int, int, mmap.mmap]] = ()) -> tuple[bytes, bytearray, int]:
    """Serialize an ``onnx_ir.Model``: initializers move one at a time into ``weights.bin``.

    ``owners`` are the memory maps holding the model's tensors (:func:`_rehome`): once every
    initializer over one of them is copied, its pages are released, so the peak stays near one
    copy of the weights instead of two.
    """
    import onnx_ir as ir

    graph = ir_model.graph
    values = [v for v in graph.initializers.values() if v.const_value.nbytes >= EXTERNAL_MIN_BYTES]
    spans = sorted((start, end, index) for index, (start, end, _) in enumerate(owners))
    starts = [span[0] for span in spans]

    def owner_of(tensor: Any) -> int | None:
        raw: Any = getattr(tensor, "raw", None)
        if hasattr(raw, "data_ptr"):
            address = raw.data_ptr()
        elif isinstance(raw, np.ndarray):
            address = raw.__array_interface__["data"][0]
        else:
            return None
        at = bisect.bisect_right(starts, address) - 1
        return spans[at][2] if at >= 0 and address < spans[at][1] else None

    uses = [owner_of(v.const_value) for v in values]
    remaining = collections.Counter(u for u in uses if u is not None)
    writer = WeightsWriter()
    for index, value in enumerate(values):
        tensor = value.const_value
        offset, length = writer.put(tensor.numpy())
        value.const_value = ir.ExternalTensor(WEIGHTS_FILE, offset, length, tensor.dtype, shape=tensor.shape, name=value.name, base_dir="")
        del tensor
        owner = uses[index]
        if owner is not None:
            remaining[owner] -= 1
            if remaining[owner] == 0:
                owners[owner][2].madvise(mmap.MADV_DONTNEED)  # nothing reads the torch model again
    for node in graph:
        node.metadata_props.clear()  # the exporter's FX provenance: megabytes nobody reads at serving
    proto = ir.serde.serialize_model(ir_model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return proto.SerializeToString(), writer.buffer, int(opset)


# --- facts -------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import onnxscript
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxscript": onnxscript.__version__,
        **_quantizer_versions(),
    }


def _quantizer_versions() -> dict[str, str]:
    """What the int8 build runs (it needs neither torch nor transformers)."""
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
