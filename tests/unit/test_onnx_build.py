"""How the ONNX artifacts are built with one copy of the weights: the export over placeholder weights
gives the same model as the export with the weights loaded, the checkpoint is read as it streams,
and int8 is calibrated on, and quantized out of, the fp32 artifact while its pages are handed back."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest

from shared.engine.onnx_runner import (
    WeightsFileNeeded,
    copied_session,
    default_threads,
    onnx_engine,
    session_options,
    tokenizer_spec,
    weights_shared_session,
)
from shared.engine.question_answering import QAItem
from shared.errors import IntegrityError, UnsafeModelError
from shared.refresh import onnx_export
from shared.refresh.int8 import RECIPES, calibrate, quantize
from shared.refresh.onnx_export import ModelSource, OnnxArtifact, build_fp32, build_int8, build_onnx
from shared.refresh.onnx_weights import MODEL_FILE, WEIGHTS_FILE, TensorStream, initializer_views, parse_header

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "fixtures" / "models"


def _folder(model: str, tmp_path: Path) -> Path:
    """The fixture folder as a version stores it: DeBERTa-v3 ships no tokenizer.json (a version gets the derived one)."""
    source = MODELS / model
    if (source / "tokenizer.json").is_file():
        return source
    from shared.engine.tokenizer_conversion import derive_tokenizer_json

    folder = tmp_path / model
    shutil.copytree(source, folder)
    (folder / "tokenizer.json").write_bytes(derive_tokenizer_json({p.name: p.read_bytes() for p in source.iterdir()}).data)
    return folder


def _logits(artifact: OnnxArtifact, ids: np.ndarray) -> list[np.ndarray]:
    weights = bytearray(artifact.files[WEIGHTS_FILE])
    graph = bytes(artifact.files[MODEL_FILE])
    try:
        session, _holds = weights_shared_session(weights, graph, session_options(threads=1), "test")
    except WeightsFileNeeded:  # DeBERTa-v3: ONNX Runtime folds the relative embeddings' projections, reading weights.bin
        session = copied_session(weights, graph, session_options(threads=1), "test")
    names = [i.name for i in session.get_inputs()]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return list(session.run(["start_logits", "end_logits"], {n: feeds[n] for n in names}))


# bert and deberta-v3 (the plainest graph and the one with the most ops of its own): every family's
# fp32 artifact, exported over placeholders, is checked against the pipeline (test_onnx.py, test_families.py)
@pytest.mark.parametrize("model", ["bert", "deberta-v3"])
def test_the_export_over_placeholders_computes_what_the_export_with_the_weights_does(
    model: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Same graph (node for node) and the same logits, bit for bit, whichever way the weights came."""
    source = _folder(model, tmp_path)
    placeholders = build_onnx(source, "fp32")
    assert placeholders.record["export"].startswith("placeholder weights")

    def refuse(*_args: object) -> None:
        raise onnx_export._NotTraceable("forced by the test")

    monkeypatch.setattr(onnx_export, "_export_over_placeholders", refuse)
    loaded = build_onnx(source, "fp32")
    assert loaded.record["export"] == "weights loaded into torch"
    nodes = [[(n.op_type, n.domain) for n in onnx.load_from_string(bytes(a.files[MODEL_FILE])).graph.node] for a in (placeholders, loaded)]
    assert nodes[0] == nodes[1]
    ids = np.random.default_rng(0).integers(3, 60, size=(3, 24)).astype(np.int64)
    for got, want in zip(_logits(placeholders, ids), _logits(loaded, ids), strict=True):
        assert np.array_equal(got, want)


