"""The engine against golden answers of the transformers 4.57.6 question-answering pipeline.

``tests/fixtures/make_golden.py`` produced ``golden.json`` and the models under
``tests/fixtures/models/`` with transformers 4.57.6; this test needs only the project's own stack.
One model per family of the Hub's extractive QA models (docs/model-families.md): BERT (also as a SQuAD 2.0
kind), DistilBERT, RoBERTa, XLM-RoBERTa, DeBERTa-v3, ELECTRA, ALBERT, MobileBERT. Answers are
checked through both ways a version is loaded: from a folder (disk mode, ``answer --model-dir``)
and from files in memory (memory mode), the DeBERTa-v3 one converting its ``spm.model``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from shared.engine.question_answering import Limits, QAEngine, QAItem
from shared.engine.torch_model import engine_from_dir, engine_from_files

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GOLDEN = json.loads((FIXTURES / "golden.json").read_text(encoding="utf-8"))
RECORDS = GOLDEN["records"]
ROOMY = Limits(max_context_chars=100_000, max_question_tokens=512, max_windows=1000, max_items=1000)


MODELS = ["bert", "distilbert", "roberta", "bert-squad2", "xlm-roberta", "deberta-v3", "electra", "albert", "mobilebert"]


@cache
def engine(model: str, batch_windows: int | str = 8) -> QAEngine:
    return engine_from_dir(FIXTURES / "models" / model, limits=ROOMY, batch_windows=batch_windows)


@cache
def memory_engine(model: str, batch_windows: int | str = 8) -> QAEngine:
    files = {p.name: bytearray(p.read_bytes()) for p in (FIXTURES / "models" / model).iterdir()}
    return engine_from_files(files, limits=ROOMY, batch_windows=batch_windows)


def item(record: dict[str, object]) -> QAItem:
    return QAItem(question=record["question"], context=record["context"], **record["options"])  # type: ignore[arg-type]


def is_padding(answer: dict[str, object]) -> bool:
    """The pipeline pads a ``top_k`` larger than the real spans with non-spans at score 0 (end
    before start); the engine drops them (``decode_spans``). Every other answer must be equal."""
    return answer["score"] == 0.0 and answer["answer"] == ""


def assert_same(got: list[object], expected: list[dict[str, object]], where: str) -> None:
    expected = [a for a in expected if not is_padding(a)]
    assert len(got) == len(expected), where
    for answer, want in zip(got, expected, strict=True):
        assert (answer.answer, answer.start, answer.end) == (want["answer"], want["start"], want["end"]), where  # type: ignore[attr-defined]
        assert answer.score == pytest.approx(want["score"], abs=1e-4), where  # type: ignore[attr-defined]


def test_golden_file_comes_from_the_reference() -> None:
    assert GOLDEN["transformers"] == "4.57.6"
    models = {r["model"] for r in RECORDS}
    assert models == set(MODELS)
    for model in set(MODELS) - {"bert", "distilbert", "roberta"}:  # impossible answers win, but not always
        impossible = [r for r in RECORDS if r["model"] == model and r["options"].get("handle_impossible_answer")]
        assert any(r["answers"][0]["answer"] == "" for r in impossible), model
        assert model == "bert-squad2" or any(r["answers"][0]["answer"] != "" for r in impossible), model
    assert any(len(r["context"]) > 4000 for r in RECORDS)  # multi-window contexts
    # the only answers the engine leaves out on purpose: 2 paddings per model, each at the end of its list
    assert sum(is_padding(a) for r in RECORDS for a in r["answers"]) == 2 * len(MODELS)
    assert all(not is_padding(a) for r in RECORDS for a in r["answers"][:-1])


@pytest.mark.parametrize("model", MODELS)
def test_one_at_a_time_matches_the_pipeline(model: str) -> None:
    records = [r for r in RECORDS if r["model"] == model]
    qa = engine(model, batch_windows=1)
    for index, record in enumerate(records):
        assert_same(qa.answer([item(record)])[0], record["answers"], f"{model} #{index}: {record['options']}")


@pytest.mark.parametrize("batch_windows", [8, "auto"])
@pytest.mark.parametrize("model", MODELS)
def test_batched_requests_match_the_pipeline(model: str, batch_windows: int | str) -> None:
    records = [r for r in RECORDS if r["model"] == model]
    qa = memory_engine(model, batch_windows=batch_windows)
    for first in range(0, len(records), 16):
        chunk = records[first : first + 16]
        results = qa.answer([item(r) for r in chunk])
        for offset, (got, record) in enumerate(zip(results, chunk, strict=True)):
            assert_same(got, record["answers"], f"{model} #{first + offset}")
