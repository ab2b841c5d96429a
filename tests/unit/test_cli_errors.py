"""A user's mistake on the command line is one ``error:`` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "models" / "distilbert"


def run(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared", *args],
        cwd=ROOT,
        env={**os.environ, "MODEL_STORAGE": "UseDevelopmentStorage=true", **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def pickle_only(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    return folder


@pytest.mark.parametrize("kind", ["missing", "file", "hub-like name", "empty", "pickle only"])
def test_answer_model_dir_mistakes(kind: str, tmp_path: Path) -> None:
    folder = {
        "missing": str(tmp_path / "nope"),
        "file": str(MODEL / "config.json"),
        "hub-like name": "distilbert/distilbert-base-cased-distilled-squad",  # never fetched from the Hub
        "empty": str(tmp_path),
        "pickle only": str(pickle_only(tmp_path / "pickled")),
    }[kind]
    proc = run("answer", "--model-dir", folder, "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    error = last_json(proc)["error"]
    assert isinstance(error, dict)
    assert error["code"] == ("not_found" if kind in ("missing", "file", "hub-like name") else "unsafe_model")
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("value", ["0", "-1", "x", "5000"])
def test_numeric_flags_are_range_checked(value: str) -> None:
    proc = run("answer", "--model-dir", str(MODEL), "--batch", value)
    assert proc.returncode == 2 and "--batch" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("ask", "--question", "q", "--context", "c", "--top-k", value)
    assert proc.returncode == 2 and "--top-k" in proc.stderr and "Traceback" not in proc.stderr


def test_answer_takes_json_for_a_summary_line() -> None:
    item = json.dumps({"question": "Who won?", "context": "The Denver Broncos won the game."})
    proc = run("answer", "--model-dir", str(MODEL), "--json", stdin=item + "\n")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "answers" in lines[0] and lines[-1]["answered"] == 1 and lines[-1]["failed"] == 0


def test_a_malformed_connection_string_names_the_setting() -> None:
    proc = run("status", "--json", env={"MODEL_STORAGE": "garbage"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    error = last_json(proc)["error"]
    assert isinstance(error, dict) and error["code"] == "bad_setting" and "MODEL_STORAGE" in str(error["message"])


def test_a_missing_from_dir_folder_is_not_found(tmp_path: Path) -> None:
    proc = run("isolate", "--from-dir", str(tmp_path / "nope"), "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    error = last_json(proc)["error"]
    assert isinstance(error, dict) and error["code"] == "not_found"


def test_a_bad_setting_is_one_line() -> None:
    proc = run("status", env={"MODEL_KEEP_VERSIONS": "many"})
    assert proc.returncode == 1 and proc.stderr.strip() == "error: MODEL_KEEP_VERSIONS must be a whole number, got 'many'"


# --- messages that name the cause (issue "Every edge a new user hit") ---------------------------

ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port bound but never listening: every connection to it is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield int(sock.getsockname()[1])
    sock.close()


def azurite_at(*, blob: int = 10000, queue: int = 10001, key: str = ACCOUNT_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};"
        f"BlobEndpoint=http://127.0.0.1:{blob}/devstoreaccount1;QueueEndpoint=http://127.0.0.1:{queue}/devstoreaccount1;"
    )


def test_refresh_enqueue_names_the_queue_account(dead_port: int) -> None:
    env = {"MODEL_STORAGE": azurite_at(), "AzureWebJobsStorage": azurite_at(blob=dead_port, queue=dead_port)}
    proc = run("refresh", "--enqueue", "--json", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = str(last_json(proc)["error"]["message"])  # type: ignore[index]
    assert "AzureWebJobsStorage" in message and f"127.0.0.1:{dead_port}" in message, message
    assert "MODEL_STORAGE" not in message and "127.0.0.1:10000" not in message


@pytest.mark.parametrize("key", ["not*base64!", "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UV"])
def test_an_account_key_that_cannot_be_decoded_is_a_bad_setting_before_any_request(key: str, dead_port: int) -> None:
    proc = run("status", "--json", env={"MODEL_STORAGE": azurite_at(blob=dead_port, key=key)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    error = last_json(proc)["error"]
    assert isinstance(error, dict) and error["code"] == "bad_setting", error
    assert "MODEL_STORAGE" in error["message"] and "AccountKey" in error["message"] and "base64" in error["message"]
    assert "Azurite" not in error["message"]
