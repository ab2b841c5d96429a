"""The model holder alone: its state machine, single flight, backoff, reloads, the fallback walk and
the damage watch, with a hand-written fake store and fake loaders (no storage, no model)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from shared.errors import IntegrityError, ModelNotReadyError, NotFoundError, QAError, RecordDamagedError, StorageUnavailableError
from shared.loading.versions import LoadedModel
from shared.serving.damage_watch import DamageWatch
from shared.serving.holder import NO_MODEL, ModelHolder
from shared.serving.load_state import PENDING, LoadState, TransitionError
from shared.settings import Settings
from shared.store.model_files import FileEntry, Manifest, Pointer
from shared.store.model_store import PointerState, RecordDamage

A, B, C = "a" * 40, "b" * 40, "c" * 40
SOON = 5.0  # seconds a test waits for a background load; never a speed check


def model(revision: str, backend: str = "torch") -> LoadedModel:
    return LoadedModel(engine=object(), model_id="org/model", revision=revision, mode="memory", bytes=1, load_seconds=0.01, backend=backend)


def manifest(revision: str) -> Manifest:
    return Manifest(model_id="org/model", revision=revision, source="https://hub", files=(FileEntry("config.json", 1, "0" * 64),))


@dataclass
class FakeStore:
    """What the holder reads of a store: the pointer's state, the serving order, manifests, verification."""

    state: PointerState
    order: list[str] = field(default_factory=list)
    verify: Callable[[str], list[str]] = lambda revision: []
    model_id: str = "org/model"

    def read_pointer_state(self) -> PointerState:
        return self.state

    def pointer_etag(self) -> str | None:
        return self.state.etag

    def serving_order(self, state: PointerState) -> list[str]:
        return list(self.order)

    def require_manifest(self, revision: str) -> Manifest:
        if revision not in self.order and (self.state.effective is None or revision != self.state.effective.revision):
            raise NotFoundError(f"no version {revision}")
        return manifest(revision)

    def manifest_facts(self, revision: str) -> dict[str, str]:
        return {"source": "https://hub"}

    def verify_version(self, revision: str) -> list[str]:
        return self.verify(revision)


class Loader:
    """Loads what ``outcomes`` says per revision (a model, or an error to raise); may wait on ``gate``."""

    def __init__(self, outcomes: dict[str, LoadedModel | QAError], gate: threading.Event | None = None) -> None:
        self.outcomes = outcomes
        self.gate = gate
        self.calls: list[str] = []

    def __call__(self, store: Any, revision: str, settings: Settings) -> LoadedModel:
        self.calls.append(revision)
        if self.gate is not None:
            self.gate.wait(SOON)
        outcome = self.outcomes.get(revision, NotFoundError(f"Version {revision} is not a complete version"))
        if isinstance(outcome, QAError):
            raise outcome
        return outcome


def at(revision: str, *, pinned: bool = False, etag: str = "e1") -> PointerState:
    return PointerState(pointer=Pointer(model_id="org/model", revision=revision, pinned=pinned), etag=etag)


def holder_for(store: FakeStore, loader: Loader, *, artifact_loader: Any = None, **settings: str) -> ModelHolder:
    env = {"MODEL_POLL_SECONDS": "0", "QA_BACKEND": "torch" if artifact_loader is None else "onnx", **settings}
    return ModelHolder(
        lambda: Settings.from_env(env),
        store_factory=lambda _: store,  # type: ignore[arg-type,return-value]
        loader=loader,
        artifact_loader=artifact_loader,
        backoff_seconds=0.05,
        max_backoff_seconds=0.2,
        damage_backoff_seconds=0.01,
        max_damage_backoff_seconds=0.05,
    )


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SOON
    while not condition():
        assert time.monotonic() < deadline, f"waited {SOON} s for {what}"
        time.sleep(0.005)


# --- the state machine alone ---------------------------------------------------------------------


def test_the_state_machine_allows_only_its_transitions() -> None:
    state = LoadState()
    assert (state.phase, state.public_state, state.degraded) == ("idle", "empty", False)
    with pytest.raises(TransitionError):
        state.resolving(A)  # nothing is loading
    state.begin(now=0.0)
    assert (state.phase, state.loading, state.public_state, state.loads) == ("loading", PENDING, "loading", 1)
    with pytest.raises(TransitionError):
        state.begin(now=0.0)  # single flight: one load at a time
    state.resolving(A)
    state.loaded(model(A), pointer_etag="e1", fallbacks=[], problems=[], damaged=None)
    assert (state.phase, state.public_state, state.loading, state.pointer_etag) == ("ready", "ready", None, "e1")
    with pytest.raises(TransitionError):
        state.loaded(model(B), pointer_etag="e2", fallbacks=[], problems=[], damaged=None)


