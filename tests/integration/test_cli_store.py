"""The operators' commands, run as a user would: ``python -m shared ...`` against Azurite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.settings import Settings
from shared.store.model_store import ModelStore
from tests.fixtures.cli_runs import run_cli as run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "tests/cli-bert"  # the fixture folders' config.json names no model: each isolate passes --model-id


@pytest.fixture
def cli_env(azurite: str, container_name: str) -> dict[str, str]:
    # a canary without an expected answer: the random-weights fixture must give any valid span
    canary = json.dumps({"question": "Who won?", "context": "The Denver Broncos won the game."})
    # MODEL_ARTIFACTS=none: ONNX artifacts have their own tests (test_artifacts.py); exports are slow
    return {
        "MODEL_STORAGE": azurite,
        "MODEL_CONTAINER": container_name,
        "MODEL_ID": MODEL_ID,
        "MODEL_CANARY": canary,
        "MODEL_ARTIFACTS": "none",
    }


def test_isolate_status_verify_rollback(cli_env: dict[str, str], tiny_bert_dir: Path, tmp_path: Path) -> None:
    code, first, _ = run(cli_env, "isolate", "--from-dir", str(tiny_bert_dir), "--model-id", MODEL_ID)
    assert code == 0 and first["outcome"] == "published"
    code, again, _ = run(cli_env, "isolate", "--from-dir", str(tiny_bert_dir), "--model-id", MODEL_ID)
    assert code == 0 and again["outcome"] == "up_to_date" and again["bytes_moved"] == 0

    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_bert_dir, other)
    (other / "tokenizer_config.json").write_text((other / "tokenizer_config.json").read_text().replace("512", "384"))
    code, second, _ = run(cli_env, "isolate", "--from-dir", str(other), "--model-id", MODEL_ID)
    assert code == 0 and second["outcome"] == "published"

    code, status, _ = run(cli_env, "status")
    assert code == 0
    assert status["pointer"]["revision"] == second["revision"]  # type: ignore[index]
    assert len(status["versions"]) == 2  # type: ignore[arg-type]
    assert status["last_refresh"]["outcome"] == "published"  # type: ignore[index]

    code, verified, _ = run(cli_env, "verify")
    assert code == 0 and verified["ok"] is True

    code, rolled, _ = run(cli_env, "rollback")
    assert code == 0 and rolled["revision"] == first["revision"] and rolled["pinned"] is True

    settings = Settings.from_env(cli_env)
    store = ModelStore.from_settings(settings)
    blob = store.file_blob(str(first["revision"]), "model.safetensors")
    props = blob.get_blob_properties()
    data = bytearray(blob.download_blob().readall())
    data[100] ^= 0x01
    blob.upload_blob(bytes(data), overwrite=True, metadata=props.metadata)
    code, verified, _ = run(cli_env, "verify", "--revision", str(first["revision"]))
    assert code == 1 and verified["ok"] is False
    assert "model.safetensors" in verified["problems"][0]  # type: ignore[index]
    store.container.delete_container()


def test_errors_are_clear_and_json(cli_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.txt").write_text("[UNK]\n")
    (tmp_path / "tf_model.h5").write_bytes(b"x")  # weights of another framework: never converted
    code, out, err = run(cli_env, "isolate", "--from-dir", str(tmp_path), "--model-id", MODEL_ID)
    assert code == 1 and out["error"]["code"] == "unsafe_model"  # type: ignore[index]
    assert "no safetensors weights (found tf_model.h5)" in err
    code, out, _ = run(cli_env, "rollback")
    assert code == 1 and out["error"]["code"] == "not_found"  # type: ignore[index]
    code, out, _ = run({**cli_env, "MODEL_KEEP_VERSIONS": "zero"}, "status")
    assert code == 1 and "MODEL_KEEP_VERSIONS" in out["error"]["message"]  # type: ignore[index]


def pointer_of(env: dict[str, str]) -> tuple[str, bool]:
    pointer = ModelStore.from_settings(Settings.from_env(env)).read_pointer()
    assert pointer is not None
    return pointer.revision, pointer.pinned


def test_isolate_says_what_it_did_and_moves_a_pin_only_when_asked(cli_env: dict[str, str], tiny_bert_dir: Path, tmp_path: Path) -> None:
    """One rule for "the version already exists": a version the user names becomes current, and
    the output says so; a pinned pointer moves only for a named version or --unpin, saying so."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_bert_dir, other)
    (other / "tokenizer_config.json").write_text((other / "tokenizer_config.json").read_text().replace("512", "384"))
    code, a, text = run(cli_env, "isolate", "--from-dir", str(tiny_bert_dir), "--model-id", MODEL_ID)
    assert code == 0 and a["outcome"] == "published" and "now current" in text
    code, b, text = run(cli_env, "isolate", "--from-dir", str(other), "--model-id", MODEL_ID)
    assert code == 0 and b["outcome"] == "published" and f"now current (was {a['revision']})" in text

    # stored, not current: made current, 0 bytes, and said so
    code, out, text = run(cli_env, "isolate", "--from-dir", str(tiny_bert_dir), "--model-id", MODEL_ID)
    assert code == 0 and (out["outcome"], out["revision"], out["bytes_moved"]) == ("made_current", a["revision"], 0)
    assert "already stored; now current" in text and str(b["revision"]) in text
    assert pointer_of(cli_env) == (a["revision"], False)
    assert ModelStore.from_settings(Settings.from_env(cli_env)).read_last_refresh()["outcome"] == "made_current"  # type: ignore[index]
    code, out, text = run(cli_env, "isolate", "--from-dir", str(tiny_bert_dir), "--model-id", MODEL_ID)
    assert code == 0 and out["outcome"] == "up_to_date" and "already current" in text

    # the current version, pinned: naming it again keeps the pin; --unpin lifts it, saying so
    code, _, _ = run(cli_env, "rollback", "--to", str(a["revision"]))
    assert code == 0 and pointer_of(cli_env) == (a["revision"], True)
    code, out, text = run(cli_env, "isolate", "--from-dir", str(tiny_bert_dir), "--model-id", MODEL_ID)
    assert code == 0 and out["outcome"] == "up_to_date" and "already current" in text and "pinned" in text
    assert pointer_of(cli_env) == (a["revision"], True)
    code, out, text = run(cli_env, "isolate", "--from-dir", str(tiny_bert_dir), "--model-id", MODEL_ID, "--unpin")
    assert code == 0 and out["outcome"] == "up_to_date" and "unpinned" in text
    assert pointer_of(cli_env) == (a["revision"], False)

    # --repair of a stored version that is not current: the same rule (it becomes current)
    code, out, text = run(cli_env, "isolate", "--from-dir", str(other), "--model-id", MODEL_ID, "--repair")
    assert code == 0 and (out["outcome"], out["revision"]) == ("made_current", b["revision"]) and "now current" in text
    assert pointer_of(cli_env) == (b["revision"], False)

    # a pinned pointer moves for a named version (a folder names its version), and the output says so
    code, _, _ = run(cli_env, "rollback", "--to", str(a["revision"]))
    code, out, text = run(cli_env, "isolate", "--from-dir", str(other), "--model-id", MODEL_ID)
    assert code == 0 and out["outcome"] == "made_current" and f"pinned at {a['revision']}" in text
    assert pointer_of(cli_env) == (b["revision"], False)


@pytest.mark.parametrize("flags", [(), ("--json",)], ids=["text", "json"])
def test_a_reader_that_stops_early_ends_the_command_quietly(cli_env: dict[str, str], flags: tuple[str, ...]) -> None:
    """``status | true``: the pipe's reader is gone before the command writes; it exits 141 (as a
    command killed by SIGPIPE) with nothing on stderr but its own lines, never a traceback."""
    import os
    import subprocess
    import sys

    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the first write: a closed pipe, every time
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "shared", "status", *flags],
            cwd=ROOT, env={**os.environ, **cli_env}, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_status_through_head_prints_its_first_line_only(cli_env: dict[str, str]) -> None:
    """The same through a shell pipe to ``head -1``: its first line, and no traceback whenever head exits."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        ["bash", "-c", f"'{sys.executable}' -m shared status | head -1"],
        cwd=ROOT, env={**os.environ, **cli_env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("model: tests/cli-bert in container "), proc
    assert len(proc.stdout.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
