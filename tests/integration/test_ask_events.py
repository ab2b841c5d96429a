"""One ``event=ask`` line for every ``/api/ask`` request, whatever its outcome (the
contract of the KQL in docs/operations.md): ``status`` and ``error_code`` always, the model's fields when a
model answered, ``-`` for none."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import function_app
from shared.serving.holder import ModelHolder
from shared.store.model_store import ModelStore
from tests.fixtures.function_calls import call
from tests.fixtures.tiny_models import publish

pytestmark = pytest.mark.integration
CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."
FIELDS = ("status", "error_code", "items", "windows", "seconds", "model_ms", "model_id", "revision", "backend", "variant")


def ask_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=ask ")]
    caplog.clear()
    events = [dict(pair.split("=", 1) for pair in line.split(" ")) for line in lines]
    for event in events:
        assert tuple(event) == ("event", *FIELDS), event  # every field, in the contract's order
    return events


def one_event(caplog: pytest.LogCaptureFixture, status: int, error_code: str) -> dict[str, str]:
    events = ask_events(caplog)
    assert len(events) == 1, events
    [event] = events
    assert (event["status"], event["error_code"]) == (str(status), error_code), event
    assert float(event["seconds"]) >= 0
    return event


def test_every_ask_outcome_leaves_one_event_line(
    env: dict[str, str],
    store: ModelStore,
    tiny_bert_dir: Path,
    install: Callable[..., ModelHolder],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="shared")
    settings = {**env, "QA_MAX_CONCURRENT": "1", "QA_DEADLINE_SECONDS": "3", "QA_MAX_CONTEXT_CHARS": "200"}

    # 503 model_not_ready: nothing isolated yet
    holder = install(settings)
    status, body, _ = call("ask", body={"question": "Who won?", "context": CONTEXT})
    assert (status, body["error"]["code"]) == (503, "model_not_ready")
    event = one_event(caplog, 503, "model_not_ready")
    assert (event["model_id"], event["revision"], event["backend"], event["variant"], event["items"]) == ("-", "-", "-", "-", "1")

    revision = publish(store, tiny_bert_dir)
    holder = install(settings)

    # 200: the model's fields
    status, body, _ = call("ask", body={"items": [{"question": "Who won?", "context": CONTEXT}] * 2})
    assert status == 200
    event = one_event(caplog, 200, "-")
    assert (event["items"], event["model_id"], event["revision"]) == ("2", "tests/tiny-bert", revision)
    assert event["backend"] in ("onnx", "torch") and int(event["windows"]) == 2 and float(event["model_ms"]) > 0

    # 400: refused before any model work
    for bad in (b"not json", b'{"question": "Who won?", "context": "x", "top_k": 0}', b'{"question": "Who?", "context": "x", "tpo_k": 2}'):
        status, body, _ = call("ask", raw=bad)
        assert (status, body["error"]["code"]) == (400, "bad_request"), bad
        event = one_event(caplog, 400, "bad_request")
        assert (event["windows"], event["model_ms"], event["revision"]) == ("0", "-", "-")

    # 413: over a size budget
    status, body, _ = call("ask", body={"question": "Who won?", "context": "a " * 150})
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert one_event(caplog, 413, "too_large")["items"] == "1"

    # 503 busy: the only inference slot is taken
    with holder.inference_slot(time.monotonic() + 60):
        status, body, headers = call("ask", body={"question": "Who won?", "context": CONTEXT})
    assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "busy", "2")
    event = one_event(caplog, 503, "busy")
    assert event["revision"] == revision  # the model was there; the slot was not

    # 500: an unexpected failure in the engine
    with holder.model(time.monotonic() + 30) as loaded:
        engine: Any = loaded.engine

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "answer", broken)
    status, body, _ = call("ask", body={"question": "Who won?", "context": CONTEXT})
    assert (status, body["error"]["code"]) == (500, "internal_error")
    one_event(caplog, 500, "internal_error")
    assert function_app.holder is holder
