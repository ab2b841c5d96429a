"""The engine's limits, thread safety, quantization and deadline, and the request check of its items."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shared.engine.question_answering import Limits, QAEngine, QAItem, decode_spans
from shared.engine.torch_model import TorchRunner, engine_from_dir
from shared.errors import DeadlineExceededError, InputError, TooLargeError
from shared.serving.validation import check_ask

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game."


LIMITS = Limits(max_context_chars=5000, max_question_chars=200, max_windows=6, max_items=4)


@pytest.fixture(scope="module")
def qa() -> QAEngine:
    return engine_from_dir(MODELS / "bert", limits=LIMITS)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"context": CONTEXT}, "question"),
        ({"question": "who?"}, "context"),
        ({"question": "", "context": CONTEXT}, "question"),
        ({"question": "who?", "context": "   "}, "context"),
        ({"question": 3, "context": CONTEXT}, "question"),
        ({"question": "who?", "context": ["a"]}, "context"),
        ({"question": "who?", "context": CONTEXT, "top_k": 0}, "top_k"),
        ({"question": "who?", "context": CONTEXT, "top_k": 21}, "top_k"),
        ({"question": "who?", "context": CONTEXT, "top_k": "2"}, "top_k"),
        ({"question": "who?", "context": CONTEXT, "top_k": True}, "top_k"),
        ({"question": "who?", "context": CONTEXT, "max_answer_len": 0}, "max_answer_len"),
        ({"question": "who?", "context": CONTEXT, "max_answer_len": 1.5}, "max_answer_len"),
        ({"question": "who?", "context": CONTEXT, "handle_impossible_answer": "yes"}, "handle_impossible_answer"),
    ],
)
def test_bad_items_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(InputError) as info:
        check_ask(LIMITS, data)
    assert info.value.field == field and field in info.value.message
    assert info.value.status == 400


def test_not_an_object() -> None:
    with pytest.raises(InputError):
        check_ask(LIMITS, {"items": [["question", "context"]]})


def test_budgets_are_413_naming_the_field(qa: QAEngine) -> None:
    """The limits without a tokenizer are the request check's (the same for HTTP and the command
    line); those of tokens and windows are the engine's. Each names its setting."""
    with pytest.raises(TooLargeError) as info:
        check_ask(LIMITS, {"question": "q" * 201, "context": CONTEXT})
    assert info.value.field == "question" and info.value.status == 413 and "QA_MAX_QUESTION_CHARS" in info.value.message
    with pytest.raises(TooLargeError) as info:
        check_ask(LIMITS, {"question": "who?", "context": "word " * 1001})
    assert info.value.field == "context" and "(QA_MAX_CONTEXT_CHARS)" in info.value.message
    with pytest.raises(TooLargeError) as info:
        check_ask(LIMITS, {"items": [{"question": "who?", "context": CONTEXT}] * 5})
    assert info.value.field == "items" and "(QA_MAX_ITEMS)" in info.value.message
    with pytest.raises(TooLargeError, match=r"windows.*QA_MAX_WINDOWS"):
        qa.answer([QAItem("who?", "x " * 2400)])  # under 5000 chars, over 6 windows
    with pytest.raises(TooLargeError, match=r"tokens.*QA_MAX_QUESTION_TOKENS") as info:
        qa.answer([QAItem(" ".join(["a"] * 65), CONTEXT)])
    assert info.value.field == "question"
    with pytest.raises(InputError):
        check_ask(LIMITS, {"items": []})


def test_question_leaving_no_room_is_an_input_error_not_a_crash() -> None:
    roomy = engine_from_dir(MODELS / "bert", limits=Limits(max_question_chars=10_000, max_question_tokens=10_000))
    with pytest.raises(InputError, match="too long") as info:  # tokenizers: a plain Exception
        roomy.answer([QAItem(" ".join(["what"] * 500), CONTEXT)])
    assert info.value.field == "question"
    with pytest.raises(InputError, match="too long"):  # tokenizers: a pyo3 PanicException (BaseException)
        roomy.answer([QAItem(" ".join(["what"] * 300), CONTEXT * 30)])
    assert roomy.answer([QAItem("who won?", CONTEXT)])[0]  # still works afterwards


def test_multi_item_errors_name_the_item(qa: QAEngine) -> None:
    with pytest.raises(TooLargeError) as info:
        check_ask(LIMITS, {"items": [{"question": "who?", "context": CONTEXT}, {"question": "q" * 201, "context": CONTEXT}]})
    assert info.value.field == "items[1].question"
    with pytest.raises(TooLargeError) as info:
        qa.answer([QAItem("who?", CONTEXT), QAItem(" ".join(["a"] * 65), CONTEXT)])
    assert info.value.field == "items[1].question"


