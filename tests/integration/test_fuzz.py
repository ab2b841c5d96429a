"""Property-based fuzz of ``/api/ask``, ``/api/model/refresh`` and ``/api/model/rollback`` through
the real function objects, against a model published to Azurite.

Bodies: JSON of every type and nesting depth (objects with duplicate keys, huge numbers, ``NaN``
and ``Infinity`` literals, lone surrogates as ``\\ud800`` escapes and as raw bytes, UTF-16 and
UTF-32 encodings), random bytes, thousands of ``[``, and for each route bodies that are mostly
valid, so that at least a quarter of the ``/api/ask`` bodies reach the engine. The property: no
500 (an exception escaping a function counts as one) and every response matches the OpenAPI
document (the hook of ``tests/conftest.py``, checked after each body so that Hypothesis reports
the smallest failing one). Derandomized: CI runs the same bodies every time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.engine.question_answering import MAX_ANSWER_LEN, MAX_TOP_K, QAEngine
from shared.store.model_store import ModelStore
from tests.conftest import SCHEMA_MISMATCHES
from tests.fixtures.function_calls import respond
from tests.fixtures.tiny_models import build_bert, publish

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BODIES_PER_ROUTE = 2000
FUZZ_SETTINGS = settings(
    max_examples=BODIES_PER_ROUTE,
    deadline=None,
    derandomize=True,  # the same bodies on every run and machine
    database=None,  # nothing written next to the sources
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
CONTEXTS = (
    "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina.",
    "Paris is the capital of France. The river that runs through the city is called the Seine.",
    "Zürich café naïve résumé über straße: coöperate with élan in 1998, 42 times.",
    "The university was known for its music school during the war, and later for football.",
)
QUESTIONS = ("Who won the game?", "Where was it played?", "When?", "What is the capital of France?", "Which river?", "how many")
ROUTE_KEYS = {
    "ask": ("question", "context", "items", "top_k", "max_answer_len", "handle_impossible_answer"),
    "model_refresh": ("revision", "unpin", "repair", "build_artifacts"),
    "model_rollback": ("to",),
}


# --- bodies of any shape --------------------------------------------------------------------------


def _string_literals() -> st.SearchStrategy[str]:
    """JSON string literals: any text, escaped or raw, and lone UTF-16 surrogates."""
    surrogate = st.integers(0xD800, 0xDFFF).map(chr)
    text = st.text(max_size=40) | st.lists(st.characters() | surrogate, max_size=12).map("".join)
    return st.one_of(
        text.map(json.dumps),  # ensure_ascii: every non-ASCII character as \\uXXXX, lone surrogates too
        text.map(lambda s: json.dumps(s, ensure_ascii=False)),  # raw (surrogates become CESU-8 bytes below)
    )


def _scalar_literals() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["null", "true", "false", "0", "-0", "0.0", "1", "-1", "20", "21", "512", "513"]),
        st.integers().map(str),
        st.integers(min_value=19, max_value=6000).map(lambda digits: "9" * digits),  # past int64, and past 4,300 digits
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "4.9e-324", "1.0", "2.5"]),
        _string_literals(),
    )


def json_texts(keys: tuple[str, ...]) -> st.SearchStrategy[str]:
    """JSON documents (as text) of every type and nesting; objects may repeat a key, their keys
    are mostly the route's own names."""
    key = st.sampled_from(keys).map(json.dumps) | _string_literals()

    def nest(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        arrays = st.lists(children, max_size=5).map(lambda xs: "[" + ",".join(xs) + "]")
        pairs = st.lists(st.tuples(key, children), max_size=6)
        objects = pairs.map(lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}")
        return arrays | objects

    return st.recursive(_scalar_literals(), nest, max_leaves=30)


def _encoded(texts: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    encodings = st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "utf-32"])
    padding = st.sampled_from(["", " ", "\n", "\t \r\n"])
    return st.builds(lambda text, encoding, pad: (pad + text + pad).encode(encoding, "surrogatepass"), texts, encodings, padding)


