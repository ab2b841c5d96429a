"""The serving instance's model: loaded lazily on first use, once, and reloaded when the pointer moves.

A :class:`ModelHolder` lives at module level in ``function_app.py``. Importing it costs nothing:
settings are read, storage is touched and the model is loaded on the first request (or on
``/api/health?warm=1``), in a background thread that concurrent first requests all wait for
(single flight). A poller (:mod:`shared.serving.pointer_poll`) checks ``current.json``'s ETag every
``MODEL_POLL_SECONDS`` and loads a new version without a restart: ``overlap`` keeps the old engine
serving meanwhile, ``replace`` lets in-flight requests finish, frees the old engine, then loads (two
bert-large copies never sit in a 4 GB instance).

Which version and backend a load ends up with is :mod:`shared.serving.fallback`'s walk; the states
and their transitions are :class:`~shared.serving.load_state.LoadState`. A current version whose
files (or manifest) fail verification is *damaged*: an earlier one serves meanwhile (``degraded``),
and :class:`~shared.serving.damage_watch.DamageWatch` re-hashes it in the background with a backoff,
loading it again only once it verifies (after a repair). A damaged or missing ``current.json`` never
leaves the instance without a model while an intact version exists: the pointer's last recorded
value serves, ``degraded``, with the repair in ``/api/model``.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import BusyError, ModelNotReadyError, QAError, SettingsError
from ..loading.onnx_artifacts import record_etag
from ..loading.versions import LoadedModel, load_version
from ..settings import Settings
from ..store.model_files import utc_now
from ..store.model_store import ModelStore, PointerState
from ..wire import to_json
from .damage_watch import DamageWatch
from .fallback import ArtifactLoader, Loader, load_best
from .load_state import LoadState
from .pointer_poll import PointerPoller
from .shapes import DamagedVersion, Fallback, Health, HealthState, InstanceStatus, LoadError, LoadProblem

log = logging.getLogger(__name__)

NO_MODEL = "No model has been isolated yet: run a refresh (POST /api/model/refresh, or python -m shared isolate), then retry"
GATE_WAIT_SECONDS = 5.0


class ModelHolder:
    """Lazily loaded, hot-reloaded engine of one serving process; thread safe.

    Args:
        settings_factory: builds the settings on first use (default: from the environment).
        store_factory: builds the store (default: the serving profile of :class:`ModelStore`).
        loader: loads one version with torch (default: :func:`~shared.loading.versions.load_version`).
        artifact_loader: loads a version's ONNX artifact of a variant; ``None``: torch only.
        backoff_seconds: first wait after a failed load; it doubles up to ``max_backoff_seconds``.
        damage_backoff_seconds: first wait before re-hashing a damaged current version; it
            doubles up to ``max_damage_backoff_seconds`` (15 minutes).
    """

    def __init__(
        self,
        settings_factory: Callable[[], Settings] = Settings.from_env,
        *,
        store_factory: Callable[[Settings], ModelStore] | None = None,
        loader: Loader | None = None,
        artifact_loader: ArtifactLoader | None = None,
        backoff_seconds: float = 2.0,
        max_backoff_seconds: float = 120.0,
        damage_backoff_seconds: float = 30.0,
        max_damage_backoff_seconds: float = 900.0,
    ) -> None:
        self._settings_factory = settings_factory
        self._store_factory = store_factory or (lambda s: ModelStore.from_settings(s, serving=True))
        self._loader: Loader = loader or (lambda store, revision, settings: load_version(store, revision, settings))
        self._artifact_loader = artifact_loader
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._damage_backoff = damage_backoff_seconds
        self._max_damage_backoff = max_damage_backoff_seconds
        self._cond = threading.Condition()
        self._state = LoadState()
        self._active = 0  # requests holding the current model
        self._settings: Settings | None = None
        self._store: ModelStore | None = None
        self._gate: threading.BoundedSemaphore | None = None
        self._last_check: str | None = None
        self._last_failure: QAError | None = None
        # (revision, variant, record ETag) of the current version's artifact refused as damaged:
        # the poller reloads once its record changes (rebuilt by build-artifacts --rebuild or a repair)
        self._artifact_watch: tuple[str, str, str | None] | None = None
        self._watch: DamageWatch | None = None
        self._poller: PointerPoller | None = None
        self._stop = threading.Event()

    # --- configuration ----------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The settings, read on first use. Raises :class:`SettingsError` if they are bad."""
        if self._settings is None:
            self._settings = self._settings_factory()
        return self._settings

    @property
    def store(self) -> ModelStore:
        """The model store with the serving profile (short timeouts, few retries), made on first use."""
        if self._store is None:
            self._store = self._store_factory(self.settings)
        return self._store

    # --- state ------------------------------------------------------------------------------

    @property
    def state(self) -> HealthState:
        """``ready``, ``loading``, ``empty`` (nothing loaded, nothing to load) or ``error``."""
        with self._cond:
            return self._state.public_state

    @property
    def last_failure(self) -> QAError | None:
        """The error of the last failed load, as raised (the command line names its cause with it)."""
        return self._last_failure

    @property
    def loads(self) -> int:
        """How many loads this holder started (tests count single flight with it)."""
        return self._state.loads

    def health(self) -> dict[str, Any]:
        """State as fixed codes, for the anonymous health route (no reasons, no settings): the
        JSON of :class:`~shared.serving.shapes.Health`."""
        with self._cond:
            state, degraded, current = self._state.public_state, self._state.degraded, self._state.current
        if current is None:
            return to_json(Health(state, degraded))
        return to_json(
            Health(
                state,
                degraded,
                model_id=current.model_id,
                revision=current.revision,
                load_seconds=round(current.load_seconds, 3),
                backend=current.backend,
                variant=current.variant,
            )
        )

    def instance(self) -> InstanceStatus:
        """What this instance has loaded, is loading, and its last load error (operators only)."""
        with self._cond:
            settings = self._settings
            state = self._state
            damaged = state.damaged
            return InstanceStatus(
                state=state.public_state,
                degraded=state.degraded,
                problems=tuple(LoadProblem(**p) for p in state.problems) if state.current is not None else (),
                loaded=None if state.current is None else state.current.describe(),
                loading=state.loading,
                last_error=None if state.last_error is None else LoadError(**state.last_error),
                damaged=None if damaged is None else DamagedVersion(**damaged),
                fallbacks=tuple(Fallback(**f) for f in state.fallbacks),
                last_pointer_check=self._last_check,
                load_mode=settings.load_mode if settings else None,
                reload=settings.reload if settings else None,
                poll_seconds=settings.poll_seconds if settings else None,
                backend=settings.backend if settings else None,  # type: ignore[arg-type]
                quantize=settings.quantize if settings else None,  # type: ignore[arg-type]
            )

    def describe(self) -> dict[str, Any]:
        """:meth:`instance` as JSON (``GET /api/model``'s ``instance``)."""
        return to_json(self.instance())

    # --- serving ----------------------------------------------------------------------------

    @contextmanager
    def model(self, deadline: float) -> Iterator[LoadedModel]:
        """The loaded model for one request, waiting for a load up to ``deadline``.

        The first call starts the load (and the pointer poller). While the caller holds the
        model, a ``replace`` reload waits for it to finish.

        Raises:
            ModelNotReadyError: no model isolated, the last load failed, or still loading at
                the deadline (503 with Retry-After).
            SettingsError: the app settings are bad.
        """
        loaded = self._acquire(deadline)
        try:
            yield loaded
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def _acquire(self, deadline: float) -> LoadedModel:
        with self._cond:
            self._start_locked()
            while True:
                current = self._state.servable()
                if current is not None:
                    self._active += 1
                    return current
                if self._state.phase != "loading":
                    if self._state.may_begin(time.monotonic()):
                        self._begin_load_locked()
                        continue
                    raise self._not_ready_locked()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ModelNotReadyError("The model is still loading; retry in a few seconds", retry_after=5)
                self._cond.wait(remaining)

    def _not_ready_locked(self) -> ModelNotReadyError:
        retry_after = max(1, int(self._state.retry_at - time.monotonic()) + 1)
        if self._state.phase == "no_model":
            return ModelNotReadyError(NO_MODEL, retry_after=retry_after)
        return ModelNotReadyError("The model could not be loaded; operators: see GET /api/model and the logs", retry_after=retry_after)

    @contextmanager
    def inference_slot(self, deadline: float) -> Iterator[None]:
        """One of ``QA_MAX_CONCURRENT`` inference slots; waits briefly, then :class:`BusyError`."""
        with self._cond:
            if self._gate is None:
                self._gate = threading.BoundedSemaphore(self.settings.max_concurrent)
            gate = self._gate
        wait = min(GATE_WAIT_SECONDS, deadline - time.monotonic())
        if not gate.acquire(timeout=max(wait, 0.0)):
            raise BusyError("Every inference slot of this instance is busy; retry shortly")
        try:
            yield
        finally:
            gate.release()

    def wait_loaded(self, timeout_seconds: float) -> str:
        """Start a load if none is under way and wait for it to end (a terminal can wait for a
        1.3 GB load; a request has its deadline instead); returns the state then."""
        self.warm()
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            while self._state.phase == "loading" and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return self._state.public_state

    def warm(self) -> None:
        """Start loading in the background if nothing is loaded or loading (``?warm=1``)."""
        with self._cond:
            self._start_locked()
            if self._state.current is None and self._state.may_begin(time.monotonic()):
                self._begin_load_locked()

    # --- loading ----------------------------------------------------------------------------

    def _start_locked(self) -> None:
        try:
            settings = self.settings
        except SettingsError as err:
            log.error("Bad app settings: %s", err.message)
            raise
        if self._poller is None and settings.poll_seconds > 0:
            self._poller = PointerPoller(self.check_pointer, interval=settings.poll_seconds, stop=self._stop)
            self._poller.start()

    def _begin_load_locked(self) -> None:
        self._state.begin(time.monotonic())
        threading.Thread(target=self._load, name="model-load", daemon=True).start()

    def _load(self) -> None:
        """Resolve the pointer and load the best version it allows (runs in its own thread)."""
        try:
            store = self.store
            state = store.read_pointer_state()
            with self._cond:
                self._last_check = utc_now()
            if state.empty:
                self._finish_empty()
                return
            if self._keep_current(store, state):
                return
            with self._cond:
                self._state.resolving(state.effective.revision if state.effective else "newest intact version")
            if self.settings.reload == "replace":
                self._release_current()
            walk = load_best(store, state, self.settings, loader=self._loader, artifact_loader=self._artifact_loader)
            if walk.loaded is None:
                assert walk.error is not None
                if walk.damaged is not None:
                    with self._cond:
                        self._state.damaged = walk.damaged
                    self._watch_damaged(walk.damaged["revision"])
                raise walk.error
            watch = self._damaged_artifact(store, walk.loaded.revision, walk.tried)
        except QAError as err:
            self._last_failure = err
            self._finish_failed(err.code, err.message)
            return
        except Exception as err:  # a load failure must never kill the worker
            log.exception("Unexpected failure while loading the model")
            self._finish_failed("load_failed", f"unexpected {type(err).__name__}; see the logs")
            return
        with self._cond:
            previous = self._state.loaded(
                walk.loaded, pointer_etag=state.etag, fallbacks=walk.tried, problems=walk.problems, damaged=walk.damaged
            )
            self._artifact_watch = watch
            self._cond.notify_all()
        for problem in walk.problems:
            log.warning("Serving %s, degraded: %s; repair: %s", walk.loaded.revision, problem["problem"], problem["repair"])
        if walk.damaged is not None:
            self._watch_damaged(walk.damaged["revision"])
        if previous is not None:
            log.info("Now serving %s (was %s)", walk.loaded.revision, previous.revision)
            del previous
            gc.collect()

    def _keep_current(self, store: ModelStore, state: PointerState) -> bool:
        """The pointer was touched (a pin, a rewrite of a damaged current.json) but names the version
        already served, which served without a fallback: keep it, with the pointer's problems now."""
        with self._cond:
            current = self._state.current
            base = state.effective
            if current is None or base is None or current.revision != base.revision:
                return False
            if any(p["cause"] != "pointer" for p in self._state.problems) or self._state.damaged is not None:
                return False
            if self._state.fallbacks and current.backend != "onnx" and self.settings.backend == "onnx":
                return False  # an artifact may be back: load again
            pointer = (
                []
                if state.damage is None
                else [{"cause": "pointer", "problem": f"{state.damage.message}; serving {current.revision}", "repair": state.damage.repair}]
            )
            self._state.unchanged(pointer_etag=state.etag, problems=pointer)
            self._cond.notify_all()
            return True

    @staticmethod
    def _damaged_artifact(store: ModelStore, revision: str, tried: list[dict[str, Any]]) -> tuple[str, str, str | None] | None:
        """What to watch when the served version's artifact was refused as damaged (its record's
        ETag now, after the load marked it), else ``None``."""
        for refused in tried:
            if (refused["revision"], refused["backend"], refused["code"]) == (revision, "onnx", "integrity_error"):
                return revision, refused["variant"], record_etag(store, revision, refused["variant"])
        return None

    def _watch_damaged(self, revision: str) -> None:
        """Re-hash the damaged current version in the background until it verifies, then reload."""
        with self._cond:
            if self._watch is not None and self._watch.alive:
                return

            def still_wanted() -> bool:
                with self._cond:
                    return self._state.damaged is not None and self._state.damaged["revision"] == revision

            def set_field(name: str) -> Callable[[str], None]:
                def update(value: str) -> None:
                    with self._cond:
                        if self._state.damaged is not None:
                            self._state.damaged[name] = value

                return update

            def repaired() -> None:
                log.info("The current version %s verifies again; loading it", revision)
                with self._cond:
                    self._state.verified_again()
                    if self._state.may_begin(time.monotonic()):
                        self._begin_load_locked()

            self._watch = DamageWatch(
                verify=lambda: self.store.verify_version(revision),
                still_wanted=still_wanted,
                on_next_check=set_field("next_check_at"),
                on_problem=set_field("message"),
                on_repaired=repaired,
                first_delay=self._damage_backoff,
                max_delay=self._max_damage_backoff,
                stop=self._stop,
            )
            self._watch.start()

    def _release_current(self) -> None:
        """``replace`` mode: stop handing out the old engine, let in-flight requests finish, free it."""
        with self._cond:
            if self._state.release() is None:
                return
            patience = time.monotonic() + self.settings.deadline_seconds
            while self._active > 0 and time.monotonic() < patience:
                self._cond.wait(patience - time.monotonic())
            old = self._state.current
            self._state.released()
        assert old is not None
        log.info("Freed %s before loading the new version (MODEL_RELOAD=replace)", old.revision)
        del old
        gc.collect()

    def _finish_empty(self) -> None:
        log.warning("No model isolated yet in the container; serving 503 until a refresh publishes one")
        with self._cond:
            self._state.empty(NO_MODEL, at=utc_now(), now=time.monotonic(), retry_in=min(10.0, self._backoff * 5))
            self._cond.notify_all()

    def _finish_failed(self, code: str, message: str) -> None:
        with self._cond:
            delay = self._state.failed(
                code, message, at=utc_now(), now=time.monotonic(), backoff=self._backoff, max_backoff=self._max_backoff
            )
            keeps = self._state.current.revision if self._state.current is not None else None
            self._cond.notify_all()
        log.error("Model load failed (%s): %s; retrying in %.0fs; still serving: %s", code, message, delay, keeps)

    # --- hot reload -------------------------------------------------------------------------

    def check_pointer(self) -> None:
        """Start a load if ``current.json`` changed (or a failed load is due for a retry)."""
        with self._cond:
            state = self._state
            if not state.may_begin(time.monotonic()):
                return
            if state.current is None and state.last_error is None:
                return  # never asked for: loading stays lazy
            watch = self._artifact_watch
            seen = state.pointer_etag
        etag = self.store.pointer_etag()
        rebuilt = False
        if watch is not None and etag == seen:
            revision, variant, recorded = watch
            now = record_etag(self.store, revision, variant)
            rebuilt = now is not None and now != recorded
            if rebuilt:
                log.info("The %s artifact of %s was rebuilt; loading it in the background", variant, revision)
        with self._cond:
            self._last_check = utc_now()
            changed = etag != self._state.pointer_etag  # also a pointer deleted under a loaded model: said degraded
            due = self._state.current is None and self._state.last_error is not None
            if (changed or due or rebuilt) and self._state.may_begin(time.monotonic()):
                log.info("current.json changed (or a retry is due); loading in the background")
                self._begin_load_locked()

    def close(self) -> None:
        """Stop the poller (tests; the worker process just exits)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
