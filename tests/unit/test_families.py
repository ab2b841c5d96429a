"""The families of the Hub's extractive QA models (docs/model-families.md) through ONNX, int8 and tokenizer conversion.

The torch engine's golden parity of every family is in ``test_question_answering_golden.py``;
here: the fp32 ONNX artifact of XLM-R, DeBERTa-v3, ELECTRA, ALBERT and MobileBERT against the same
golden answers, their int8 artifact (built, batch independent), int8 on small and odd BERT shapes,
and the conversion of slow tokenizers to ``tokenizer.json``.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import pytest

from shared.engine.onnx_runner import onnx_engine
from shared.engine.question_answering import QAEngine, QAItem
from shared.engine.tokenizer_conversion import derive_tokenizer_json
from shared.engine.torch_model import engine_from_dir
from shared.errors import UnsafeModelError
from shared.refresh.onnx_export import OnnxArtifact, build_onnx
from tests.fixtures.tiny_models import build_bert

from .test_question_answering_golden import RECORDS, ROOMY, assert_same, item

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
FAMILIES = ["xlm-roberta", "deberta-v3", "electra", "albert", "mobilebert"]
CONTEXT = "The Denver Broncos won Super Bowl 50 in 2016 against the Carolina Panthers in san francisco."

pytestmark = pytest.mark.slow


@cache
def model_dir(model: str) -> Path:
    """The fixture folder as a version stores it: a model without tokenizer.json gets the derived one."""
    source = MODELS / model
    if (source / "tokenizer.json").is_file():
        return source
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"family-{model}-", dir=None))
    shutil.copytree(source, folder, dirs_exist_ok=True)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "tokenizer.json").write_bytes(derive_tokenizer_json(files).data)
    return folder


@cache
def artifact(model: str, variant: str) -> OnnxArtifact:
    return build_onnx(model_dir(model), variant, progress=lambda _line: None)


def onnx_qa(model: str, variant: str, *, batch_windows: int = 8, prepack: bool = True) -> QAEngine:
    built = artifact(model, variant)
    folder = model_dir(model)
    tokenizer = {p.name: bytearray(p.read_bytes()) for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))}
    files = {name: bytearray(data) for name, data in built.files.items()}
    return onnx_engine(files, built.record, tokenizer, limits=ROOMY, batch_windows=batch_windows, threads=1, prepack=prepack)


def records(model: str) -> list[dict[str, object]]:
    return [r for r in RECORDS if r["model"] == model]


@pytest.mark.parametrize("model", FAMILIES)
def test_fp32_artifact_matches_the_pipeline(model: str) -> None:
    assert artifact(model, "fp32").record["export"].startswith("placeholder weights")  # the refresh's way
    chosen = records(model)
    alone = onnx_qa(model, "fp32", batch_windows=1)
    for index, record in enumerate(chosen):
        assert_same(alone.answer([item(record)])[0], record["answers"], f"{model} #{index}: {record['options']}")
    batched = onnx_qa(model, "fp32", batch_windows=8, prepack=False)  # the weights shared with the download, not repacked
    for first in range(0, len(chosen), 16):
        chunk = chosen[first : first + 16]
        for offset, (got, record) in enumerate(zip(batched.answer([item(r) for r in chunk]), chunk, strict=True)):
            assert_same(got, record["answers"], f"{model} #{first + offset}")


def test_the_export_takes_the_inputs_the_pipeline_gave() -> None:
    takes_types = {model: "token_type_ids" in artifact(model, "fp32").record["input_names"] for model in FAMILIES}
    # one token type (XLM-R) or none (DeBERTa-v3): the model gets none; ALBERT's were dropped by transformers 5's tokenizer class
    assert takes_types == {"xlm-roberta": False, "deberta-v3": False, "electra": True, "albert": True, "mobilebert": True}


def _same_answers(got: list[object], want: list[object], where: str) -> None:
    assert [(a.answer, a.start, a.end) for a in got] == [(a.answer, a.start, a.end) for a in want], where  # type: ignore[attr-defined]
    for a, b in zip(got, want, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5), where  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", FAMILIES)
def test_int8_builds_and_does_not_depend_on_the_batch(model: str) -> None:
    built = artifact(model, "int8")
    assert built.record["variant"] == "int8" and built.record["recipe_details"]["quantized_matmuls"] > 0
    alone_engine, batched_engine = onnx_qa(model, "int8", batch_windows=1), onnx_qa(model, "int8", batch_windows=8)
    # a quarter of the golden questions (short, unicode, options) and one multi-window context
    short = [item(r) for r in records(model) if len(str(r["context"])) < 2000][::4]
    items = [*short, next(item(r) for r in records(model) if len(str(r["context"])) > 4000)]
    alone = [alone_engine.answer([one])[0] for one in items]
    for size in (4, len(items)):
        for first in range(0, len(items), size):
            for offset, got in enumerate(batched_engine.answer(items[first : first + size])):
                _same_answers(got, alone[first + offset], f"{model} #{first + offset} in a batch of {size}")


@pytest.mark.parametrize(
    ("layers", "hidden", "type_vocab_size"),
    [
        (1, 36, 2),  # one layer, hidden not a multiple of 64 (nor of 32)
        (3, 20, 2),  # narrow: the attention projections are under 32 columns
        (2, 32, 1),  # one token type: the context's type 1 indexed past the embedding (IndexError at calibration)
    ],
)
def test_int8_builds_on_small_and_odd_shapes(tmp_path: Path, layers: int, hidden: int, type_vocab_size: int) -> None:
    folder = build_bert(tmp_path / "bert", layers=layers, hidden=hidden)
    if type_vocab_size != 2:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "type_vocab_size": type_vocab_size}))
        import safetensors.torch

        weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
        key = "bert.embeddings.token_type_embeddings.weight"
        weights[key] = weights[key][:type_vocab_size].clone()
        safetensors.torch.save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    torch_answer = engine_from_dir(folder).answer([QAItem("who won?", CONTEXT)])[0]
    built = build_onnx(folder, "int8", progress=lambda _line: None)
    tokenizer = {p.name: bytearray(p.read_bytes()) for p in folder.iterdir() if p.name.startswith("tokenizer")}
    qa = onnx_engine({k: bytearray(v) for k, v in built.files.items()}, built.record, tokenizer, threads=1)
    (best,) = qa.answer([QAItem("who won?", CONTEXT)])[0]
    assert CONTEXT[best.start : best.end] == best.answer and torch_answer
    assert ("token_type_ids" in built.record["input_names"]) == (type_vocab_size == 2)


# --- tokenizer conversion ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["xlm-roberta", "albert", "electra", "mobilebert"])
def test_converted_tokenizer_matches_the_one_the_hub_ships(model: str) -> None:
    """tokenizer.json derived from the slow files (the pinned transformers' converter, no
    sentencepiece) tokenizes every golden text as the one transformers 4.57.6 made."""
    from tokenizers import Tokenizer

    files = {p.name: p.read_bytes() for p in (MODELS / model).iterdir() if p.name != "tokenizer.json"}
    derived = derive_tokenizer_json(files)
    shipped = Tokenizer.from_file(str(MODELS / model / "tokenizer.json"))
    converted = Tokenizer.from_str(derived.data.decode())
    for record in records(model):
        a, b = shipped.encode(record["question"], record["context"]), converted.encode(record["question"], record["context"])
        assert (a.ids, a.type_ids, a.offsets, a.word_ids) == (b.ids, b.type_ids, b.offsets, b.word_ids), record["question"]
    assert derived.library.startswith("transformers ") and derived.sources[0] in ("sentencepiece.bpe.model", "spiece.model", "vocab.txt")


def test_deberta_v3_conversion_keeps_mask_at_its_added_id() -> None:
    files = {p.name: p.read_bytes() for p in (MODELS / "deberta-v3").iterdir()}
    derived = derive_tokenizer_json(files)
    assert derived.sources == ("spm.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
    assert derived.converter == "DebertaV2Converter"
    data = json.loads(derived.data)
    mask_id = json.loads(files["added_tokens.json"])["[MASK]"]
    assert {t["content"]: t["id"] for t in data["added_tokens"]}["[MASK]"] == mask_id


def test_unconvertible_tokenizers_are_refused_naming_files_found_and_needed() -> None:
    files = {p.name: p.read_bytes() for p in (MODELS / "deberta-v3").iterdir() if p.name != "spm.model"}
    with pytest.raises(UnsafeModelError, match=r"needs its SentencePiece model \(spm\.model or spiece\.model.*found: added_tokens\.json"):
        derive_tokenizer_json(files)
    electra = {p.name: p.read_bytes() for p in (MODELS / "electra").iterdir() if p.name not in ("tokenizer.json", "vocab.txt")}
    with pytest.raises(UnsafeModelError, match=r"ElectraTokenizer needs vocab\.txt"):
        derive_tokenizer_json(electra)
    byte_level = {p.name: p.read_bytes() for p in (MODELS / "roberta").iterdir() if p.name != "tokenizer.json"}
    with pytest.raises(UnsafeModelError, match=r"\(RobertaTokenizer\) cannot be converted.*save_pretrained"):
        derive_tokenizer_json(byte_level)


def test_int8_that_cannot_be_built_says_why(tmp_path: Path) -> None:
    """A tokenizer with more tokens than the embedding has rows (a BERT of vocabulary 116 with a
    254-token tokenizer: once an "unexpected IndexError" after calibration) is refused by
    name; a model that cannot run the calibration windows gets the reason, not an internal error."""
    import safetensors.torch

    folder = build_bert(tmp_path / "bert")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 116}))
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    weights["bert.embeddings.word_embeddings.weight"] = weights["bert.embeddings.word_embeddings.weight"][:116].clone()
    safetensors.torch.save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsafeModelError, match=r"the tokenizer has 254 tokens but the model's embedding has 116 rows"):
        build_onnx(folder, "int8", progress=lambda _line: None)
    short = build_bert(tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    weights = safetensors.torch.load_file(str(short / "model.safetensors"))
    key = "bert.embeddings.position_embeddings.weight"
    weights[key] = weights[key][:64].clone()
    safetensors.torch.save_file(weights, str(short / "model.safetensors"), metadata={"format": "pt"})
    # calibration runs the fp32 artifact in ONNX Runtime (no torch): its error class and message
    with pytest.raises(
        UnsafeModelError, match=r"int8 calibration failed: the model cannot answer the calibration text \(Fail: \[ONNXRuntimeError\]"
    ):
        build_onnx(short, "int8", progress=lambda _line: None)
