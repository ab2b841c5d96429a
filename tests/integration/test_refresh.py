"""Refresh from a local fake Hub (``HF_ENDPOINT``) into Azurite: streamed, pinned, verified, validated."""

from __future__ import annotations

import base64
import filecmp
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest

import function_app
from shared.errors import (
    IntegrityError,
    NotFoundError,
    RefreshAlreadyRunningError,
    SourceUnavailableError,
    UnsafeModelError,
    ValidationFailedError,
)
from shared.refresh.worker import handle_message, run_refresh
from shared.serving.holder import ModelHolder
from shared.settings import Settings
from shared.store.model_store import ModelStore
from shared.store.refresh_queue import RefreshRequest
from tests.conftest import registered_functions
from tests.fixtures.fake_hub import FakeHubServer
from tests.fixtures.function_calls import call
from tests.fixtures.tiny_models import build_bert

pytestmark = pytest.mark.integration
REPO = "org/tiny-bert"
CANARY = {"question": "Who won the game?", "context": "The Denver Broncos won the game in 2016."}
FUNCTIONS = registered_functions()


@pytest.fixture
def hub() -> Iterator[FakeHubServer]:
    with FakeHubServer() as server:
        yield server


@pytest.fixture
def env(azurite: str, container_name: str, hub: FakeHubServer) -> dict[str, str]:
    return {
        "MODEL_STORAGE": azurite,
        "AzureWebJobsStorage": azurite,
        "MODEL_CONTAINER": container_name,
        "MODEL_ID": REPO,
        "HF_ENDPOINT": hub.endpoint,
        "MODEL_CANARY": json.dumps(CANARY),
        "MODEL_REFRESH_QUEUE": f"refresh-{uuid.uuid4().hex[:12]}",
        "MODEL_REFRESH_SCHEDULE": "0 0 3 * * 0",
        "MODEL_BLOCK_SIZE_MB": "1",
        "MODEL_ARTIFACTS": "none",  # the refresh's artifact builds: test_artifacts.py
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def store(settings: Settings) -> Iterator[ModelStore]:
    model_store = ModelStore.from_settings(settings)
    model_store.ensure_container()
    yield model_store
    model_store.container.delete_container()


@pytest.fixture
def queue(settings: Settings) -> Iterator[Any]:
    from shared.store.storage import queue_client

    client = queue_client(settings.require_queue_storage(), settings.refresh_queue)
    yield client
    try:
        client.delete_queue()
    except Exception:  # noqa: BLE001 - never created in some tests
        pass


@pytest.fixture
def big_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Large enough (about 3.5 MB) that the weights span several 1 MB blocks."""
    return build_bert(tmp_path_factory.mktemp("bigger-bert"), hidden=192, layers=2)


def test_fresh_isolation_from_the_hub(settings: Settings, store: ModelStore, hub: FakeHubServer, big_bert: Path, tmp_path: Path) -> None:
    commit = hub.hub.publish(REPO, big_bert)
    result = run_refresh(settings, RefreshRequest())
    assert (result.outcome, result.revision) == ("published", commit)
    assert result.bytes_moved == sum(p.stat().st_size for p in big_bert.iterdir())
    pointer = store.read_pointer()
    assert pointer is not None and pointer.revision == commit and not pointer.pinned
    manifest = store.require_manifest(commit)
    assert manifest.source == hub.endpoint and manifest.source_revision == "main"
    store.download_version(commit, tmp_path / "out")
    names = sorted(p.name for p in big_bert.iterdir())
    assert filecmp.cmpfiles(big_bert, tmp_path / "out", names, shallow=False)[0] == names
    last = store.read_last_refresh()
    assert last is not None and last["outcome"] == "published" and last["revision"] == commit and last["bytes_moved"] > 0


def test_second_run_is_a_noop_that_moves_no_bytes(settings: Settings, store: ModelStore, hub: FakeHubServer, tiny_bert_dir: Path) -> None:
    hub.hub.publish(REPO, tiny_bert_dir)
    run_refresh(settings, RefreshRequest())
    hub.hub.requests.clear()
    again = run_refresh(settings, RefreshRequest())
    assert again.outcome == "up_to_date" and again.bytes_moved == 0
    assert all(path.startswith("/api/models/") for path in hub.hub.requests), hub.hub.requests  # no file fetched
    assert store.read_last_refresh()["outcome"] == "up_to_date"  # type: ignore[index]


def test_new_commit_is_picked_up(settings: Settings, store: ModelStore, hub: FakeHubServer, tiny_bert_dir: Path, tmp_path: Path) -> None:
    first = hub.hub.publish(REPO, tiny_bert_dir)
    run_refresh(settings, RefreshRequest())
    second = hub.hub.publish(REPO, build_bert(tmp_path / "v2", seed=5))
    result = run_refresh(settings, RefreshRequest())
    assert result.outcome == "published" and result.revision == second and result.previous_revision == first
    pointer = store.read_pointer()
    assert pointer is not None and pointer.revision == second and pointer.previous == (first,)


def test_a_tag_or_commit_resolves_and_moves_a_pinned_pointer(
    settings: Settings, store: ModelStore, hub: FakeHubServer, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    first = hub.hub.publish(REPO, tiny_bert_dir, tag="v1")
    run_refresh(settings, RefreshRequest())
    second = hub.hub.publish(REPO, build_bert(tmp_path / "v2", seed=6))
    run_refresh(settings, RefreshRequest())
    store.rollback()  # pinned at first
    assert run_refresh(settings, RefreshRequest()).outcome == "skipped"
    pointer = store.read_pointer()
    assert pointer is not None and pointer.revision == first and pointer.pinned
    result = run_refresh(settings, RefreshRequest(revision=second, explicit=True))
    pointer = store.read_pointer()
    # second was stored already: the pointer moves to it, nothing is copied, and the outcome says so
    assert (result.outcome, result.bytes_moved, result.pin) == ("made_current", 0, "lifted")
    assert pointer is not None and pointer.revision == second and not pointer.pinned
    assert run_refresh(settings, RefreshRequest(revision="v1", explicit=True)).revision == first


def test_bytes_differing_from_the_advertised_sha256_abort(
    settings: Settings, store: ModelStore, hub: FakeHubServer, big_bert: Path
) -> None:
    hub.hub.publish(REPO, big_bert)
    commit = hub.hub.resolve(REPO, "main")
    assert commit is not None
    commit.files["model.safetensors"].advertised_sha256 = "0" * 64
    with pytest.raises(IntegrityError, match="model.safetensors"):
        run_refresh(settings, RefreshRequest())
    assert store.read_pointer() is None
    assert store.list_versions() == []  # the staged version was deleted
    assert store.read_last_refresh()["outcome"] == "failed"  # type: ignore[index]


def test_a_small_file_not_matching_its_git_blob_id_aborts(
    settings: Settings, store: ModelStore, hub: FakeHubServer, tiny_bert_dir: Path
) -> None:
    hub.hub.publish(REPO, tiny_bert_dir)
    commit = hub.hub.resolve(REPO, "main")
    assert commit is not None
    original = commit.files["config.json"]
    blob_id = original.git_blob_id

    class Tampered(type(original)):  # type: ignore[misc]
        @property
        def git_blob_id(self) -> str:
            return blob_id

    commit.files["config.json"] = Tampered(original.data + b" ", lfs=False)
    with pytest.raises(IntegrityError, match="config.json"):
        run_refresh(settings, RefreshRequest())
    assert store.read_pointer() is None


def test_pickle_only_repo_is_refused(settings: Settings, store: ModelStore, hub: FakeHubServer, tmp_path: Path) -> None:
    folder = tmp_path / "pickle"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "vocab.txt").write_text("[UNK]\n")
    # weights that are never converted (pytorch_model.bin is: test_pytorch_weights.py): refused before any download
    (folder / "tf_model.h5").write_bytes(b"\x89HDF not really")
    (folder / "flax_model.msgpack").write_bytes(b"\x80 not really")
    hub.hub.publish(REPO, folder)
    with pytest.raises(UnsafeModelError, match=r"no safetensors weights \(found flax_model\.msgpack, tf_model\.h5\)"):
        run_refresh(settings, RefreshRequest())
    assert store.read_pointer() is None and store.list_versions() == []
    assert not any("/resolve/" in p or "/cdn/" in p for p in hub.hub.requests)


def test_canary_failure_aborts_with_the_reason(env: dict[str, str], store: ModelStore, hub: FakeHubServer, tiny_bert_dir: Path) -> None:
    hub.hub.publish(REPO, tiny_bert_dir)
    strict = Settings.from_env({**env, "MODEL_CANARY": json.dumps({**CANARY, "answer": "the zebra of Kathmandu"})})
    with pytest.raises(ValidationFailedError, match="zebra"):
        run_refresh(strict, RefreshRequest())
    assert store.read_pointer() is None
    assert all(not v.complete for v in store.list_versions())
    last = store.read_last_refresh()
    assert last is not None and last["outcome"] == "failed" and "zebra" in last["error"]


def test_connection_dropped_mid_file_aborts_cleanly_then_resumes(
    settings: Settings, store: ModelStore, hub: FakeHubServer, big_bert: Path
) -> None:
    commit = hub.hub.publish(REPO, big_bert)
    size = (big_bert / "model.safetensors").stat().st_size
    assert size > 2 * settings.block_size
    hub.hub.drop_after["model.safetensors"] = size // 2
    with pytest.raises(SourceUnavailableError):
        run_refresh(settings, RefreshRequest())
    assert store.read_pointer() is None
    assert not store.file_blob(commit, "model.safetensors").exists()  # never committed half
    result = run_refresh(settings, RefreshRequest())
    assert result.outcome == "published" and result.files_reused >= 1  # small files were already there
    assert store.verify_version(commit) == []


def test_two_refreshes_at_once(settings: Settings, store: ModelStore, hub: FakeHubServer, big_bert: Path) -> None:
    hub.hub.publish(REPO, big_bert)
    with store.lock():
        with pytest.raises(RefreshAlreadyRunningError):
            run_refresh(settings, RefreshRequest())
        assert handle_message(settings, RefreshRequest().to_bytes()) is None  # completed, not retried
    assert store.read_last_refresh() is None  # "already running" records nothing

    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def refresh() -> None:
        barrier.wait()
        try:
            outcomes.append(run_refresh(settings, RefreshRequest()).outcome)
        except RefreshAlreadyRunningError:
            outcomes.append("already running")

    threads = [threading.Thread(target=refresh) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(outcomes) in (["already running", "published"], ["published", "up_to_date"])
    pointer = store.read_pointer()
    assert pointer is not None and store.verify_version(pointer.revision) == []


def test_queue_worker_retries_only_transient_failures(env: dict[str, str], store: ModelStore, hub: FakeHubServer, tmp_path: Path) -> None:
    down = Settings.from_env({**env, "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens on the discard port
    with pytest.raises(SourceUnavailableError):
        handle_message(down, RefreshRequest().to_bytes())
    folder = tmp_path / "pickle"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"x")
    hub.hub.publish(REPO, folder)
    assert handle_message(Settings.from_env(env), RefreshRequest().to_bytes()) is None  # permanent: completed
    assert store.read_last_refresh()["outcome"] == "failed"  # type: ignore[index]
    assert handle_message(Settings.from_env(env), b"not json") is None
    assert handle_message(Settings.from_env(env), json.dumps({"revision": "../x"}).encode()) is None


def test_hf_token_is_sent_but_never_logged(
    env: dict[str, str], store: ModelStore, hub: FakeHubServer, tiny_bert_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub.hub.publish(REPO, tiny_bert_dir)
    secret = "hf_" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    run_refresh(Settings.from_env({**env, "HF_TOKEN": secret}), RefreshRequest())
    assert f"Bearer {secret}" in hub.hub.authorizations  # the Hub got it
    assert secret not in caplog.text
    assert secret not in repr(Settings.from_env({**env, "HF_TOKEN": secret}))


# --- the functions, in-process ------------------------------------------------------------------


@pytest.fixture
def holder(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelHolder]:
    made = ModelHolder(lambda: Settings.from_env(env))
    monkeypatch.setattr(function_app, "holder", made)
    yield made
    made.close()


def http(name: str, body: bytes = b"") -> tuple[int, dict[str, Any], dict[str, str]]:
    return call(name, raw=body)


def test_bindings_of_the_refresh_functions() -> None:
    def binding(name: str) -> dict[str, Any]:
        return dict(json.loads(FUNCTIONS[name].get_raw_bindings()[0]))

    for name, route in (("model_refresh", "model/refresh"), ("model_rollback", "model/rollback")):
        trigger = binding(name)
        assert (trigger["methods"], trigger["route"], trigger["authLevel"]) == (["POST"], route, "FUNCTION")
    timer = binding("refresh_schedule")
    assert timer["type"] == "timerTrigger" and timer["schedule"] == "%MODEL_REFRESH_SCHEDULE%" and timer["runOnStartup"] is False
    worker = binding("refresh_worker")
    assert worker["type"] == "queueTrigger" and worker["queueName"] == "%MODEL_REFRESH_QUEUE%"
    assert worker["connection"] == "AzureWebJobsStorage"
    host = json.loads((Path(__file__).resolve().parents[2] / "host.json").read_text())
    assert host["extensions"]["queues"]["batchSize"] == 1


def test_http_and_timer_queue_base64_messages_the_worker_runs(
    holder: ModelHolder, store: ModelStore, queue: Any, hub: FakeHubServer, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    first = hub.hub.publish(REPO, tiny_bert_dir)
    FUNCTIONS["refresh_schedule"].get_user_function()(None)
    status, body, headers = http("model_refresh", json.dumps({"revision": first}).encode())
    assert status == 202 and body["status"] == "queued" and headers["Location"] == "/api/model"

    from azure.storage.queue import QueueClient

    raw = QueueClient.from_connection_string(holder.settings.queue_storage.connection_string, holder.settings.refresh_queue)  # type: ignore[union-attr]
    texts = [m.content for m in raw.receive_messages(max_messages=10)]
    assert len(texts) == 2
    decoded = [RefreshRequest.from_bytes(base64.b64decode(t)) for t in texts]  # base64, as the trigger expects
    assert sorted(r.reason for r in decoded) == ["http", "schedule"]
    assert next(r for r in decoded if r.reason == "http").revision == first

    for request in decoded:
        FUNCTIONS["refresh_worker"].get_user_function()(func.QueueMessage(body=request.to_bytes()))
    pointer = store.read_pointer()
    assert pointer is not None and pointer.revision == first

    last = call("model")[1]["last_refresh"]
    assert last["outcome"] == "up_to_date" and last["revision"] == first and "seconds" in last

    second = hub.hub.publish(REPO, build_bert(tmp_path / "v2", seed=8))
    FUNCTIONS["refresh_worker"].get_user_function()(func.QueueMessage(body=RefreshRequest().to_bytes()))
    status, body, _ = http("model_rollback")
    assert status == 200 and body["revision"] == first and body["pinned"] is True
    status, body, _ = http("model_rollback", json.dumps({"to": second}).encode())
    assert status == 200 and body["revision"] == second


@pytest.mark.parametrize(
    ("name", "body", "status"),
    [
        ("model_refresh", b"{", 400),
        ("model_refresh", b"[1]", 400),
        ("model_refresh", b"[" * 4000, 400),
        ("model_rollback", b'{"to":' + b"[" * 4000, 400),
        ("model_refresh", json.dumps({"revision": 3}).encode(), 400),
        ("model_refresh", json.dumps({"revision": "../../etc"}).encode(), 400),
        ("model_refresh", json.dumps({"unpin": "yes"}).encode(), 400),
        ("model_refresh", b"x" * 5000, 413),
        ("model_rollback", json.dumps({"to": 5}).encode(), 400),
        ("model_rollback", json.dumps({"to": "f" * 40}).encode(), 404),
        ("model_rollback", b"", 404),
    ],
)
def test_refresh_and_rollback_errors(holder: ModelHolder, store: ModelStore, name: str, body: bytes, status: int) -> None:
    got, payload, _ = http(name, body)
    assert got == status and "error" in payload


def test_rollback_during_a_refresh_is_409(holder: ModelHolder, store: ModelStore, hub: FakeHubServer, tiny_bert_dir: Path) -> None:
    hub.hub.publish(REPO, tiny_bert_dir)
    run_refresh(holder.settings, RefreshRequest())
    with store.lock():
        status, body, _ = http("model_rollback")
    assert status == 409 and body["error"]["code"] == "refresh_running"


def test_not_found_revision_is_permanent(settings: Settings, store: ModelStore, hub: FakeHubServer, tiny_bert_dir: Path) -> None:
    hub.hub.publish(REPO, tiny_bert_dir)
    with pytest.raises(NotFoundError):
        run_refresh(settings, RefreshRequest(revision="no-such-branch", explicit=True))
    assert handle_message(settings, RefreshRequest(revision="no-such-branch").to_bytes()) is None


def test_cli_isolates_from_the_hub(env: dict[str, str], store: ModelStore, hub: FakeHubServer, tiny_bert_dir: Path) -> None:
    import os
    import subprocess
    import sys

    commit = hub.hub.publish(REPO, tiny_bert_dir)
    root = Path(__file__).resolve().parents[2]
    run_env = {**os.environ, **env}
    proc = subprocess.run(
        [sys.executable, "-m", "shared", "isolate", "--json"], cwd=root, env=run_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "published" and result["revision"] == commit
    proc = subprocess.run(
        [sys.executable, "-m", "shared", "isolate", "--revision", "no-such-branch", "--json"],
        cwd=root,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and json.loads(proc.stdout.strip().splitlines()[-1])["error"]["code"] == "not_found"