def test_a_checkpoint_transformers_does_not_load_key_for_key_is_exported_with_its_weights(tmp_path: Path) -> None:
    """A weight missing from the checkpoint (transformers initializes it): placeholders cannot
    say where it comes from, so the build loads the weights, as before."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "bert"
    shutil.copytree(MODELS / "bert", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["qa_outputs.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    built = build_onnx(folder, "fp32")
    assert built.record["export"] == "weights loaded into torch"


def test_a_malformed_checkpoint_in_a_folder_is_refused_as_the_model(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    shutil.copytree(MODELS / "bert", folder)
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UnsafeModelError, match="ends before"):
        build_onnx(folder, "fp32")


# --- the checkpoint as it streams -------------------------------------------------------------------


def _safetensors(tensors: dict[str, tuple[str, np.ndarray]]) -> bytes:
    header, blobs, at = {}, [], 0
    for key, (dtype, array) in tensors.items():
        raw = array.tobytes()
        header[key] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_each_tensor_is_handed_over_as_soon_as_its_bytes_are_in(chunk: int) -> None:
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((5, 3)).astype(np.float32)
    f16 = rng.standard_normal((4,)).astype(np.float16)
    bf16 = (rng.standard_normal((2, 2)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    ints = np.arange(6, dtype=np.int64)
    raw = _safetensors({"a": ("F32", f32), "b": ("F16", f16), "c": ("BF16", bf16), "d": ("I64", ints)})
    got: dict[str, np.ndarray] = {}
    seen_at: dict[str, int] = {}
    fed = {"bytes": 0}

    def take(key: str, array: np.ndarray) -> None:
        got[key] = array
        seen_at[key] = fed["bytes"]

    stream = TensorStream("m.safetensors", take)
    for at in range(0, len(raw), chunk):
        piece = raw[at : at + chunk]
        fed["bytes"] += len(piece)
        stream(memoryview(piece))
    stream.check_complete()
    assert np.array_equal(got["a"], f32) and got["b"].dtype == np.float32 and np.array_equal(got["b"], f16.astype(np.float32))
    assert np.array_equal(got["c"], (bf16.astype(np.uint32) << 16).view(np.float32)) and np.array_equal(got["d"], ints)
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for key, end in {"a": 60, "b": 68, "c": 76, "d": 124}.items():
        assert 0 <= seen_at[key] - (header_end + end) < chunk, key  # handed over with the chunk that completed it


def test_a_stream_that_differs_from_its_header_or_ends_early_is_refused() -> None:
    raw = _safetensors({"a": ("F32", np.ones((4, 4), np.float32))})
    header = raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]]
    other = _safetensors({"a": ("F32", np.ones((2, 8), np.float32))})
    with pytest.raises(IntegrityError, match="header changed"):
        TensorStream("m", lambda *_: None, header=header)(memoryview(other))
    short = TensorStream("m", lambda *_: None, header=header)
    short(memoryview(raw[:-10]))
    with pytest.raises(IntegrityError, match="ends before"):
        short.check_complete()
    with pytest.raises(IntegrityError, match="not a readable"):
        parse_header(b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', name="m")
    restarted = TensorStream("m", lambda *_: None)
    restarted(memoryview(raw[:40]))
    restarted.restart()
    restarted(memoryview(raw))
    restarted.check_complete()
    assert restarted.delivered == ["a"]


# --- int8 out of the fp32 artifact ------------------------------------------------------------------


def test_int8_is_calibrated_on_the_fp32_artifact_and_needs_no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    fp32 = build_fp32(ModelSource.from_dir(MODELS / "bert"), lambda _line: None)
    tokenizer = (MODELS / "bert" / "tokenizer.json").read_bytes()
    monkeypatch.setitem(sys.modules, "torch", None)  # an import of torch now fails
    built = build_int8(OnnxArtifact(files=dict(fp32.files), record=fp32.record), tokenizer)
    assert built.record["variant"] == "int8" and built.record["calibration"]["windows"] > 36
    assert built.record["calibration"]["run_by"] == "onnxruntime, fp32 artifact"
    monkeypatch.undo()
    files = {name: bytearray(data) for name, data in built.files.items()}
    engine = onnx_engine(files, built.record, {"tokenizer.json": tokenizer}, threads=default_threads(None, 1))
    assert engine.answer([QAItem("who won?", "The Broncos won the game.")])[0]


def test_quantizing_hands_back_the_fp32_pages_it_has_rewritten_and_gives_the_same_artifact() -> None:
    fp32 = build_fp32(ModelSource.from_dir(MODELS / "bert"), lambda _line: None)
    graph = bytes(fp32.files[MODEL_FILE])
    spec = tokenizer_spec(fp32.record, (MODELS / "bert" / "tokenizer.json").read_bytes())
    ranges, _ = calibrate(graph, bytearray(fp32.files[WEIGHTS_FILE]), spec, fp32.record)
    recipe = RECIPES["per-channel, all int8, static"]
    kept = quantize(graph, bytearray(fp32.files[WEIGHTS_FILE]), ranges, recipe)
    spent_source = bytearray(fp32.files[WEIGHTS_FILE])
    released = quantize(graph, spent_source, ranges, recipe, release=True)
    assert kept[0] == released[0] and kept[1] == released[1] and kept[2] == released[2]
    zeros = np.frombuffer(spent_source, dtype=np.uint8)
    assert (zeros == 0).mean() > (np.frombuffer(bytes(fp32.files[WEIGHTS_FILE]), dtype=np.uint8) == 0).mean()
    views = initializer_views(onnx.load_from_string(kept[0]), kept[1])
    assert views  # readable
