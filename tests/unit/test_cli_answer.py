"""``python -m shared answer``: JSON lines in, one JSON line per item out, in order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "models" / "roberta"
CONTEXT = "The Denver Broncos won Super Bowl 50 in 2016."


@pytest.mark.parametrize("batch", ["1", "3"])
def test_answer_lines_keep_order_and_report_errors(batch: str) -> None:
    lines = [
        json.dumps({"question": "who won?", "context": CONTEXT}),
        "not json",
        json.dumps({"question": "", "context": CONTEXT}),
        json.dumps({"question": "when?", "context": CONTEXT, "top_k": 2}),
        json.dumps({"question": "when?", "context": "x " * 30_000}),
        "",
        json.dumps({"question": "what?", "context": CONTEXT, "max_answer_len": 2}),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "shared", "answer", "--model-dir", str(MODEL), "--batch", batch],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 6
    assert out[0]["answers"][0]["answer"] == CONTEXT[out[0]["answers"][0]["start"] : out[0]["answers"][0]["end"]]
    assert out[1]["error"]["code"] == "bad_request"
    assert "question" in out[2]["error"]["message"]
    assert len(out[3]["answers"]) == 2
    assert out[4]["error"]["code"] == "too_large"
    assert "answers" in out[5]
    assert "answered 3, failed 3" in proc.stderr