@pytest.mark.parametrize("top_k", [1, 2, 3, 4, 7, 12, 13, 20])
@pytest.mark.parametrize("context", ["a", "a b", "Denver won.", CONTEXT])
def test_any_top_k_gives_only_real_spans(qa: QAEngine, context: str, top_k: int) -> None:
    """Found by the fuzz: top_k * 2 + 10 equal to the candidates of a tiny window crashed
    argpartition (a 500), and top_k beyond the real spans padded the list with "" at score 0."""
    [answers] = qa.answer([QAItem("who?", context, top_k=top_k)])
    assert 1 <= len(answers) <= top_k
    for answer in answers:
        assert answer.answer and context[answer.start : answer.end] == answer.answer and answer.score > 0
    assert len({a.answer.lower() for a in answers}) == len(answers)


def test_decode_spans_with_top_k_equal_to_the_candidates() -> None:
    probs = np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    starts, ends, scores = decode_spans(probs, probs, 16, 15, np.array([0, 1, 1, 1]))
    assert len(starts) == 6  # the 3 context tokens make 6 spans start <= end; the rest is no span
    assert (starts <= ends).all() and (scores > 0).all()
    assert list(scores) == sorted(scores, reverse=True)


@pytest.mark.parametrize("text", ["\u200b", "\x00", "\u0301\u0301"])
def test_text_without_tokens_is_a_400_naming_the_field(qa: QAEngine, text: str) -> None:
    with pytest.raises(InputError, match="no words") as info:
        qa.answer([QAItem("who?", text)])
    assert info.value.field == "context"
    with pytest.raises(InputError, match="no words") as info:
        qa.answer([QAItem("who?", CONTEXT), QAItem(text, CONTEXT)])
    assert info.value.field == "items[1].question"


@pytest.mark.parametrize("field", ["question", "context"])
def test_lone_surrogate_is_named_as_such(field: str) -> None:
    data = {"question": "who won?", "context": CONTEXT}
    data[field] = data[field][:3] + "\ud800" + data[field][3:]
    with pytest.raises(InputError, match="lone surrogate") as info:
        check_ask(LIMITS, {"items": [data]})
    assert info.value.field == f"items[0].{field}" and "character 3" in info.value.message


def test_answers_are_spans_of_the_context(qa: QAEngine) -> None:
    [answers] = qa.answer([QAItem("who won?", CONTEXT, top_k=3)])
    assert 1 <= len(answers) <= 3
    for answer in answers:
        assert CONTEXT[answer.start : answer.end] == answer.answer
        assert 0.0 <= answer.score <= 1.0
    assert [a.score for a in answers] == sorted((a.score for a in answers), reverse=True)


def test_threads_get_the_same_answers_as_serial_calls(qa: QAEngine) -> None:
    items = [
        QAItem("who won?", CONTEXT),
        QAItem("where?", "Paris is the capital of France. " * 40, top_k=2),
        QAItem("when?", CONTEXT, max_answer_len=3),
        QAItem("what?", "the river " * 200),
    ]
    serial = [qa.answer([item]) for item in items]
    results: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for round_ in range(3):
                index = (n + round_) % len(items)
                results[(n, round_)] = (index, qa.answer([items[index]]))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 48
    for index, got in results.values():  # type: ignore[misc]
        assert [[(a.answer, a.start, a.end) for a in r] for r in got] == [[(a.answer, a.start, a.end) for a in r] for r in serial[index]]
        assert [a.score for a in got[0]] == pytest.approx([a.score for a in serial[index][0]], abs=1e-5)


def test_int8_quantization_gives_valid_spans() -> None:
    fp32 = engine_from_dir(MODELS / "bert")
    int8 = engine_from_dir(MODELS / "bert", quantize="int8")
    import torch

    assert isinstance(int8.runner, TorchRunner)
    modules = list(int8.runner.model.modules())
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in modules)
    assert not any(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear for m in modules)
    item = QAItem("who won the game?", CONTEXT, top_k=3)
    for answer in int8.answer([item])[0]:
        assert CONTEXT[answer.start : answer.end] == answer.answer
    assert len(fp32.answer([item])[0]) == len(int8.answer([item])[0])


def test_deadline_stops_between_forward_passes() -> None:
    qa = engine_from_dir(MODELS / "bert", batch_windows=1)
    with pytest.raises(DeadlineExceededError):
        qa.answer([QAItem("who?", "the city of paris " * 200)], deadline=time.monotonic() - 1)
