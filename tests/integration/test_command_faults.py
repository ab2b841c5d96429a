"""Storage that stops under a command: ``isolate`` at every step of a first refresh, and
``build-artifacts`` at each step of an artifact's build (storage behind a proxy that is closed there).

Each command ends with one ``error:`` line naming the storage endpoint and no traceback from any
thread (the lease's renewal and the outcome's record included); once storage is back and the dead
command's lease is broken, the same command resumes (``isolate`` copies only what is missing) and the
store verifies. How long each command took after the stop is printed, not asserted: these machines
are noisy, and the figures go to the docs.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.refresh.isolation import LocalDirSource
from shared.settings import Settings
from shared.store.model_store import ModelStore
from tests.fixtures.cli_runs import run_cli_here
from tests.fixtures.refresh_faults import WEIGHTS, Step, arm, steps
from tests.fixtures.storage_proxy import StorageProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL_ID = "tests/tiny-bert"
BLOCK_MB = "1"

BUILD_STEPS = [
    Step("reading the version's weights", "stream_file", 0, True, 0),
    Step("model.onnx uploaded", "upload_folder_file", 1, False, 0),
    Step("both blobs uploaded, before the record", "commit_placed", 1, False, 0),
]


def stopped_at(step: Step, monkeypatch: pytest.MonkeyPatch, proxy: StorageProxy, stopped: list[float]) -> Callable[[], None]:
    """Arm ``step`` on every writing store the command makes: there, the proxy stops."""
    original = ModelStore.from_settings.__func__  # type: ignore[attr-defined]

    def armed(cls: type[ModelStore], settings: Settings, **options: Any) -> ModelStore:
        store: ModelStore = original(cls, settings, **options)
        if options.get("profile") == "command":
            store.block_size = 64 * 1024  # several blocks even for a tiny model's weights

            def stop() -> None:
                proxy.stop()
                stopped.append(time.monotonic())

            arm(store, step, stop)
        return store

    monkeypatch.setattr(ModelStore, "from_settings", classmethod(armed))
    return monkeypatch.undo


def settings_for(connection: str, container: str) -> dict[str, str]:
    return {
        "MODEL_STORAGE": connection,
        "MODEL_CONTAINER": container,
        "MODEL_ID": MODEL_ID,
        "MODEL_ARTIFACTS": "none",
        "MODEL_BLOCK_SIZE_MB": BLOCK_MB,
    }


def expect_one_error_line(label: str, code: int, err: str, tracebacks: list[str], endpoint: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, f"{label}: exit {code}, {err[-1500:]}"
    assert endpoint in errors[0], f"{label}: the error does not name {endpoint}: {errors[0]}"
    assert not tracebacks, f"{label}: tracebacks {tracebacks}"


def isolate_steps(folder: Path) -> list[Step]:
    source = LocalDirSource(folder, block_size=64 * 1024)
    files = [entry.name for entry in source.snapshot().files]
    blocks = -(-next(e.size for e in source.snapshot().files if e.name == WEIGHTS) // (64 * 1024))
    return [s for s in steps(files, weights_blocks=blocks, update=False) if s.operation != "write_last_refresh"]


def test_isolate_facing_storage_that_stops_at_each_step_ends_in_one_line_and_resumes(
    azurite: str, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seconds: dict[str, float] = {}
    for step in isolate_steps(tiny_bert_dir):
        container = f"c{uuid.uuid4().hex[:20]}"
        proxy = StorageProxy.for_blob_endpoint(azurite)
        proxy.start()
        env = settings_for(proxy.connection_string(azurite), container)
        stopped: list[float] = []
        undo = stopped_at(step, monkeypatch, proxy, stopped)
        try:
            guard = threading.Timer(120, proxy.start)  # only stops a broken run from hanging CI
            guard.start()
            code, _, err, tracebacks = run_cli_here(
                env, "isolate", "--from-dir", str(tiny_bert_dir), "--skip-canary", "--model-id", MODEL_ID
            )
            ended = time.monotonic()
            guard.cancel()
        finally:
            undo()
        assert stopped, f"{step.name}: the command never reached the step"
        seconds[step.name] = ended - stopped[0]
        expect_one_error_line(step.name, code, err, tracebacks, f"127.0.0.1:{proxy.port}")
        # storage back; the dead command's lease is broken by hand (it lapses within 60 s anyway)
        proxy.start()
        code, out, err, tracebacks = run_cli_here(env, "repair", "--break-lock")
        assert not tracebacks and code in (0, 1), err
        code, out, err, tracebacks = run_cli_here(env, "isolate", "--from-dir", str(tiny_bert_dir), "--skip-canary", "--model-id", MODEL_ID)
        assert code == 0 and not tracebacks, f"{step.name}: resume: {err[-1500:]}"
        expected = "up_to_date" if step.pointer_moved else "made_current" if step.manifest_written else "published"
        assert out["outcome"] == expected, (step.name, out)
        if not step.manifest_written:  # only what was missing is copied
            assert out["files_reused"] == step.files_committed, (step.name, out)
        code, out, err, tracebacks = run_cli_here(env, "verify")
        assert code == 0 and out["ok"] and not tracebacks, err
        proxy.stop()
        _delete(azurite, container)
    print(
        "\nisolate, storage stopped at each step: seconds from the stop to the command's end: "
        + ", ".join(f"{name}: {value:.1f}" for name, value in seconds.items())
    )


def test_build_artifacts_facing_storage_that_stops_at_each_step_ends_in_one_line_and_resumes(
    azurite: str, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seconds: dict[str, float] = {}
    for step in BUILD_STEPS:
        container = f"c{uuid.uuid4().hex[:20]}"
        proxy = StorageProxy.for_blob_endpoint(azurite)
        proxy.start()
        env = settings_for(proxy.connection_string(azurite), container)
        code, _, err, _ = run_cli_here(env, "isolate", "--from-dir", str(tiny_bert_dir), "--skip-canary", "--model-id", MODEL_ID)
        assert code == 0, err
        stopped: list[float] = []
        undo = stopped_at(step, monkeypatch, proxy, stopped)
        try:
            code, _, err, tracebacks = run_cli_here(env, "build-artifacts", "--variant", "fp32", "--skip-canary")
            ended = time.monotonic()
        finally:
            undo()
        assert stopped, f"{step.name}: the command never reached the step"
        seconds[step.name] = ended - stopped[0]
        expect_one_error_line(step.name, code, err, tracebacks, f"127.0.0.1:{proxy.port}")
        proxy.start()
        run_cli_here(env, "repair", "--break-lock")
        code, out, err, tracebacks = run_cli_here(env, "build-artifacts", "--variant", "fp32", "--skip-canary")
        assert code == 0 and out["artifacts"] == {"fp32": "built"} and not tracebacks, f"{step.name}: resume: {err[-1500:]}"
        code, out, err, tracebacks = run_cli_here({**env, "MODEL_ARTIFACTS": "fp32"}, "verify")
        assert code == 0 and out["ok"] and not tracebacks, err
        proxy.stop()
        _delete(azurite, container)
    print(
        "\nbuild-artifacts, storage stopped at each step: seconds from the stop to the command's end: "
        + ", ".join(f"{name}: {value:.1f}" for name, value in seconds.items())
    )


def _delete(azurite: str, container: str) -> None:
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(azurite).delete_container(container)