def test_failures_back_off_doubling_up_to_the_cap_and_a_loaded_model_keeps_serving() -> None:
    state = LoadState()
    delays = []
    for _ in range(5):
        state.begin(now=100.0 + sum(delays))
        delays.append(state.failed("load_failed", "boom", at="t", now=100.0 + sum(delays), backoff=2.0, max_backoff=10.0))
        assert state.public_state == "error" and not state.may_begin(100.0 + sum(delays) - 0.01)
    assert delays == [2.0, 4.0, 8.0, 10.0, 10.0]
    state.begin(now=1000.0)
    state.loaded(model(A), pointer_etag=None, fallbacks=[], problems=[], damaged=None)
    assert (state.failures, state.last_error) == (0, None)
    state.begin(now=1000.0)
    state.failed("storage_unavailable", "down", at="t", now=1000.0, backoff=2.0, max_backoff=10.0)
    assert state.public_state == "ready" and state.current is not None and state.last_error is not None  # overlap: still serving


def test_a_replace_reload_stops_handing_out_the_old_model_before_freeing_it() -> None:
    state = LoadState()
    state.begin(now=0.0)
    state.loaded(model(A), pointer_etag="e1", fallbacks=[], problems=[], damaged=None)
    state.begin(now=0.0)
    old = state.release()
    assert old is not None and old.revision == A and state.servable() is None and state.public_state == "loading"
    state.released()
    assert state.current is None
    previous = state.loaded(model(B), pointer_etag="e2", fallbacks=[], problems=[], damaged=None)
    assert previous is None and state.servable() is not None


def test_degraded_means_problems_while_a_model_serves() -> None:
    state = LoadState()
    state.begin(now=0.0)
    problem = {"cause": "pointer", "problem": "current.json is damaged", "repair": "python -m shared repair"}
    state.loaded(model(A), pointer_etag="e1", fallbacks=[], problems=[problem], damaged=None)
    assert state.degraded
    state.begin(now=0.0)
    state.unchanged(pointer_etag="e2", problems=[])
    assert not state.degraded and state.pointer_etag == "e2"


# --- the holder with fakes -----------------------------------------------------------------------


def test_concurrent_first_requests_share_one_load() -> None:
    gate = threading.Event()
    loader = Loader({A: model(A)}, gate=gate)
    holder = holder_for(FakeStore(at(A)), loader)
    got: list[str] = []

    def ask() -> None:
        with holder.model(time.monotonic() + SOON) as loaded:
            got.append(loaded.revision)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: holder.state == "loading", "the load to start")
    gate.set()
    for thread in threads:
        thread.join(SOON)
    assert got == [A] * 8 and holder.loads == 1 and loader.calls == [A]


def test_an_empty_store_is_a_503_that_says_to_refresh_and_retries_later() -> None:
    holder = holder_for(FakeStore(PointerState()), Loader({}))
    with pytest.raises(ModelNotReadyError) as caught, holder.model(time.monotonic() + SOON):
        pass
    assert caught.value.message == NO_MODEL and caught.value.retry_after is not None
    assert holder.state == "empty" and holder.describe()["last_error"]["code"] == "no_model"


def test_a_failed_load_is_an_error_state_then_retried_after_its_backoff() -> None:
    loader = Loader({A: StorageUnavailableError("Storage is unreachable while reading current.json")})
    holder = holder_for(FakeStore(at(A)), loader)
    with pytest.raises(ModelNotReadyError), holder.model(time.monotonic() + SOON):
        pass
    assert holder.state == "error" and isinstance(holder.last_failure, StorageUnavailableError)
    with pytest.raises(ModelNotReadyError, match="could not be loaded"), holder.model(time.monotonic() + SOON):
        pass  # within the backoff: no second load
    assert loader.calls == [A]
    loader.outcomes[A] = model(A)
    time.sleep(0.06)  # the first backoff (0.05 s) has passed
    with holder.model(time.monotonic() + SOON) as loaded:
        assert loaded.revision == A
    assert loader.calls == [A, A]


def test_a_damaged_pointer_serves_its_last_recorded_value_degraded_with_the_repair() -> None:
    damage = RecordDamage("current.json", "current.json is damaged: its content does not match its own checksum", "python -m shared repair")
    state = PointerState(etag="e-damaged", damage=damage, history=Pointer(model_id="org/model", revision=B, previous=(A,)))
    loader = Loader({A: model(A), B: model(B)})
    holder = holder_for(FakeStore(state, order=[B, A]), loader)
    with holder.model(time.monotonic() + SOON) as loaded:
        assert loaded.revision == B
    health, described = holder.health(), holder.describe()
    assert health["state"] == "ready" and health["degraded"] is True
    [problem] = described["problems"]
    assert (
        problem["cause"] == "pointer" and "current.json is damaged" in problem["problem"] and problem["repair"] == "python -m shared repair"
    )


