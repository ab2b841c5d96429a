"""Build the ONNX serving artifacts of a verified model folder: ``fp32`` and ``int8``.

``fp32`` is the model's ``AutoModelForQuestionAnswering`` exported by ``torch.onnx.export``
(dynamo) with dynamic batch and sequence axes; only the exporter's own exact rewrites (constant
folding, dead code) are applied, so spans stay those of the torch engine. ``int8`` is that graph
quantized by this module, one initializer at a time, with no temporary file: the weights of the
chosen MatMuls become per-channel symmetric int8, their activations are quantized with STATIC
scales calibrated on ``shared/calibration.json`` (text written for this project), so an item's
answer never depends on what else is in its batch.

An artifact is two files: ``model.onnx`` (the graph; every initializer points into
``weights.bin`` as external data) and ``weights.bin``, plus a JSON record of what serving needs
and what the artifact was built from. Building needs torch and transformers; serving
(:mod:`shared.onnx_runner`) needs neither.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import gc
import hashlib
import json
import logging
import mmap
import platform
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnsafeModelError
from .memory import release_memory

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
OUTPUT_NAMES = ("start_logits", "end_logits")
VARIANTS = ("fp32", "int8")
MAX_SEQ_LEN = 384
DOC_STRIDE = 128
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
_ALIGN = 64  # every tensor in weights.bin starts on a cache line (and an AVX-512 register)
# Smaller tensors (shape constants, scales, zero points) stay in the graph: ONNX Runtime's shape
# inference must read them before the external data is attached.
EXTERNAL_MIN_BYTES = 1024
_MIN_QUANTIZED_COLUMNS = 16  # the span head (2 columns) stays fp32: it is tiny and decides the answer
_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


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
    )
}
# Chosen by bench/quality.py and bench/artifacts.py (README, "ONNX serving artifacts"): on all
# 5,609 SQuAD part-B questions it loses 0.81 F1 against fp32 (95% interval 0.30-1.33) with 85.7%
# of answers identical, and bert-large serves in about 0.6 GiB. Keeping the FFN outputs in fp32
# loses less (0.73 F1, 89.9% identical) but its 733 MB of weights serve in just over 1 GiB.
DEFAULT_RECIPE = "per-channel, all int8, static"


@dataclass
class OnnxArtifact:
    """The files of one artifact and its record.

    ``files`` is exactly ``{"model.onnx": graph, "weights.bin": weights}``; ``record`` is JSON-able.
    """

    files: dict[str, bytes | bytearray]
    record: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(len(data) for data in self.files.values())


@dataclass
class InMemoryModel:
    """A verified version held in memory: its small files by name (config, tokenizer) and its
    weights as a state dict whose tensors each own their memory (``SafetensorsStream``)."""

    files: dict[str, bytearray]
    state_dict: dict[str, Any]


def build_onnx(
    model_dir: Path | str | InMemoryModel,
    variant: str,
    *,
    progress: Callable[[str], None] | None = None,
    recipe: str = DEFAULT_RECIPE,
) -> OnnxArtifact:
    """Export ``model_dir`` (safetensors, config, ``tokenizer.json``) to the ``variant`` artifact.

    Args:
        model_dir: a verified local model folder, or a verified version in memory (the
            refresh's way: no temporary copy on disk); its state dict is emptied into the model,
            so that each weight is freed once the export moved it elsewhere.
        variant: ``fp32`` or ``int8``.
        progress: called with a short line at each step (export, calibration, quantization).
        recipe: the int8 recipe, a key of :data:`RECIPES` (benchmarks compare them).

    Raises:
        ValueError: unknown variant or recipe (a programming error).
        UnsafeModelError: the folder has no safetensors, no question-answering head, no
            ``tokenizer.json``, or the exporter cannot trace the model.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ONNX variant {variant!r}; expected one of {VARIANTS}")
    if recipe not in RECIPES:
        raise ValueError(f"unknown int8 recipe {recipe!r}")
    say = progress or (lambda line: log.info("%s", line))
    if isinstance(model_dir, InMemoryModel):
        say("loading the model from memory for export")
        model, spec = _load_files(model_dir)
    else:
        model_dir = Path(model_dir)
        say(f"loading {model_dir.name} for export")
        model, spec, _ = _load(model_dir)
    facts = _serving_facts(model, spec)
    owners = _rehome(model)
    linear_ranges: dict[str, tuple[float, float]] = {}
    windows = 0
    if variant == "int8":
        say(f"calibrating activation scales on {CALIBRATION_FILE.name}")
        linear_ranges, windows = calibrate(model, spec, facts)
    say(f"exporting {model.config.model_type} to ONNX ({', '.join(facts['input_names'])})")
    ir_model = _export(model, facts["input_names"], max_seq_len=facts["max_seq_len"])
    model_type = model.config.model_type
    del model
    gc.collect()
    linear_inputs = _linear_inputs(ir_model)
    say("packing the weights into weights.bin")
    graph, weights, opset = _pack_ir(ir_model, owners)
    del owners
    del ir_model
    release_memory()
    record: dict[str, Any] = {
        "format": ARTIFACT_FORMAT,
        "variant": "fp32",
        "recipe": "fp32 export, exact rewrites only",
        "model_type": model_type,
        "opset": opset,
        **facts,
        "output_names": list(OUTPUT_NAMES),
        "versions": _versions(),
        "cpu": cpu_facts(),
    }
    if variant == "int8":
        chosen = RECIPES[recipe]
        ranges = {name: linear_ranges[module] for name, module in linear_inputs.items() if module in linear_ranges}
        say(f"quantizing ({chosen.name})")
        graph, weights, quantized = quantize(graph, weights, ranges, chosen)
        record.update(
            variant="int8",
            recipe=chosen.name,
            recipe_details={**asdict(chosen), "quantized_matmuls": quantized, "activation_scales": "static, min/max"},
            calibration=_calibration_facts(windows),
        )
    say(f"{variant} artifact: graph {len(graph) / 1e6:.1f} MB, weights {len(weights) / 1e6:.1f} MB")
    return OnnxArtifact(files={MODEL_FILE: graph, WEIGHTS_FILE: weights}, record=record)


# --- loading and export ------------------------------------------------------------------------


def _load(model_dir: Path) -> tuple[Any, Any, bytes]:
    """The fp32 torch model, its tokenizer spec and ``tokenizer.json`` of a local folder.

    Each weight is read into memory of its own (plain reads, no memory map), so that the
    export can free them one by one as they move into ``weights.bin``.
    """
    import torch
    from transformers import CONFIG_MAPPING, MODEL_FOR_QUESTION_ANSWERING_MAPPING
    from transformers.utils import logging as hf_logging

    from .model_loader import _tokenizer_spec

    weight_files = sorted(model_dir.glob("*.safetensors"))
    if not weight_files:
        raise UnsafeModelError(f"{model_dir} has no safetensors weights to export")
    if not (model_dir / "tokenizer.json").is_file():
        raise UnsafeModelError(f"{model_dir} has no tokenizer.json; the ONNX path reads the tokenizer from it alone")
    small = {
        path.name: bytearray(path.read_bytes())
        for path in model_dir.iterdir()
        if path.is_file() and path.suffix in (".json", ".txt") and path.stat().st_size < 64 << 20
    }
    try:
        config_dict = json.loads(bytes(small["config.json"]))
        config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    except (KeyError, ValueError) as err:
        raise UnsafeModelError("config.json has no known model_type for transformers") from err
    model_class: Any = MODEL_FOR_QUESTION_ANSWERING_MAPPING.get(type(config), None)
    if model_class is None:
        raise UnsafeModelError(f"transformers has no question-answering head for model type {config.model_type!r}")
    state_dict: dict[str, Any] = {}
    for path in weight_files:
        state_dict.update(_read_safetensors(path))
    hf_logging.disable_progress_bar()
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.float32)
    del state_dict
    return model.eval(), _tokenizer_spec(small), bytes(small["tokenizer.json"])


