"""A fault at every step of a refresh, two ways: the writer process killed with SIGKILL at that
step, or storage stopped there (a proxy in front of Azurite closed under the refresh). Each on a
first refresh (empty store) and on an update (two versions stored; retention deletes the oldest).

After each fault: serving (a fresh holder behind the real ``/api/ask``, ``/api/health`` and
``/api/model``) answers from a complete version that verifies, the one the pointer names, or
reports nothing isolated; no version that looks complete is partial; the dead writer's lease keeps
the next refresh out. Once the lease lapses (shortened to 15 s, Blob Storage's minimum), the next
refresh completes, resuming the files already committed, and serving answers from the new version.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shared.engine.question_answering import QAItem
from shared.engine.torch_model import engine_from_dir
from shared.errors import RefreshAlreadyRunningError, StorageUnavailableError
from shared.refresh.isolation import IsolationResult, LocalDirSource
from shared.store.model_store import ModelStore
from tests.conftest import ROOT
from tests.fixtures.function_calls import call
from tests.fixtures.refresh_faults import WEIGHTS, Step, arm, refresh, steps, writer_store
from tests.fixtures.storage_proxy import StorageProxy
from tests.fixtures.tiny_models import build_bert

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEASE_SECONDS = 15  # the shortest lease Blob Storage (and Azurite) grants
MODEL_ID = "tests/tiny-bert"
QUESTION = "Who won the game?"
CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."
HANG_GUARD = 120  # seconds; only stops a broken run from hanging CI
LEASE_PROBE = "manifest written, before the pointer"  # the step whose cases time the dead writer's lease


@dataclass(frozen=True)
class Model:
    folder: Path
    revision: str
    golden: tuple[str, int, int]  # answer, start, end of QUESTION over CONTEXT


@dataclass
class Case:
    """One fault: a step, how it hits, and what the store held before."""

    step: Step
    kind: str  # "killed" | "storage stopped"
    update: bool
    container: str
    old: str | None  # current before the refresh
    new: str  # the revision the refresh brings
    fault_at: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"[{'update' if self.update else 'first'} / {self.kind} / {self.step.name}]"


class Checks:
    """Counts every check so that the closing note can quote the number."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, condition: bool, what: str) -> None:
        with self._lock:
            self.count += 1
        assert condition, what


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Model]:
    """Three versions of a tiny model (other weights, other revisions), with their golden answers."""
    found = []
    for seed in (41, 42, 43):
        folder = build_bert(tmp_path_factory.mktemp(f"faults-v{seed}"), seed=seed)
        [best] = engine_from_dir(folder).answer([QAItem(QUESTION, CONTEXT)])[0]
        found.append(Model(folder, LocalDirSource(folder).revision(), (best.answer, best.start, best.end)))
    return found