def test_a_damaged_current_version_serves_the_previous_one_until_it_verifies_again() -> None:
    repaired = threading.Event()
    damaged = RecordDamagedError(
        "manifest.json of version b is damaged", record="manifest.json", repair="python -m shared isolate --repair"
    )
    loader = Loader({A: model(A), B: damaged})
    store = FakeStore(at(B), order=[A], verify=lambda revision: [] if repaired.is_set() else ["still damaged"])
    holder = holder_for(store, loader)
    with holder.model(time.monotonic() + SOON) as loaded:
        assert loaded.revision == A
    described = holder.describe()
    assert described["degraded"] is True and described["damaged"]["revision"] == B
    assert described["damaged"]["repair"] == "python -m shared isolate --repair"
    assert [p["cause"] for p in described["problems"]] == ["version"]
    loader.outcomes[B] = model(B)
    repaired.set()  # the watch re-hashes, finds it intact, and loads it
    wait_until(lambda: holder.health().get("revision") == B, "the repaired version")
    assert holder.health()["degraded"] is False and holder.describe()["damaged"] is None
    holder.close()


def test_a_real_problem_of_the_current_version_is_not_hidden_by_an_earlier_one() -> None:
    from shared.errors import UnsafeModelError

    loader = Loader({A: model(A), B: UnsafeModelError("no question-answering head")})
    holder = holder_for(FakeStore(at(B), order=[A]), loader)
    with pytest.raises(ModelNotReadyError), holder.model(time.monotonic() + SOON):
        pass
    assert holder.describe()["last_error"]["message"] == "no question-answering head" and loader.calls == [B]


@pytest.mark.parametrize(("artifacts", "degraded"), [("fp32,int8", True), ("none", False)])
def test_a_missing_artifact_is_a_problem_only_when_the_settings_expect_it(artifacts: str, degraded: bool) -> None:
    def no_artifact(store: Any, manifest: Manifest, variant: str, settings: Settings) -> LoadedModel:
        raise NotFoundError(f"Version {manifest.revision} has no {variant} ONNX artifact")

    holder = holder_for(FakeStore(at(A)), Loader({A: model(A)}), artifact_loader=no_artifact, MODEL_ARTIFACTS=artifacts)
    with holder.model(time.monotonic() + SOON) as loaded:
        assert loaded.backend == "torch"
    described = holder.describe()
    assert described["degraded"] is degraded
    assert [p["repair"] for p in described["problems"]] == ([f"python -m shared build-artifacts --revision {A}"] if degraded else [])


def test_a_moved_pointer_reloads_and_replace_frees_the_old_model_first() -> None:
    store = FakeStore(at(A))
    loader = Loader({A: model(A), B: model(B)})
    holder = holder_for(store, loader, MODEL_RELOAD="replace")
    with holder.model(time.monotonic() + SOON) as loaded:
        assert loaded.revision == A
    store.state = at(B, etag="e2")
    holder.check_pointer()
    wait_until(lambda: holder.health().get("revision") == B, "the new version")
    assert loader.calls == [A, B]
    holder.check_pointer()  # unchanged: no load
    assert holder.loads == 2


def test_a_rewritten_pointer_at_the_served_version_keeps_the_model() -> None:
    damage = RecordDamage("current.json", "current.json is missing (its history keeps its last value)", "python -m shared repair")
    store = FakeStore(PointerState(damage=damage, history=Pointer(model_id="org/model", revision=A)), order=[A])
    loader = Loader({A: model(A)})
    holder = holder_for(store, loader)
    with holder.model(time.monotonic() + SOON):
        pass
    assert holder.health()["degraded"] is True
    store.state = at(A, etag="e-repaired")  # python -m shared repair rewrote it
    holder.check_pointer()
    wait_until(lambda: holder.health()["degraded"] is False, "the repaired pointer")
    assert loader.calls == [A]  # the model was kept, not loaded again


def test_the_damage_watch_waits_what_it_says() -> None:
    waits: list[float] = []
    announced: list[str] = []
    logged: list[str] = []

    class Clock(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(float(timeout or 0))
            return False

    results = iter([["bad"], ["bad"], ["bad"], []])
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    watch_log = logging.getLogger("shared.serving.damage_watch")
    watch_log.addHandler(handler)
    try:
        DamageWatch(
            verify=lambda: next(results),
            still_wanted=lambda: True,
            on_next_check=announced.append,
            on_problem=lambda message: None,
            on_repaired=lambda: None,
            first_delay=30.0,
            max_delay=90.0,
            stop=Clock(),
        ).run()
    finally:
        watch_log.removeHandler(handler)
    assert waits == [30.0, 60.0, 90.0, 90.0]
    assert [line.rsplit("next check in ", 1)[1] for line in logged] == ["60s", "90s", "90s"]  # what is waited next, not twice it
    assert len(announced) == 4


def test_integrity_and_absence_of_the_pointers_version_both_walk_on() -> None:
    for failure in (IntegrityError("Version b: model.safetensors: sha256 differs"), NotFoundError("Version b is not a complete version")):
        holder = holder_for(FakeStore(at(B), order=[A]), Loader({A: model(A), B: failure}))
        with holder.model(time.monotonic() + SOON) as loaded:
            assert loaded.revision == A
        assert holder.describe()["damaged"]["revision"] == B
        holder.close()