def _load_files(source: InMemoryModel) -> tuple[Any, Any]:
    """The fp32 torch model and tokenizer spec of a version in memory."""
    from .model_loader import _tokenizer_spec, model_from_files

    if "tokenizer.json" not in source.files:
        raise UnsafeModelError("the version has no tokenizer.json; the ONNX path reads the tokenizer from it alone")
    return model_from_files(source.files, state_dict=source.state_dict), _tokenizer_spec(source.files)


def _read_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of a ``.safetensors`` file, each in a torch storage of its own (which
    :func:`_pack_ir` can free as soon as the tensor is in ``weights.bin``).

    Raises:
        UnsafeModelError: the header is malformed, names an unsupported dtype, or the file ends early.
    """
    from .errors import IntegrityError
    from .model_loader import SafetensorsStream

    stream = SafetensorsStream(path.name)
    try:
        with path.open("rb") as file:
            while block := file.read(8 << 20):
                stream(memoryview(block))
        stream.check_complete()
    except IntegrityError as err:
        raise UnsafeModelError(err.message) from err
    return stream.tensors


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
    from .question_answering import TorchRunner

    max_seq_len = min(spec.model_max_length, MAX_SEQ_LEN)
    return {
        "input_names": [n for n in TorchRunner(model).input_names if n in spec.input_names],
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


class _WeightsWriter:
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
    writer = _WeightsWriter()
    for index, value in enumerate(values):
        tensor = value.const_value
        offset, length = writer.put(tensor.numpy())
        value.const_value = ir.ExternalTensor(
            WEIGHTS_FILE, offset, length, tensor.dtype, shape=tensor.shape, name=value.name, base_dir=""
        )
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


# --- int8: calibration -------------------------------------------------------------------------


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
    from .question_answering import QAItem

    doc = json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))
    items = [QAItem(question=p["question"], context=p["context"]) for p in doc["pairs"]]
    joined = " ".join(dict.fromkeys(p["context"] for p in doc["pairs"]))
    items += [QAItem(question=q, context=joined) for q in doc["long_questions"]]
    return items


def calibrate(model: Any, spec: Any, facts: Mapping[str, Any]) -> tuple[dict[str, tuple[float, float]], int]:
    """Min/max of the input of every ``nn.Linear`` over the calibration windows, in fp32 torch.

    The windows are those the serving engine makes (same tokenizer, geometry and code), run
    one at a time so that no padding enters the ranges. The exported MatMuls compute the same
    fp32 values, so these ranges are theirs (:func:`_linear_inputs` maps one to the other);
    calibrating before the export needs no second copy of the weights in an ONNX session.

    Returns:
        ({Linear module path: (min, max)}, number of windows seen)
    """
    import torch

    from .question_answering import Limits, QAEngine, TorchRunner

    ranges: dict[str, tuple[float, float]] = {}
    seen = {"windows": 0}

    def observe(path: str) -> Callable[..., None]:
        def hook(_module: Any, inputs: tuple[Any, ...]) -> None:
            low, high = float(inputs[0].min()), float(inputs[0].max())
            old = ranges.get(path, (low, high))
            ranges[path] = (min(old[0], low), max(old[1], high))

        return hook

    def count(_module: Any, inputs: tuple[Any, ...]) -> None:
        seen["windows"] += 1

    handles = [m.register_forward_pre_hook(observe(path)) for path, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    handles.append(model.register_forward_pre_hook(count))
    try:
        engine = QAEngine(
            TorchRunner(model),
            spec,
            limits=Limits(max_windows=1000, max_items=1000),
            batch_windows=1,
            max_seq_len=facts["max_seq_len"],
            doc_stride=facts["doc_stride"],
        )
        for item in calibration_items():
            engine.answer([item])
    finally:
        for handle in handles:
            handle.remove()
    return ranges, seen["windows"]


def _linear_inputs(ir_model: Any) -> dict[str, str]:
    """{input name of a MatMul over a weight: the ``nn.Linear`` it was exported from}, from the
    exporter's provenance metadata (read before :func:`_pack_ir` drops it)."""
    import ast

    found = {}
    for node in ir_model.graph:
        if node.op_type != "MatMul" or not node.inputs[1] or not node.inputs[1].is_initializer():
            continue
        try:
            scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        if len(scopes) >= 2 and node.inputs[0] is not None:
            found[node.inputs[0].name] = scopes[-2]
    return found