def deep_nesting() -> st.SearchStrategy[bytes]:
    """Open (and sometimes closed) arrays and objects thousands of levels deep."""
    return st.builds(
        lambda depth, shape: {
            "open": b"[" * depth,
            "closed": b"[" * depth + b"]" * depth,
            "objects": b'{"items":' * depth + b"1" + b"}" * depth,
            "mixed": b'{"question":[' * depth,
        }[shape],
        st.integers(min_value=1, max_value=50_000),
        st.sampled_from(["open", "closed", "objects", "mixed"]),
    )


def adversarial_bodies(keys: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    return st.one_of(_encoded(json_texts(keys)), st.binary(max_size=600), deep_nesting())


# --- bodies that are mostly valid -------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn in proportion to its weight (``one_of`` picks evenly)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])


def _mostly(valid: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` three times in four, else ``anything``."""
    return weighted((3, valid), (1, anything))


def _any_value() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
        max_leaves=5,
    )


def ask_items() -> st.SearchStrategy[dict[str, Any]]:
    question = _mostly(st.sampled_from(QUESTIONS), st.text(min_size=1, max_size=60))
    context = _mostly(st.sampled_from(CONTEXTS), st.text(min_size=1, max_size=400))
    return st.fixed_dictionaries(
        {"question": question, "context": context},
        optional={
            "top_k": _mostly(st.integers(1, MAX_TOP_K), _any_value()),
            "max_answer_len": _mostly(st.integers(1, MAX_ANSWER_LEN), _any_value()),
            "handle_impossible_answer": _mostly(st.booleans(), _any_value()),
        },
    )


def oversized_ask_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """Over one budget each (settings' defaults): context or question characters, question tokens
    (the engine counts them), items."""
    item = {"question": QUESTIONS[0], "context": CONTEXTS[0]}
    return st.sampled_from(
        [
            {"question": QUESTIONS[0], "context": "word " * 5001},
            {"question": "q" * 1001, "context": CONTEXTS[0]},
            {"question": " ".join(["who"] * 70), "context": CONTEXTS[0]},
            {"items": [item] * 33},
            {"items": [item, {"question": QUESTIONS[1], "context": "x" * 25_001}]},
        ]
    )


def valid_ask_bodies() -> st.SearchStrategy[bytes]:
    batches = st.fixed_dictionaries({"items": st.lists(ask_items(), min_size=1, max_size=4)})
    bodies = weighted((6, ask_items()), (3, batches), (1, oversized_ask_bodies()))
    return bodies.map(lambda body: json.dumps(body).encode())


def valid_refresh_bodies() -> st.SearchStrategy[bytes]:
    revision = st.sampled_from(["main", "v1.0", "refs/pr/1", "a" * 40, "../etc", "", " main"]) | st.text(max_size=30) | _any_value()
    flag = _mostly(st.booleans(), _any_value())
    body = st.fixed_dictionaries({}, optional={"revision": revision, "unpin": flag, "repair": flag, "build_artifacts": flag})
    return body.map(lambda b: json.dumps(b).encode()) | st.just(b"")


def valid_rollback_bodies(revisions: list[str]) -> st.SearchStrategy[bytes]:
    target = st.sampled_from([*revisions, "f" * 40, "local-0000000000000000", "main", ""]) | st.text(max_size=45) | _any_value()
    body = st.fixed_dictionaries({}, optional={"to": target})
    return body.map(lambda b: json.dumps(b).encode()) | st.just(b"")


# --- the property -----------------------------------------------------------------------------------


class RouteFuzz:
    """Sends bodies to one function and keeps the counts the closing note quotes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.statuses: Counter[int] = Counter()

    @property
    def bodies(self) -> int:
        return sum(self.statuses.values())

    def send(self, raw: bytes) -> int:
        before = len(SCHEMA_MISMATCHES)
        response = respond(self.name, raw=raw)
        self.statuses[response.status_code] += 1
        assert response.status_code != 500, f"500 from {self.name} for {raw[:200]!r}: {response.get_body()[:300]!r}"
        mismatches = SCHEMA_MISMATCHES[before:]
        assert not mismatches, f"{self.name} answered outside the OpenAPI document for {raw[:200]!r}: {mismatches}"
        return response.status_code

    def report(self, extra: str = "") -> str:
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(self.statuses.items()))
        return f"fuzz {self.name}: {self.bodies} bodies{extra}, statuses {{{statuses}}}"


@pytest.fixture
def published(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> list[str]:
    """Two complete versions of a tiny model (the second current), for the engine and for rollback."""
    return [publish(store, tiny_bert_dir), publish(store, build_bert(tmp_path / "v2", seed=5))]


def test_ask_never_fails_and_answers_within_the_document(
    env: dict[str, str], published: list[str], install: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    install(env)
    reached: list[int] = []
    answer = QAEngine.answer

    def counting_answer(engine: QAEngine, *args: Any, **kwargs: Any) -> Any:
        reached.append(1)
        return answer(engine, *args, **kwargs)

    monkeypatch.setattr(QAEngine, "answer", counting_answer)
    fuzz = RouteFuzz("ask")
    assert fuzz.send(json.dumps({"question": QUESTIONS[0], "context": CONTEXTS[0]}).encode()) == 200  # loads the model

    @FUZZ_SETTINGS
    @given(raw=weighted((3, valid_ask_bodies()), (2, adversarial_bodies(ROUTE_KEYS["ask"]))))
    @example(raw=b"[" * 4000)
    @example(raw=b'{"question": "Who?", "question": "\\ud800", "context": "x"}')
    @example(raw=b'{"question": "Who won?", "context": "' + CONTEXTS[0].encode() + b'", "top_k": NaN}')
    def run(raw: bytes) -> None:
        fuzz.send(raw)

    run()
    share = len(reached) / fuzz.bodies
    print(f"\n{fuzz.report(f', {len(reached)} reached the engine ({share:.0%})')}")
    assert fuzz.bodies >= BODIES_PER_ROUTE and fuzz.statuses[500] == 0
    assert share >= 0.25, f"only {share:.0%} of the bodies reached the engine"
    assert fuzz.statuses[200] > 0 and fuzz.statuses[400] > 0 and fuzz.statuses[413] > 0


def test_refresh_never_fails_and_answers_within_the_document(env: dict[str, str], install: Callable[..., Any]) -> None:
    install(env)
    fuzz = RouteFuzz("model_refresh")

    @FUZZ_SETTINGS
    @given(raw=st.one_of(valid_refresh_bodies(), adversarial_bodies(ROUTE_KEYS["model_refresh"])))
    @example(raw=b"[" * 4000)
    @example(raw=b'{"revision": "main", "revision": 1}')
    @example(raw=b'{"\\ud800": true}')
    def run(raw: bytes) -> None:
        fuzz.send(raw)

    run()
    print(f"\n{fuzz.report()}")
    assert fuzz.bodies >= BODIES_PER_ROUTE and fuzz.statuses[500] == 0
    assert fuzz.statuses[202] > 0 and fuzz.statuses[400] > 0


def test_rollback_never_fails_and_answers_within_the_document(
    env: dict[str, str], published: list[str], install: Callable[..., Any]
) -> None:
    install(env)
    fuzz = RouteFuzz("model_rollback")

    @FUZZ_SETTINGS
    @given(raw=st.one_of(valid_rollback_bodies(published), adversarial_bodies(ROUTE_KEYS["model_rollback"])))
    @example(raw=b"[" * 4000)
    @example(raw=b'{"to": "' + published[0].encode() + b'", "to": 5}')
    def run(raw: bytes) -> None:
        fuzz.send(raw)

    run()
    print(f"\n{fuzz.report()}")
    assert fuzz.bodies >= BODIES_PER_ROUTE and fuzz.statuses[500] == 0
    assert fuzz.statuses[200] > 0 and fuzz.statuses[404] > 0 and fuzz.statuses[400] > 0
