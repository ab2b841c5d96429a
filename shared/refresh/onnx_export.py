"""Build the ONNX serving artifacts of a verified model folder: ``fp32`` and ``int8``.

``fp32`` is the model's ``AutoModelForQuestionAnswering`` exported by ``torch.onnx.export``
(dynamo) with dynamic batch and sequence axes; only the exporter's own exact rewrites (constant
folding, dead code) are applied, so spans stay those of the torch engine. ``int8`` is that graph
quantized by :mod:`shared.refresh.int8` (calibrated on the fp32 torch model before the export, then
one initializer at a time, with no temporary file).

An artifact is two files: ``model.onnx`` (the graph; every initializer points into
``weights.bin`` as external data) and ``weights.bin``, plus a JSON record of what serving needs
and what the artifact was built from. Building needs torch and transformers; serving
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.cpu import cpu_facts
from ..errors import UnsafeModelError
from ..memory import release_memory
from ..settings import ARTIFACT_VARIANTS
from .int8 import CALIBRATION_FILE, DEFAULT_RECIPE, RECIPES, calibrate, calibration_facts, linear_inputs, quantize
from .model_checks import check_vocabulary
from .onnx_weights import EXTERNAL_MIN_BYTES, MODEL_FILE, WEIGHTS_FILE, WeightsWriter

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1
OUTPUT_NAMES = ("start_logits", "end_logits")
MAX_SEQ_LEN = 384
DOC_STRIDE = 128


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
    if variant not in ARTIFACT_VARIANTS:
        raise ValueError(f"unknown ONNX variant {variant!r}; expected one of {ARTIFACT_VARIANTS}")
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
        try:
            linear_ranges, windows = calibrate(model, spec, facts)
        except Exception as err:  # the model cannot run the project's text: a reason to record, not a crash
            log.info("int8 calibration failed", exc_info=True)
            raise UnsafeModelError(
                f"int8 calibration failed: the model cannot answer the calibration text ({type(err).__name__}: {err})"
            ) from err
    say(f"exporting {model.config.model_type} to ONNX ({', '.join(facts['input_names'])})")
    ir_model = _export(model, facts["input_names"], max_seq_len=facts["max_seq_len"])
    model_type = model.config.model_type
    del model
    gc.collect()
    matmul_inputs = linear_inputs(ir_model)
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
        ranges = {name: linear_ranges[module] for name, module in matmul_inputs.items() if module in linear_ranges}
        say(f"quantizing ({chosen.name})")
        graph, weights, quantized = quantize(graph, weights, ranges, chosen)
        record.update(
            variant="int8",
            recipe=chosen.name,
            recipe_details={**asdict(chosen), "quantized_matmuls": quantized, "activation_scales": "static, min/max"},
            calibration=calibration_facts(windows),
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
    from transformers.utils import logging as hf_logging

    from ..engine.torch_model import question_answering_config, tokenizer_spec_from_files

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
    model_class, config, config_dict = question_answering_config(small)
    check_vocabulary(small, config_dict, where=str(model_dir))
    state_dict: dict[str, Any] = {}
    for path in weight_files:
        state_dict.update(_read_safetensors(path))
    hf_logging.disable_progress_bar()
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.float32)
    del state_dict
    return model.eval(), tokenizer_spec_from_files(small), bytes(small["tokenizer.json"])


def _load_files(source: InMemoryModel) -> tuple[Any, Any]:
    """The fp32 torch model and tokenizer spec of a version in memory."""
    from ..engine.torch_model import model_from_files, tokenizer_spec_from_files

    if "tokenizer.json" not in source.files:
        raise UnsafeModelError("the version has no tokenizer.json; the ONNX path reads the tokenizer from it alone")
    return model_from_files(source.files, state_dict=source.state_dict), tokenizer_spec_from_files(source.files)


def _read_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of a ``.safetensors`` file, each in a torch storage of its own (which
    :func:`_pack_ir` can free as soon as the tensor is in ``weights.bin``).

    Raises:
        UnsafeModelError: the header is malformed, names an unsupported dtype, or the file ends early.
    """
    from ..engine.torch_model import SafetensorsStream
    from ..errors import IntegrityError

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
