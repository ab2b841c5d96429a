"""The HTTP functions, called in-process as the worker would, against a model published to Azurite."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.engine.question_answering import QAItem
from shared.engine.torch_model import engine_from_dir
from shared.loading.versions import LoadedModel, load_version
from shared.refresh.isolation import LocalDirSource
from shared.serving.holder import ModelHolder
from shared.settings import Settings
from shared.store.model_store import ModelStore
from tests.conftest import ROOT, PrivateAzurite, registered_functions
from tests.fixtures.function_calls import call
from tests.fixtures.tiny_models import publish

pytestmark = pytest.mark.integration
CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."
FUNCTIONS = registered_functions()


def variant(base: Path, dest: Path, seed: int) -> Path:
    """The same model with other weights: answers differ, the revision differs."""
    from tests.fixtures.tiny_models import build_bert

    return build_bert(dest, seed=seed)


def corrupt(store: ModelStore, revision: str, name: str = "model.safetensors") -> None:
    blob = store.file_blob(revision, name)
    props = blob.get_blob_properties()
    data = bytearray(blob.download_blob().readall())
    data[len(data) - 10] ^= 0x01
    blob.upload_blob(bytes(data), overwrite=True, metadata=props.metadata)


def wait_for(condition: Callable[[], bool], *, what: str, tries: int = 900) -> None:
    """Poll until ``condition`` holds; the bound only stops a broken test from hanging CI."""
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def test_routes_methods_and_auth_levels() -> None:
    expected = {
        "ask": (["POST"], "ask", "FUNCTION"),
        "health": (["GET"], "health", "ANONYMOUS"),
        "model": (["GET"], "model", "FUNCTION"),
    }
    for name, (methods, route, auth) in expected.items():
        trigger = json.loads(FUNCTIONS[name].get_raw_bindings()[0])
        assert trigger["type"] == "httpTrigger"
        assert (trigger["methods"], trigger["route"], trigger["authLevel"]) == (methods, route, auth), name


def test_answers_come_from_the_published_model(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[..., ModelHolder], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shared")
    revision = publish(store, tiny_bert_dir)
    install(env)
    reference = engine_from_dir(tiny_bert_dir)
    status, body, _ = call("ask", body={"question": "Who won the game?", "context": CONTEXT})
    assert status == 200
    [want] = reference.answer([QAItem("Who won the game?", CONTEXT)])[0]
    assert (body["answer"], body["start"], body["end"]) == (want.answer, want.start, want.end)
    assert body["score"] == pytest.approx(want.score, abs=1e-5)
    assert (body["model_id"], body["revision"]) == ("tests/tiny-bert", revision)

    status, body, _ = call("ask", body={"question": "When?", "context": CONTEXT, "top_k": 3})
    assert status == 200 and len(body["answers"]) == 3
    assert all(CONTEXT[a["start"] : a["end"]] == a["answer"] for a in body["answers"])

    status, body, _ = call(
        "ask", body={"items": [{"question": "Who?", "context": CONTEXT}, {"question": "Where?", "context": CONTEXT, "top_k": 2}]}
    )
    assert status == 200 and len(body["results"]) == 2
    assert "answer" in body["results"][0] and len(body["results"][1]["answers"]) == 2
    assert body["revision"] == revision
    # one operator line per request, in key=value form for KQL's parse-kv (docs/operations.md)
    asks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=ask ")]
    assert len(asks) == 3
    fields = dict(pair.split("=", 1) for pair in asks[-1].split(" "))
    assert (fields["items"], fields["windows"], fields["status"], fields["revision"]) == ("2", "2", "200", revision)
    assert float(fields["seconds"]) >= 0

    status, body, _ = call("health")
    assert status == 200 and body["state"] == "ready" and body["revision"] == revision and body["load_seconds"] >= 0

    status, body, _ = call("model")
    assert status == 200
    assert body["pointer"]["revision"] == revision
    assert [v["revision"] for v in body["versions"]] == [revision]
    assert body["instance"]["loaded"]["revision"] == revision and body["instance"]["last_error"] is None
    assert body["last_refresh"]["outcome"] == "published"


@pytest.mark.parametrize(
    ("raw", "status", "field"),
    [
        (b"", 400, "body"),
        (b"{", 400, "body"),
        (b"\xff\xfe", 400, "body"),
        (b"[" * 4000, 400, "body"),  # json.loads raised RecursionError: a 500
        (b'{"items":' * 3000 + b"1" + b"}" * 3000, 400, "body"),
        (b"[]", 400, "body"),
        (b'"text"', 400, "body"),
        (b"{}", 400, "question"),
        (json.dumps({"question": 1, "context": CONTEXT}).encode(), 400, "question"),
        (json.dumps({"question": "q", "context": ""}).encode(), 400, "context"),
        (json.dumps({"question": "q", "context": CONTEXT, "top_k": 99}).encode(), 400, "top_k"),
        (json.dumps({"items": []}).encode(), 400, "items"),
        (json.dumps({"items": "x"}).encode(), 400, "items"),
        (json.dumps({"items": [{"question": "q", "context": CONTEXT}, {"question": "q"}]}).encode(), 400, "items[1].context"),
        (json.dumps({"items": [{"question": "q", "context": CONTEXT}] * 33}).encode(), 413, "items"),
        (json.dumps({"question": "q", "context": "x" * 25_001}).encode(), 413, "context"),
        (json.dumps({"question": "q" * 1001, "context": CONTEXT}).encode(), 413, "question"),
        (b"{" + b" " * 7_000_000 + b"}", 413, "body"),
    ],
)
def test_bad_input_is_a_json_error_naming_the_field(
    env: dict[str, str], install: Callable[..., ModelHolder], raw: bytes, status: int, field: str
) -> None:
    holder = install(env)
    got, body, _ = call("ask", raw=raw)
    assert got == status
    assert field in body["error"]["message"]
    assert holder.loads == 0  # validated before any model work


def test_token_budgets_after_load_are_413(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[..., ModelHolder]
) -> None:
    publish(store, tiny_bert_dir)
    install({**env, "QA_MAX_WINDOWS": "2"})
    status, body, _ = call("ask", body={"question": "q", "context": "x " * 2000})
    assert status == 413 and "windows" in body["error"]["message"]
    status, body, _ = call("ask", body={"question": " ".join(["a"] * 70), "context": CONTEXT})
    assert status == 413 and "tokens" in body["error"]["message"]


def test_no_model_yet_is_503_saying_to_refresh(env: dict[str, str], store: ModelStore, install: Callable[..., ModelHolder]) -> None:
    install(env)
    status, body, headers = call("ask", body={"question": "q", "context": CONTEXT})
    assert status == 503 and "refresh" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    status, body, _ = call("health")
    assert status == 503 and body == {"state": "empty", "degraded": False}


def test_health_never_loads_unless_warm(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[..., ModelHolder]
) -> None:
    revision = publish(store, tiny_bert_dir)
    holder = install(env)
    status, body, _ = call("health")
    assert (status, body) == (503, {"state": "empty", "degraded": False})
    assert holder.loads == 0
    status, _, _ = call("health", params={"warm": "1"})
    assert holder.loads == 1
    wait_for(lambda: holder.state == "ready", what="the warm load")
    status, body, _ = call("health")
    assert status == 200 and body["revision"] == revision


def test_sixteen_threads_on_a_cold_instance_cause_one_load(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[..., ModelHolder]
) -> None:
    publish(store, tiny_bert_dir)
    loads: list[str] = []

    def counting_loader(s: ModelStore, revision: str, settings: Settings) -> LoadedModel:
        loads.append(revision)
        time.sleep(0.5)  # let every thread arrive while the load runs
        return load_version(s, revision, settings)

    holder = install({**env, "QA_MAX_CONCURRENT": "16"}, loader=counting_loader)
    barrier = threading.Barrier(16)
    statuses: list[int] = []

    def hit() -> None:
        barrier.wait()
        statuses.append(call("ask", body={"question": "Who won?", "context": CONTEXT})[0])

    threads = [threading.Thread(target=hit) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert statuses == [200] * 16
    assert len(loads) == 1 and holder.loads == 1


def test_busy_instance_answers_503_with_retry_after(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[..., ModelHolder]
) -> None:
    publish(store, tiny_bert_dir)
    holder = install({**env, "QA_MAX_CONCURRENT": "1", "QA_DEADLINE_SECONDS": "1"})
    assert call("ask", body={"question": "Who?", "context": CONTEXT})[0] == 200
    with holder.inference_slot(time.monotonic() + 10):  # another request holds the only slot
        status, body, headers = call("ask", body={"question": "Who?", "context": CONTEXT})
    assert status == 503 and body["error"]["code"] == "busy" and int(headers["Retry-After"]) >= 1
    assert call("ask", body={"question": "Who?", "context": CONTEXT})[0] == 200


@pytest.mark.parametrize("reload", ["overlap", "replace"])
def test_new_version_is_picked_up_while_requests_succeed(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, tmp_path: Path, install: Callable[..., ModelHolder], reload: str
) -> None:
    first = publish(store, tiny_bert_dir)
    install({**env, "MODEL_RELOAD": reload})
    assert call("ask", body={"question": "Who?", "context": CONTEXT})[1]["revision"] == first
    stop = threading.Event()
    seen: list[tuple[int, str | None]] = []

    def keep_asking() -> None:
        while not stop.is_set():
            status, body, _ = call("ask", body={"question": "Who won?", "context": CONTEXT})
            seen.append((status, body.get("revision")))

    worker = threading.Thread(target=keep_asking)
    worker.start()
    try:
        second = publish(store, variant(tiny_bert_dir, tmp_path / "v2", seed=11))
        wait_for(lambda: bool(seen) and seen[-1][1] == second, what="the new revision to be served")
    finally:
        stop.set()
        worker.join(60)
    assert {status for status, _ in seen} == {200}
    assert {revision for _, revision in seen} <= {first, second}


def test_corrupted_blob_cold_instance_answers_503(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[..., ModelHolder]
) -> None:
    revision = publish(store, tiny_bert_dir)
    corrupt(store, revision)
    install(env)
    status, body, headers = call("ask", body={"question": "Who?", "context": CONTEXT})
    assert status == 503 and "Retry-After" in headers
    assert "safetensors" not in body["error"]["message"]  # details stay in logs and /api/model
    status, body, _ = call("health")
    assert (status, body) == (503, {"state": "error", "degraded": False})
    _, body, _ = call("model")
    assert body["instance"]["last_error"]["code"] == "integrity_error"
    assert "model.safetensors" in body["instance"]["last_error"]["message"]


def test_corrupted_new_version_keeps_a_warm_overlap_instance_on_the_old_one(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, tmp_path: Path, install: Callable[..., ModelHolder]
) -> None:
    first = publish(store, tiny_bert_dir)
    holder = install({**env, "MODEL_RELOAD": "overlap"})
    assert call("ask", body={"question": "Who?", "context": CONTEXT})[1]["revision"] == first
    folder = variant(tiny_bert_dir, tmp_path / "v2", seed=12)
    source = LocalDirSource(folder, block_size=store.block_size)
    # stage and publish by hand so the corruption lands before the pointer moves
    snapshot = source.snapshot()
    for entry in snapshot.files:
        store.upload_file(snapshot.revision, entry, source.open(entry))
    corrupt(store, snapshot.revision)
    from shared.store.model_files import Manifest

    with store.lock():
        store.publish(Manifest(model_id=store.model_id, revision=snapshot.revision, source="local", files=snapshot.files), pinned=False)
    wait_for(lambda: holder.describe()["damaged"] is not None, what="the failed reload")
    status, body, _ = call("ask", body={"question": "Who?", "context": CONTEXT})
    assert status == 200 and body["revision"] == first
    assert call("health")[1]["revision"] == first
    assert call("model")[1]["instance"]["damaged"]["code"] == "integrity_error"


def test_storage_down_gives_503_and_recovers(
    private_azurite: PrivateAzurite, tiny_bert_dir: Path, install: Callable[..., ModelHolder]
) -> None:
    env = {
        "MODEL_STORAGE": private_azurite.connection_string,
        "MODEL_ID": "tests/tiny-bert",
        "MODEL_POLL_SECONDS": "0.2",
        "QA_DEADLINE_SECONDS": "5",
    }
    store = ModelStore.from_settings(Settings.from_env(env))
    store.ensure_container()
    revision = publish(store, tiny_bert_dir)

    warm = install(env)
    assert call("ask", body={"question": "Who?", "context": CONTEXT})[0] == 200
    cold_env = dict(env)
    private_azurite.stop()
    try:
        # a warm instance keeps answering from memory; its poller only logs
        assert call("ask", body={"question": "Who?", "context": CONTEXT})[0] == 200
        install(cold_env)
        result: list[tuple[int, dict[str, Any], dict[str, str]]] = []
        caller = threading.Thread(target=lambda: result.append(call("ask", body={"question": "Who?", "context": CONTEXT})))
        caller.start()
        caller.join(120)  # a safety net against a hang, not a performance bound
        assert result, "the request hung on dead storage"
        status, body, headers = result[0]
        assert status == 503 and "Retry-After" in headers and body["error"]["code"] == "model_not_ready"
    finally:
        private_azurite.start()
    del warm

    def answers() -> bool:
        status, body, _ = call("ask", body={"question": "Who?", "context": CONTEXT})
        return status == 200 and body["revision"] == revision

    wait_for(answers, what="recovery after storage came back")


def test_disk_mode_caches_verifies_and_reuses(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, tmp_path: Path, install: Callable[..., ModelHolder]
) -> None:
    revision = publish(store, tiny_bert_dir)
    cache = tmp_path / "cache"
    disk_env = {**env, "MODEL_LOAD_MODE": "disk", "MODEL_CACHE_DIR": str(cache)}
    install(disk_env)
    assert call("ask", body={"question": "Who?", "context": CONTEXT})[0] == 200
    cached = cache / revision
    assert sorted(p.name for p in cached.iterdir() if not p.name.startswith(".")) == sorted(p.name for p in tiny_bert_dir.iterdir())
    assert not [p for p in cache.iterdir() if p.name.endswith(".partial")]

    # the next process reuses the cache without downloading: the weights blob can even be gone
    weights = store.file_blob(revision, "model.safetensors")
    saved = weights.download_blob().readall()
    metadata = weights.get_blob_properties().metadata
    weights.delete_blob()
    install(disk_env)
    status, body, _ = call("ask", body={"question": "Who?", "context": CONTEXT})
    assert status == 200 and body["revision"] == revision

    # a damaged cached file is noticed and downloaded again
    weights.upload_blob(saved, metadata=metadata)
    damaged = cached / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    install(disk_env)
    assert call("ask", body={"question": "Who?", "context": CONTEXT})[0] == 200
    assert damaged.read_bytes() == (tiny_bert_dir / "model.safetensors").read_bytes()


def test_memory_mode_writes_nothing_to_disk(env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    revision = publish(store, tiny_bert_dir)
    settings = Settings.from_env(env)
    io_before = _write_bytes()
    loaded = load_version(ModelStore.from_settings(settings, serving=True), revision, settings)
    assert _write_bytes() - io_before == 0
    assert loaded.mode == "memory"
    disk = Settings.from_env({**env, "MODEL_LOAD_MODE": "disk", "MODEL_CACHE_DIR": str(tmp_path / "cache")})
    override = load_version(ModelStore.from_settings(disk, serving=True), revision, disk, mode="memory")  # as the canary loads
    assert override.mode == "memory" and not (tmp_path / "cache").exists()
    answer = loaded.engine.answer([QAItem("Who?", CONTEXT)])[0][0]
    assert CONTEXT[answer.start : answer.end] == answer.answer


def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


def test_importing_function_app_touches_no_network() -> None:
    code = (
        "import sys\n"
        "def hook(event, args):\n"
        "    if event in ('socket.connect', 'socket.getaddrinfo'):\n"
        "        raise RuntimeError('network touched at import: ' + event)\n"
        "sys.addaudithook(hook)\n"
        "import function_app\n"
        "assert 'torch' not in sys.modules, 'torch imported at import time'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "MODEL_STORAGE": "UseDevelopmentStorage=true"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_cli_ask_answers_through_the_holder(env: dict[str, str], store: ModelStore, tiny_bert_dir: Path) -> None:
    revision = publish(store, tiny_bert_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "shared", "ask", "--question", "Who won?", "--context", CONTEXT, "--json"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout.strip().splitlines()[-1])
    assert body["revision"] == revision and CONTEXT[body["start"] : body["end"]] == body["answer"]
