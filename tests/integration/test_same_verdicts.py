"""One check of a question, whichever way it comes in: the same bodies sent to ``POST /api/ask`` (the
registered function, called through the azure.functions API) and, as lines, to ``python -m shared
answer`` (a process of its own, on the same model) get the same verdicts and the same messages.

The two differ only where the transport does: a body that is not a JSON object is "the request
body" over HTTP and "line N" on the command line, and only HTTP has a limit in bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.serving.holder import ModelHolder
from shared.store.model_store import ModelStore
from tests.conftest import ROOT
from tests.fixtures.function_calls import call
from tests.fixtures.tiny_models import publish

pytestmark = pytest.mark.integration

CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."
Q = {"question": "Who won?", "context": CONTEXT}
LIMITS = {"QA_MAX_CONTEXT_CHARS": "300", "QA_MAX_QUESTION_CHARS": "60", "QA_MAX_QUESTION_TOKENS": "12", "QA_MAX_ITEMS": "3"}

# JSON objects: the verdict and the message are the same, to the letter
BODIES: list[Any] = [
    Q,
    {**Q, "top_k": 3},
    {**Q, "tpo_k": 2},  # unknown field
    {**Q, "top_k": 2.0},  # a whole number written 2.0
    {**Q, "top_k": 2.5},
    {**Q, "top_k": "2"},
    {**Q, "top_k": True},
    {**Q, "top_k": 0},
    {**Q, "top_k": None, "max_answer_len": None, "handle_impossible_answer": None},  # null optional fields
    {**Q, "handle_impossible_answer": 1},
    {"question": 3, "context": CONTEXT},
    {"question": "Who won?", "context": ["a"]},
    {"question": "Who won?"},
    {"question": " \t", "context": CONTEXT},
    {"question": "?!", "context": CONTEXT},  # no letter or digit
    {"question": "Who won?", "context": "Denver won the game. " * 15},  # 315 characters: over QA_MAX_CONTEXT_CHARS
    {"question": "Who won the game in the end, and who was it against?" + "?" * 10, "context": CONTEXT},  # 62 characters
    {"question": " ".join(["who"] * 13), "context": CONTEXT},  # 13 tokens: the engine's limit
    {"question": "Who\ud800 won?", "context": CONTEXT},  # a lone surrogate (JSON "\ud800")
    {"question": "Who won?", "context": "Denver\udce9 won."},
    {"items": [Q, {**Q, "top_k": 2}]},
    {"items": [Q, {**Q, "surprise": True}]},
    {"items": [Q, {"items": [Q]}]},  # a batch nested in a batch
    {"items": [Q, "text"]},
    {"items": []},
    {"items": None},
    {"items": [Q] * 4},  # over QA_MAX_ITEMS
    {**Q, "items": [Q]},
    {"items": [Q, {"question": " ".join(["who"] * 13), "context": CONTEXT}]},  # the engine names the item
]
# not JSON objects: the same verdict, the message naming where the text came from
RAW: list[bytes] = [b"[1, 2]", b'"text"', b"not json", b"{", "Qui a gagné?".encode("latin-1")]


def verdict(body: dict[str, Any]) -> Any:
    """``("answered", spans per item)`` or ``(code, message)``, from an HTTP body or an output line."""
    if "error" in body:
        return body["error"]["code"], body["error"]["message"]
    results = body.get("results", [body])
    return "answered", [[(a["answer"], a["start"], a["end"]) for a in result.get("answers", [result])] for result in results]


def answer_lines(model_dir: Path, env: dict[str, str], lines: list[bytes]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "shared", "answer", "--model-dir", str(model_dir), "--batch", "1"],
        cwd=ROOT, env={**os.environ, **env}, input=b"\n".join(lines) + b"\n", capture_output=True, timeout=300,
    )  # fmt: skip
    stderr = proc.stderr.decode()
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 1, stderr  # some lines fail: exit 1, the summary counts them
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert len(out) == len(lines), stderr
    return out


def test_http_and_the_command_line_give_the_same_verdicts(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[..., ModelHolder]
) -> None:
    publish(store, tiny_bert_dir)
    settings = {**LIMITS, "QA_BACKEND": "torch"}  # the command line answers with torch from the folder
    install({**env, **settings})
    lines = [json.dumps(body).encode() for body in BODIES] + RAW
    cli = answer_lines(tiny_bert_dir, settings, lines)

    differences = []
    for number, (body, line) in enumerate(zip([*BODIES, *RAW], cli, strict=True), start=1):
        status, http, _ = call("ask", raw=body) if isinstance(body, bytes) else call("ask", body=body)
        assert (status == 200) == ("error" not in http)
        expected = verdict(http)
        if isinstance(body, bytes):  # the same message, about "line N" instead of "the request body"
            code, message = expected
            expected = code, message.replace("the request body", f"line {number}")
        if verdict(line) != expected:
            differences.append((json.dumps(body, default=repr)[:60], "http", status, expected, "cli", verdict(line)))
    assert differences == []

    answered = [verdict(line)[0] == "answered" for line in cli]
    assert answered[:2] == [True, True] and answered.count(True) == 5  # Q, top_k 3, 2.0, nulls, a good batch
    messages = [line["error"]["message"] for line in cli if "error" in line]
    assert "'context' has 315 characters; the limit is 300 (QA_MAX_CONTEXT_CHARS)" in messages
    assert "'question' has 13 tokens; the limit is 12 (QA_MAX_QUESTION_TOKENS)" in messages
    assert any(m.startswith("unknown field 'tpo_k'") for m in messages)
    assert any(m.startswith("'question' is not valid Unicode text: a lone surrogate (U+D800)") for m in messages)
    assert any(m.startswith(f"line {len(lines)} is not UTF-8 (looks like Latin-1") for m in messages)
