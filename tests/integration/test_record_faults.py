"""A fault matrix over the store's own records: every record x every damage x every reader.

The store (built once): two versions of a tiny BERT, the earlier one isolated from a local folder,
the current one from a (fake) Hub, each with its fp32 ONNX artifact, a pointer with its history, a
last-refresh.json and the writers' lock. For each (record, damage) pair, fresh copies of that store
are damaged, then every reader runs on one: serving (``/api/ask``, ``/api/health``, ``/api/model``
through the registered functions), and the command line in this process (``status``, ``verify``,
``rollback --to`` the earlier version, ``isolate`` of the current Hub revision, ``refresh --enqueue``
then the queue worker on that message, ``build-artifacts``). Each cell checks: no traceback (stderr,
logs, threads), no 500, answers while an intact version exists, a message naming the record and its
repair; then the named repair commands bring the store back to ``verify`` exit 0 with nothing damaged.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobLeaseClient, BlobServiceClient, ContainerClient

from shared.refresh.hub import HubSource
from shared.refresh.isolation import LocalDirSource, isolate
from shared.refresh.worker import artifact_builder, canary_validator, handle_message
from shared.settings import Settings
from shared.store.model_files import Pointer
from shared.store.model_store import ModelStore
from tests.fixtures.cli_runs import Tracebacks, run_cli_here
from tests.fixtures.fake_hub import FakeHubServer
from tests.fixtures.function_calls import call
from tests.fixtures.tiny_models import build_bert

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL_ID = "tests/tiny-bert"
REPO = "tests/tiny-bert"
CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."
QUESTION = {"question": "Who won the game?", "context": CONTEXT}
CANARY = json.dumps(QUESTION)
MISSING = "d" * 40


@dataclass(frozen=True)
class Golden:
    """The intact store, as blobs in memory, and what it holds."""

    blobs: dict[str, tuple[bytes, dict[str, str]]]
    earlier: str  # local- revision, from a folder
    current: str  # a Hub commit
    earlier_dir: Path
    hub: str  # the fake Hub's endpoint


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHubServer]:
    with FakeHubServer() as server:
        yield server


def settings_for(azurite: str, container: str, hub: str, **more: str) -> dict[str, str]:
    return {
        "MODEL_STORAGE": azurite,
        "AzureWebJobsStorage": azurite,
        "MODEL_CONTAINER": container,
        "MODEL_ID": MODEL_ID,
        "MODEL_ARTIFACTS": "fp32",
        "MODEL_CANARY": CANARY,
        "HF_ENDPOINT": hub,
        "MODEL_POLL_SECONDS": "0",
        "QA_DEADLINE_SECONDS": "30",
        **more,
    }


@pytest.fixture(scope="module")
def golden(azurite: str, hub: FakeHubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Golden]:
    earlier_dir = build_bert(tmp_path_factory.mktemp("earlier"), seed=3)
    current_dir = build_bert(tmp_path_factory.mktemp("current"), seed=4)
    commit = hub.hub.publish(REPO, current_dir)
    container = f"golden{uuid.uuid4().hex[:12]}"
    settings = Settings.from_env(settings_for(azurite, container, hub.endpoint))
    store = ModelStore.from_settings(settings)
    build, validate = artifact_builder(settings), canary_validator(settings)
    store.ensure_container()
    first = isolate(store, LocalDirSource(earlier_dir), explicit=True, keep_versions=3, build=build, validate=validate)
    second = isolate(store, HubSource.from_settings(settings), explicit=True, keep_versions=3, build=build, validate=validate)
    assert (first.artifacts, second.artifacts, second.revision) == ({"fp32": "built"}, {"fp32": "built"}, commit)
    with store.lock():
        pass  # refresh.lock exists, not leased
    blobs = {}
    for item in store.container.list_blobs(include=["metadata"]):
        blobs[item.name] = (store.container.download_blob(item.name).readall(), dict(item.metadata or {}))
    store.container.delete_container()
    assert first.revision is not None
    yield Golden(blobs=blobs, earlier=first.revision, current=commit, earlier_dir=earlier_dir, hub=hub.endpoint)


def clone(golden: Golden, azurite: str) -> ContainerClient:
    """A fresh container holding the golden store's blobs (with their metadata)."""
    client = BlobServiceClient.from_connection_string(azurite).get_container_client(f"f{uuid.uuid4().hex[:20]}")
    client.create_container()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: client.upload_blob(item[0], item[1][0], metadata=item[1][1]), golden.blobs.items()))
    return client


# --- the records and their damages ---------------------------------------------------------------


