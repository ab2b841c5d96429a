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
    )
    assert proc.returncode == 1, proc.stderr  # some lines failed: each has its error line, the summary counts them
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 6
    assert out[0]["answers"][0]["answer"] == CONTEXT[out[0]["answers"][0]["start"] : out[0]["answers"][0]["end"]]
    assert out[1]["error"]["code"] == "bad_request"
    assert "question" in out[2]["error"]["message"]
    assert len(out[3]["answers"]) == 2
    assert out[4]["error"]["code"] == "too_large"
    assert "answers" in out[5]
    assert "answered 3, failed 3" in proc.stderr


def test_a_line_may_be_a_batch_and_is_checked_as_http_checks_it() -> None:
    lines = [
        json.dumps({"items": [{"question": "who won?", "context": CONTEXT}, {"question": "when?", "context": CONTEXT, "top_k": 2.0}]}),
        json.dumps({"question": "who won?", "context": CONTEXT, "tpo_k": 2}),
        json.dumps({"question": "who won?", "context": CONTEXT, "top_k": None}),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "shared", "answer", "--model-dir", str(MODEL), "--batch", "4", "--json"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    batch, unknown, null, summary = (json.loads(line) for line in proc.stdout.splitlines())
    assert [len(result["answers"]) for result in batch["results"]] == [1, 2]
    assert unknown["error"]["message"].startswith("unknown field 'tpo_k'")
    assert len(null["answers"]) == 1
    assert (summary["answered"], summary["failed"]) == (2, 1)


@pytest.mark.slow
def test_answer_through_onnx_matches_torch() -> None:
    lines = "\n".join(json.dumps({"question": q, "context": CONTEXT, "top_k": 2}) for q in ("who won?", "when?", "which bowl?")) + "\n"

    def run(*flags: str) -> list[dict[str, object]]:
        proc = subprocess.run(
            [sys.executable, "-m", "shared", "answer", "--model-dir", str(MODEL), "--batch", "2", *flags],
            input=lines,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            check=True,
        )
        assert "Traceback" not in proc.stderr
        return [json.loads(line) for line in proc.stdout.splitlines()]

    torch_fp32, onnx_fp32, onnx_int8 = run(), run("--backend", "onnx"), run("--backend", "onnx", "--quantize", "int8")
    for got, want in zip(onnx_fp32, torch_fp32, strict=True):
        assert [(a["answer"], a["start"]) for a in got["answers"]] == [(a["answer"], a["start"]) for a in want["answers"]]  # type: ignore[index]
        assert [a["score"] for a in got["answers"]] == pytest.approx([a["score"] for a in want["answers"]], abs=1e-5)  # type: ignore[index]
    for line in onnx_int8:
        for a in line["answers"]:  # type: ignore[attr-defined]
            assert CONTEXT[a["start"] : a["end"]] == a["answer"]


def test_answer_onnx_on_a_folder_without_tokenizer_json_is_one_line(tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((MODEL / name).read_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "shared", "answer", "--model-dir", str(tmp_path), "--backend", "onnx"],
        input="",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "tokenizer.json" in proc.stderr