@pytest.fixture
def containers(azurite: str) -> Iterator[list[str]]:
    """Names of the containers a test creates; all deleted afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        writer_store(azurite, name, model_id=MODEL_ID, lease_seconds=LEASE_SECONDS).container.delete_container()


def test_a_fault_at_every_step_leaves_no_half_version_and_the_next_refresh_completes(
    azurite: str, models: list[Model], containers: list[str], install: Callable[..., Any]
) -> None:
    check = Checks()
    began = time.monotonic()
    v1, v2, v3 = models
    sources = {m.revision: LocalDirSource(m.folder, block_size=64 * 1024) for m in models}
    golden = {m.revision: m.golden for m in models}
    folders = {m.revision: m.folder for m in models}
    files = [entry.name for entry in sources[v1.revision].snapshot().files]
    weights_blocks = -(-(v1.folder / WEIGHTS).stat().st_size // (64 * 1024))

    def store_of(case: Case) -> ModelStore:
        return writer_store(azurite, case.container, model_id=MODEL_ID, lease_seconds=LEASE_SECONDS)

    # the cases, each in a container of its own: a first refresh (v1), or an update (v1, v2 -> v3)
    cases = []
    for update in (False, True):
        for step in steps(files, weights_blocks=weights_blocks, update=update):
            for kind in ("killed", "storage stopped"):
                container = f"faults{uuid.uuid4().hex[:16]}"
                containers.append(container)
                cases.append(Case(step, kind, update, container, old=v2.revision if update else None, new=(v3 if update else v1).revision))
    for case in cases:
        store = store_of(case)
        store.ensure_container()
        if case.update:
            for model in (v1, v2):
                refresh(store, sources[model.revision])

    # 1. the faults, six at a time (each case has its own container and lock)
    def kill_at_step(case: Case) -> None:
        command = [sys.executable, "-m", "tests.fixtures.refresh_faults", "--step", case.step.name, "--folder", str(folders[case.new])]
        command += ["--connection-string", azurite, "--container", case.container, "--model-id", MODEL_ID]
        command += ["--lease-seconds", str(LEASE_SECONDS), *(["--update"] if case.update else [])]
        with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as writer:
            timer = threading.Timer(HANG_GUARD, writer.kill)
            timer.start()
            try:
                line = writer.stdout.readline().strip() if writer.stdout else ""
                writer.send_signal(signal.SIGKILL)
                case.fault_at = time.monotonic()
                _, errors = writer.communicate()
            finally:
                timer.cancel()
        check(line == f"reached {case.step.name}", f"{case.label} the writer did not reach the step: {line!r} {errors[-2000:]}")
        check(writer.returncode == -signal.SIGKILL, f"{case.label} the writer was not killed: exit {writer.returncode}")

    def stop_storage_at_step(case: Case) -> None:
        proxy = StorageProxy.for_blob_endpoint(azurite)
        with proxy:
            through = proxy.connection_string(azurite)  # fail fast: no minutes of retries against a stopped storage
            store = writer_store(through, case.container, model_id=MODEL_ID, lease_seconds=LEASE_SECONDS, serving=True)

            def stop() -> None:
                proxy.stop()
                case.fault_at = time.monotonic()

            arm(store, case.step, stop)
            try:
                result: IsolationResult | None = refresh(store, sources[case.new])
            except StorageUnavailableError:
                result = None
        check(case.fault_at > 0, f"{case.label} the refresh never reached the step")
        if case.step.operation == "write_last_refresh":  # only the record is lost: logged, not raised
            check(result is not None and result.outcome == "published", f"{case.label} {result}")
        else:
            check(result is None, f"{case.label} the refresh went on without storage: {result}")

    def fault(case: Case) -> None:
        (kill_at_step if case.kind == "killed" else stop_storage_at_step)(case)
        # the dead writer's lease is still held: the next refresh is turned away, nothing changes
        try:
            refresh(store_of(case), sources[case.new])
            refused = False
        except RefreshAlreadyRunningError:
            refused = True
        check(refused, f"{case.label} a refresh ran while the dead writer's lease was held")
        if timed(case):  # how long a dead writer keeps the lock: the lease, less a renewal at most
            store = store_of(case)
            while True:
                try:
                    with store.lock():
                        lapsed.append(time.monotonic() - case.fault_at)
                        break
                except RefreshAlreadyRunningError:
                    assert time.monotonic() < case.fault_at + HANG_GUARD, f"{case.label} the lease never lapsed"
                    time.sleep(0.25)
            check(lapsed[-1] >= LEASE_SECONDS * 3 / 4 - 0.5, f"{case.label} the lock was free {lapsed[-1]:.1f} s after the fault")

    lapsed: list[float] = []

    def timed(case: Case) -> bool:
        return case.update and case.step.name == LEASE_PROBE

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(fault, sorted(cases, key=lambda c: not timed(c))))  # the 15 s waits first, beside the other faults

    # 2. what serving sees right after the fault
    for case in cases:
        current = case.new if case.step.pointer_moved else case.old
        expect_serving(case, azurite, current, golden, check, install)

    # 3. once the lease lapses, the next refresh completes, resuming what was committed
    for case in cases:
        store = store_of(case)
        while True:
            try:
                result = refresh(store, sources[case.new])
                break
            except RefreshAlreadyRunningError:
                assert time.monotonic() < case.fault_at + HANG_GUARD, f"{case.label} the lease never lapsed"
                time.sleep(0.5)
        if case.step.pointer_moved:
            check(result.outcome == "up_to_date", f"{case.label} next refresh: {result.outcome}")
        else:
            # complete already (manifest written): only the pointer moves, and the outcome says so
            expected = "made_current" if case.step.manifest_written else "published"
            check(result.outcome == expected, f"{case.label} next refresh: {result.outcome} (expected {expected}) {result.error}")
            if case.step.manifest_written:
                check(result.bytes_moved == 0, f"{case.label} copied {result.bytes_moved} bytes of a complete version again")
            else:
                committed = case.step.files_committed
                check(result.files_reused == committed, f"{case.label} reused {result.files_reused} files, {committed} were committed")
        last = store.read_last_refresh()
        check(last is not None and last["outcome"] == result.outcome and last["revision"] == case.new, f"{case.label} last-refresh: {last}")
        expect_serving(case, azurite, case.new, golden, check, install)

    kinds = {kind: sum(c.kind == kind for c in cases) for kind in ("killed", "storage stopped")}
    print(
        f"\nrefresh faults: {len(cases)} injected ({kinds['killed']} killed, {kinds['storage stopped']} storage stopped) "
        f"at {len({(c.update, c.step.name) for c in cases})} steps of a first refresh and an update; {check.count} checks passed, "
        f"0 half versions seen; every next refresh turned away right after its fault and completed later; the dead writer's "
        f"{LEASE_SECONDS} s lease lapsed {min(lapsed):.1f}-{max(lapsed):.1f} s after the fault ({len(lapsed)} cases timed); "
        f"{time.monotonic() - began:.0f} s"
    )


def expect_serving(
    case: Case,
    azurite: str,
    current: str | None,
    golden: dict[str, tuple[str, int, int]],
    check: Checks,
    install: Callable[..., Any],
) -> None:
    """Serving and the store show ``current`` (``None``: nothing isolated) and no half version."""
    store = writer_store(azurite, case.container, model_id=MODEL_ID, lease_seconds=LEASE_SECONDS)
    pointer = store.read_pointer()
    check((pointer.revision if pointer else None) == current, f"{case.label} pointer at {pointer}, expected {current}")
    for version in store.list_versions():
        if version.complete:  # a manifest: every file must be there and verify
            manifest = store.require_manifest(version.revision)
            check(version.files == len(manifest.files), f"{case.label} {version.revision}: {version.files} of {len(manifest.files)} files")
            check(store.verify_version(version.revision) == [], f"{case.label} {version.revision} is complete but fails verification")
        else:
            check(version.revision != current, f"{case.label} the pointer names the incomplete {version.revision}")

    # the refreshes of these faults build no ONNX artifact, and serving expects none (else: degraded, by design)
    env = {
        "MODEL_STORAGE": azurite,
        "MODEL_CONTAINER": case.container,
        "MODEL_ID": MODEL_ID,
        "MODEL_POLL_SECONDS": "0",
        "MODEL_ARTIFACTS": "none",
    }
    holder = install(env)
    try:
        status, body, _ = call("ask", body={"question": QUESTION, "context": CONTEXT})
        health_status, health, _ = call("health")
        model_status, model, _ = call("model")
    finally:
        holder.close()
    check(
        model_status == 200 and (model["pointer"] or {}).get("revision") == current, f"{case.label} /api/model: {json.dumps(model)[:200]}"
    )
    if current is None:
        check(status == 503 and body["error"]["code"] == "model_not_ready", f"{case.label} /api/ask: {status} {body}")
        check(health_status == 503 and health["state"] == "empty", f"{case.label} /api/health: {health}")
        return
    check(status == 200 and body["revision"] == current, f"{case.label} /api/ask: {status} {body}")
    check((body["answer"], body["start"], body["end"]) == golden[current], f"{case.label} {body} is not the golden answer of {current}")
    check(health_status == 200 and health["revision"] == current and health["degraded"] is False, f"{case.label} /api/health: {health}")
