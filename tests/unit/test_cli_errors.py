"""A user's mistake on the command line is one ``error:`` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
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


@pytest.mark.parametrize(
    ("flag", "args"),
    [
        ("--from-dir", ("isolate", "--from-dir")),
        ("--model-dir", ("answer", "--model-dir")),
        ("--context-file", ("ask", "--question", "Who won?", "--context-file")),
    ],
)
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_path_flag_is_a_usage_error_naming_it(flag: str, args: tuple[str, ...], value: str) -> None:
    """``--from-dir "$DIR"`` with DIR unset must not mean "no folder" (isolate would go to the Hub)."""
    proc = run(*args, value, env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"argument {flag}: must not be empty" in proc.stderr.strip().splitlines()[-1], proc.stderr


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


# --- messages that name the cause -----------------------------------------------------------------

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


def test_ask_with_storage_down_names_the_endpoint_and_azurite(dead_port: int) -> None:
    down = {"MODEL_STORAGE": azurite_at(blob=dead_port)}
    proc = run("ask", "--question", "Who won?", "--context", "The Broncos won.", "--json", env=down)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = str(last_json(proc)["error"]["message"])  # type: ignore[index]
    assert f"127.0.0.1:{dead_port}" in message and "Azurite" in message and "MODEL_STORAGE" in message, message
    assert "GET /api/model" not in message


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


LATIN1_LINE = '{"question": "Qui a gagné?", "context": "Les Broncos ont gagné."}\n'.encode("latin-1")
UTF16_LINES = '{"question": "Who won?", "context": "The Broncos won."}\n'.encode("utf-16")


@pytest.mark.parametrize(("data", "looks_like"), [(LATIN1_LINE, "Latin-1"), (UTF16_LINES, "UTF-16")])
def test_answer_input_that_is_not_utf8_says_so(data: bytes, looks_like: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shared", "answer", "--model-dir", str(MODEL)], cwd=ROOT, input=data, capture_output=True, timeout=120
    )
    out = proc.stdout.decode() + proc.stderr.decode()
    assert "Traceback" not in out and "surrogate" not in out, out
    assert "not UTF-8" in out and looks_like in out, out


@pytest.mark.parametrize("flag", ["--question", "--context"])
def test_an_argument_that_is_not_utf8_gets_the_message_of_a_file(flag: str, dead_port: int) -> None:
    """Argument bytes reach Python as lone surrogates; the message names the flag and the encoding
    (as --context-file does for a file of the same bytes), not a surrogate."""
    latin1 = "Qui a gagné?".encode("latin-1")
    args = {"--question": latin1, "--context": b"Who won?"}
    if flag == "--context":
        args = {"--question": b"Who won?", "--context": latin1}
    command = [sys.executable, "-m", "shared", "ask", "--question", args["--question"], "--context", args["--context"], "--json"]
    env = {**os.environ, "MODEL_STORAGE": azurite_at(blob=dead_port)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = str(last_json(proc)["error"]["message"])  # type: ignore[index]
    assert message.startswith(f"{flag} is not UTF-8 (looks like Latin-1"), message
    assert "iconv" in message and "surrogate" not in message, message


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (bytes(range(256)) * 4, "is not UTF-8 (byte 0x80 at offset 128)"),  # binary: no guess
        (b"\x00\x01\x02\x03" + bytes(range(0x80, 0x100)), "is not UTF-8 (byte 0x80 at offset 4)"),
        (b"ab\x00cd", "is not UTF-8 text (a NUL byte at offset 2)"),  # one NUL is not UTF-16
        ("Les Broncos ont gagné.".encode("utf-16-le"), "looks like UTF-16"),  # no BOM: NULs every other byte
        ("Les Broncos ont gagné.".encode("utf-16-be"), "looks like UTF-16"),
        ("Les Broncos ont gagné.".encode("utf-16"), "looks like UTF-16"),
        ("Les Broncos ont gagné.".encode("utf-32"), "looks like UTF-32"),
        ("Les Broncos ont gagné.".encode("cp1252"), "looks like Latin-1 or Windows-1252: byte 0xE9"),
    ],
)
def test_utf16_is_named_only_when_the_bytes_show_it(data: bytes, says: str) -> None:
    from shared.engine.question_answering import decode_utf8
    from shared.errors import InputError

    with pytest.raises(InputError) as caught:
        decode_utf8(data, what="the input")
    assert says in caught.value.message, caught.value.message
    if "UTF-16" not in says:
        assert "UTF-16" not in caught.value.message


def test_random_bytes_are_never_said_to_be_utf16() -> None:
    import random

    from shared.engine.question_answering import decode_utf8
    from shared.errors import InputError

    generator = random.Random(24)
    for _ in range(200):
        data = bytes(generator.randrange(256) for _ in range(generator.randrange(2, 600)))
        try:
            decode_utf8(data, what="the input")
        except InputError as err:
            assert "UTF-16" not in err.message and "UTF-32" not in err.message, (data[:20], err.message)


def test_a_request_body_that_is_not_utf8_says_so() -> None:
    from shared.errors import InputError
    from shared.serving.api import parse_json_object

    with pytest.raises(InputError, match=r"not UTF-8 \(looks like Latin-1"):
        parse_json_object(LATIN1_LINE, max_bytes=1 << 20)
    with pytest.raises(InputError, match=r"not UTF-8 \(looks like UTF-16"):
        parse_json_object(UTF16_LINES, max_bytes=1 << 20)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_answer_with_a_truncated_config_says_it_is_not_json(backend: str, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    (folder / "config.json").write_bytes((MODEL / "config.json").read_bytes()[:100])
    proc = run("answer", "--model-dir", str(folder), "--backend", backend, "--json", stdin='{"question": "q", "context": "c"}\n')
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = str(last_json(proc)["error"]["message"])  # type: ignore[index]
    assert "config.json" in message and "not valid JSON" in message, message


def test_isolate_of_a_truncated_config_says_it_is_not_json_before_storage(tmp_path: Path, dead_port: int) -> None:
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    (folder / "config.json").write_bytes((MODEL / "config.json").read_bytes()[:100])
    proc = run("isolate", "--from-dir", str(folder), "--json", env={"MODEL_STORAGE": azurite_at(blob=dead_port)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = str(last_json(proc)["error"]["message"])  # type: ignore[index]
    assert "config.json" in message and "not valid JSON" in message and "storage" not in message.lower(), message


def test_an_empty_folder_says_which_files_a_model_folder_needs(tmp_path: Path) -> None:
    proc = run("answer", "--model-dir", str(tmp_path), "--json")
    assert proc.returncode == 1
    message = str(last_json(proc)["error"]["message"])  # type: ignore[index]
    assert "empty" in message and "config.json" in message and ".safetensors" in message and "tokenizer" in message, message


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_answer_on_a_malformed_safetensors_file_names_it(backend: str, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    (folder / "model.safetensors").write_bytes((MODEL / "model.safetensors").read_bytes()[:5000])
    proc = run("answer", "--model-dir", str(folder), "--backend", backend, "--json", stdin='{"question": "q", "context": "c"}\n')
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = str(last_json(proc)["error"]["message"])  # type: ignore[index]
    assert "model.safetensors" in message and "bug" not in message, message


def test_no_library_warning_leaks_from_an_export() -> None:
    proc = run("answer", "--model-dir", str(MODEL), "--backend", "onnx", stdin='{"question": "Who won?", "context": "The Broncos won."}\n')
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("settings", ["[]", '"Values"', '{"Values": []}', "{"])
def test_local_settings_that_are_not_an_object_say_so(settings: str, tmp_path: Path) -> None:
    (tmp_path / "local.settings.json").write_text(settings)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "local_settings.py"), str(tmp_path / "local.settings.json")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: local.settings.json") and "attribute" not in line, line
    assert ("not valid JSON" in line) if settings == "{" else ("must be a JSON object" in line or '"Values" must be an object' in line)


def test_local_settings_export_only_what_the_environment_lacks(tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": {"MODEL_ID": "a/b c", "MODEL_CONTAINER": "models", "EMPTY": ""}}))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "local_settings.py"), str(path)],
        env={**os.environ, "MODEL_CONTAINER": "mine"}, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert proc.stdout.splitlines() == ["export MODEL_ID='a/b c'"]


def test_ask_reads_a_long_context_from_stdin_or_a_file(tmp_path: Path, dead_port: int) -> None:
    """1 MB does not fit one command-line argument (Linux: 128 KiB); from stdin it reaches the app,
    whose limit then answers (before storage is touched)."""
    context = "The Denver Broncos won the game. " * 32_000
    down = {"MODEL_STORAGE": azurite_at(blob=dead_port)}
    proc = run("ask", "--question", "Who won?", "--context-file", "-", "--json", env=down, stdin=context)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    error = last_json(proc)["error"]
    assert isinstance(error, dict) and error["code"] == "too_large" and f"{len(context)}" in error["message"], error
    (tmp_path / "latin1.txt").write_bytes("Les Broncos ont gagné.".encode("latin-1"))
    proc = run("ask", "--question", "Qui?", "--context-file", str(tmp_path / "latin1.txt"), "--json")
    message = str(last_json(proc)["error"]["message"])  # type: ignore[index]
    assert proc.returncode == 1 and "latin1.txt" in message and "not UTF-8" in message, message
    proc = run("ask", "--question", "Who?", "--context", "x", "--context-file", "-")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