def _calibration_facts(windows: int) -> dict[str, Any]:
    raw = CALIBRATION_FILE.read_bytes()
    doc = json.loads(raw)
    return {"file": CALIBRATION_FILE.name, "version": doc["version"], "sha256": hashlib.sha256(raw).hexdigest(), "windows": windows}


# --- int8: quantization ------------------------------------------------------------------------


def quantize(
    graph: bytes, weights: bytearray, ranges: Mapping[str, tuple[float, float]], recipe: Int8Recipe
) -> tuple[bytes, bytearray, int]:
    """The int8 graph and weights: chosen MatMuls become ``MatMulIntegerToFloat`` over int8 weights.

    Each activation is quantized once (``QuantizeLinear``, uint8, its calibrated fixed scale and
    zero point) and shared by the MatMuls that read it. Weights are written one matrix at a
    time into the new buffer: the peak is the fp32 weights plus the int8 ones.

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
    new_tensors: list[tuple[str, np.dtype[Any], tuple[int, ...], Callable[[], np.ndarray]]] = []
    plans: dict[int, tuple[Any, Any]] = {}
    for position, node in _quantizable(proto, recipe).items():
        activation, weight = node.input[0], node.input[1]
        if activation not in ranges:
            continue  # never reached by calibration (an unused branch): leave it fp32
        a_base, w_base = _safe(activation), f"{_safe(weight)}_int8"
        if not any(name == f"{a_base}_scale" for name, *_ in new_tensors):
            low, high = min(ranges[activation][0], 0.0), max(ranges[activation][1], 0.0)
            a_scale = np.array(max(high - low, 1e-8) / 255.0, dtype=np.float32)
            a_zero = np.array(np.clip(round(-low / float(a_scale)), 0, 255), dtype=np.uint8)
            new_tensors.append((f"{a_base}_scale", a_scale.dtype, (), partial(_same, a_scale)))
            new_tensors.append((f"{a_base}_zero_point", a_zero.dtype, (), partial(_same, a_zero)))
        source = views[weight]
        w_scale = _weight_scales(source, recipe.per_channel, weight_limit)
        new_tensors.append((w_base, np.dtype(np.int8), source.shape, partial(_int8_weights, source, w_scale, weight_limit)))
        new_tensors.append((f"{w_base}_scale", w_scale.dtype, w_scale.shape, partial(_same, w_scale)))
        new_tensors.append((f"{w_base}_zero_point", np.dtype(np.int8), w_scale.shape, partial(np.zeros, w_scale.shape, np.int8)))
        quantize_node = helper.make_node(
            "QuantizeLinear", [activation, f"{a_base}_scale", f"{a_base}_zero_point"], [f"{a_base}_quantized"], name=f"{a_base}_quantize"
        )
        matmul = helper.make_node(
            "MatMulIntegerToFloat",
            [f"{a_base}_quantized", w_base, f"{a_base}_scale", f"{w_base}_scale", f"{a_base}_zero_point", f"{w_base}_zero_point"],
            list(node.output),
            name=f"{node.name or w_base}_int8",
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

    # weights: the initializers still used, then the new ones, into a fresh buffer
    used = {name for node in nodes for name in node.input}
    entries: list[tuple[str, np.dtype[Any], tuple[int, ...], Callable[[], np.ndarray]]] = [
        (t.name, np.dtype(views[t.name].dtype), tuple(views[t.name].shape), partial(_same, views[t.name]))
        for t in proto.graph.initializer
        if t.name in used
    ]
    entries += new_tensors
    writer = _WeightsWriter()
    initializers = []
    for name, dtype, shape, make in entries:
        array = make()
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize < EXTERNAL_MIN_BYTES:
            initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype).reshape(shape), name))
            continue
        offset, length = writer.put(array)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        initializers.append(tensor)
        del array
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(initializers)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto.SerializeToString(), writer.buffer, len(plans)


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


# --- facts -------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def cpu_facts() -> dict[str, Any]:
    """The CPU model and the vector-instruction flags that decide int8 and fp32 kernel speed."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {"model": model, "flags": [f for f in _CPU_FLAGS if f in flags]}