def blob_of(record: str, golden: Golden) -> str:
    return {
        "current.json": f"{MODEL_ID}/current.json",
        "manifest (current)": f"{MODEL_ID}/versions/{golden.current}/manifest.json",
        "manifest (earlier)": f"{MODEL_ID}/versions/{golden.earlier}/manifest.json",
        "artifact record": f"{MODEL_ID}/versions/{golden.current}/onnx/fp32/artifact.json",
        "last-refresh.json": f"{MODEL_ID}/last-refresh.json",
        "refresh.lock": f"{MODEL_ID}/refresh.lock",
    }[record]


def damage(client: ContainerClient, golden: Golden, record: str, kind: str) -> None:
    """Damage one record in place, keeping its blob metadata (as a flipped byte on disk would)."""
    name = blob_of(record, golden)
    blob = client.get_blob_client(name)
    if kind == "deleted":
        blob.delete_blob()
        return
    if kind == "held":  # a lease nobody will release
        BlobLeaseClient(blob).acquire(lease_duration=-1)
        return
    raw, metadata = golden.blobs[name]
    if kind == "points at a missing version":
        raw = Pointer(model_id=MODEL_ID, revision=MISSING, previous=(golden.current, golden.earlier)).to_json()
    elif kind == "points at a damaged version":
        raw = Pointer(model_id=MODEL_ID, revision=golden.earlier, previous=(golden.current,)).to_json()
        damage(client, golden, "manifest (earlier)", "one byte flipped")
    else:
        raw = {
            "one byte flipped": lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0x01]) + b[len(b) // 2 + 1 :],
            "truncated": lambda b: b[: len(b) // 2],
            "emptied": lambda b: b"",
            "valid JSON of the wrong shape": lambda b: b'{"hello": "world", "revision": 7}',
            "garbage": lambda b: b"\x00\xff garbage \x01",
        }[kind](raw)
    blob.upload_blob(raw, overwrite=True, metadata=metadata)


COMMON = ("one byte flipped", "truncated", "emptied", "deleted", "valid JSON of the wrong shape")
PAIRS = [
    *[("current.json", kind) for kind in (*COMMON, "points at a missing version", "points at a damaged version")],
    *[(record, kind) for record in ("manifest (current)", "manifest (earlier)", "artifact record", "last-refresh.json") for kind in COMMON],
    *[("refresh.lock", kind) for kind in ("garbage", "emptied", "deleted", "valid JSON of the wrong shape", "held")],
]


def reported(record: str, kind: str) -> bool:
    """Whether the damage is something to report (the lease's content is never read; a deleted
    last-refresh.json is no refresh yet; an earlier version without a manifest is incomplete, staged)."""
    return not (record == "refresh.lock" and kind != "held") and not (
        kind == "deleted" and record in ("last-refresh.json", "manifest (earlier)")
    )


def repairs(record: str, kind: str, golden: Golden) -> list[list[str]]:
    """The commands the damage's message names, in order."""
    if record == "current.json":
        earlier_repair = (
            [["isolate", "--repair", "--from-dir", str(golden.earlier_dir), "--model-id", MODEL_ID]] if "damaged version" in kind else []
        )
        return [["repair"], *earlier_repair]
    if record == "manifest (current)":
        return [["isolate", "--revision", golden.current]] if kind == "deleted" else [["isolate", "--repair", "--revision", golden.current]]
    if record == "manifest (earlier)":
        return [] if kind == "deleted" else [["isolate", "--repair", "--from-dir", str(golden.earlier_dir), "--model-id", MODEL_ID]]
    if record == "artifact record":
        return [["build-artifacts"]] if kind == "deleted" else [["build-artifacts", "--rebuild"]]
    if record == "last-refresh.json":
        return [] if kind == "deleted" else [["repair"]]
    return [["repair", "--break-lock"]] if kind == "held" else []


def refused(record: str, kind: str, reader: str) -> bool:
    """The cells where a reader rightly refuses (exit 1), naming why and what to do."""
    if kind == "held":
        return reader in ("rollback", "isolate", "build-artifacts", "verify")
    if reader == "rollback":
        return record == "manifest (earlier)" or kind == "points at a damaged version"
    if reader == "build-artifacts":  # the current version's artifacts: refused while that version cannot be read
        return (record == "artifact record" and kind != "deleted") or record == "manifest (current)" or "version" in kind
    return reader == "verify" and reported(record, kind)


def named(record: str, kind: str, golden: Golden) -> str:
    """What the reports must name: the damaged blob, or what its absence means."""
    if record == "artifact record" and kind == "deleted":
        return "MODEL_ARTIFACTS expects it"
    if record == "manifest (current)" and kind == "deleted":
        return "current.json"  # a pointer at a version that is no longer complete
    return blob_of(record, golden).rsplit("/", 1)[-1]


# --- the matrix ----------------------------------------------------------------------------------


class Cells:
    count = 0


def check_cell(label: str, code: int, out: dict[str, Any], err: str, tracebacks: list[str], *, exit_code: int) -> None:
    Cells.count += 1
    assert not tracebacks, f"{label}: tracebacks {tracebacks}"
    assert code == exit_code, f"{label}: exit {code}, expected {exit_code}: {err[-600:]}"
    if code:
        message = json.dumps(out) + err
        assert "python -m shared" in message or "refresh.lock" in message, f"{label}: no next step named: {message[-600:]}"


@pytest.mark.parametrize(("record", "kind"), PAIRS, ids=[f"{r}: {k}" for r, k in PAIRS])
def test_a_damaged_record_takes_nothing_down_and_its_repair_brings_the_store_back(
    record: str, kind: str, golden: Golden, azurite: str, install: Callable[..., Any]
) -> None:
    blob = named(record, kind, golden)
    containers: list[ContainerClient] = []

    def damaged_copy() -> dict[str, str]:
        client = clone(golden, azurite)
        containers.append(client)
        damage(client, golden, record, kind)
        return settings_for(azurite, client.container_name, golden.hub, MODEL_REFRESH_QUEUE=f"q{uuid.uuid4().hex[:12]}")

    try:
        # serving, and the readers that change nothing, on one damaged copy
        env = damaged_copy()
        install(env)
        with Tracebacks() as tracebacks:
            ask, answer, _ = call("ask", body=QUESTION)
            health_status, health, _ = call("health")
            model_status, model, _ = call("model")
        Cells.count += 3
        assert not tracebacks.found, f"serving: tracebacks {tracebacks.found}"
        assert (ask, health_status, model_status) == (200, 200, 200), (ask, answer, health, str(model)[:500])
        assert answer["revision"] in (golden.current, golden.earlier) and health["state"] == "ready"
        if reported(record, kind):
            text = json.dumps(model)
            assert blob in text and "python -m shared" in text, f"/api/model names neither {blob} nor a repair: {text[:800]}"
        for reader, args in (("status", ["status"]), ("verify", ["verify"])):
            code, out, err, found = run_cli_here(env, *args)
            check_cell(f"{reader}", code, out, err, found, exit_code=1 if refused(record, kind, reader) else 0)
            if reported(record, kind) and reader == "status":
                assert blob in err + json.dumps(out) and "repair" in err + json.dumps(out), f"status: {err[-800:]}"

        # the readers that change the store, each on its own damaged copy
        writers = {
            "rollback": ["rollback", "--to", golden.earlier],
            "isolate": ["isolate", "--revision", golden.current],
            "build-artifacts": ["build-artifacts"],
        }
        for reader, args in writers.items():
            code, out, err, found = run_cli_here(damaged_copy(), *args)
            check_cell(reader, code, out, err, found, exit_code=1 if refused(record, kind, reader) else 0)

        env = damaged_copy()  # refresh: queued from the command line, run by the queue worker
        code, out, err, found = run_cli_here(env, "refresh", "--enqueue")
        check_cell("refresh --enqueue", code, out, err, found, exit_code=0)
        with Tracebacks() as tracebacks:
            message = _receive(env)
            result = handle_message(Settings.from_env(env), message)
        Cells.count += 1
        assert not tracebacks.found, f"refresh worker: tracebacks {tracebacks.found}"
        if kind == "held":
            assert result is None  # "already running": completed without a run
        else:
            assert result is not None and result.outcome in ("published", "made_current", "up_to_date", "repaired"), result

        # the repair the messages name brings the store back: verify exit 0, nothing damaged
        env = damaged_copy()
        commands = repairs(record, kind, golden)
        for index, command in enumerate(commands):
            code, out, err, found = run_cli_here(env, *command)
            last = index == len(commands) - 1  # an earlier step may exit 1 while it names what remains
            check_cell(f"repair {' '.join(command)}", code, out, err, found, exit_code=0 if last or code == 0 else 1)
        code, out, err, found = run_cli_here(env, "verify")
        check_cell("verify after the repair", code, out, err, found, exit_code=0)
        assert out["damage"] == [], out
        code, out, err, found = run_cli_here(env, "isolate", "--revision", golden.current)
        check_cell("isolate after the repair", code, out, err, found, exit_code=0)
    finally:
        for client in containers:
            client.delete_container()


def _receive(env: dict[str, str]) -> bytes:
    from azure.storage.queue import BinaryBase64DecodePolicy, QueueClient

    queue = QueueClient.from_connection_string(
        env["AzureWebJobsStorage"], env["MODEL_REFRESH_QUEUE"], message_decode_policy=BinaryBase64DecodePolicy()
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for message in queue.receive_messages(max_messages=1):
            queue.delete_message(message)
            return bytes(message.content)
        time.sleep(0.1)
    raise AssertionError("no refresh message arrived")


def test_the_matrix_size(request: pytest.FixtureRequest) -> None:
    """Printed for the record: cells checked so far in this session (run after the matrix)."""
    print(f"\nrecord faults: {len(PAIRS)} (record, damage) pairs x 10 readers; {Cells.count} cells checked")
