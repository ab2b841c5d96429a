"""The serving instance's model: loaded lazily on first use, once, and reloaded when the pointer moves.

A :class:`ModelHolder` lives at module level in ``function_app.py``. Importing it costs nothing:
settings are read, storage is touched and the model is loaded on the first request (or on
``/api/health?warm=1``), in a background thread that concurrent first requests all wait for
(single flight). A poller thread checks ``current.json``'s ETag every ``MODEL_POLL_SECONDS`` and
loads a new version without a restart: ``overlap`` keeps the old engine serving meanwhile,
``replace`` lets in-flight requests finish, frees the old engine, then loads (two bert-large
copies never sit in a 4 GB instance).

Which version and backend a load ends up with is :mod:`shared.serving.fallback`'s walk. A current
version whose files fail verification is *damaged*: an earlier one serves meanwhile (``degraded``),
and a background check here re-hashes the damaged files as they stream (no second model in
memory), with backoff up to 15 minutes, loading the current version again only once the re-hash
passes (after a repair).
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
from ..store.model_files import Pointer, utc_now
from ..store.model_store import ModelStore
from ..wire import to_json
from .fallback import ArtifactLoader, Loader, load_best
from .shapes import Health, HealthState

log = logging.getLogger(__name__)

NO_MODEL = "No model has been isolated yet: run a refresh (POST /api/model/refresh, or python -m shared isolate), then retry"
GATE_WAIT_SECONDS = 5.0


def utc_now_plus(seconds: float) -> str:
    import datetime as dt

    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat(timespec="seconds")


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
        self._damaged: dict[str, Any] | None = None
        self._fallbacks: list[dict[str, Any]] = []
        # (revision, variant, record ETag) of the current version's artifact refused as damaged:
        # the poller reloads once its record changes (rebuilt by build-artifacts --rebuild or a repair)
        self._artifact_watch: tuple[str, str, str | None] | None = None
        self._watcher: threading.Thread | None = None
        self._cond = threading.Condition()
        self._settings: Settings | None = None
        self._store: ModelStore | None = None
        self._gate: threading.BoundedSemaphore | None = None
        self._current: LoadedModel | None = None
        self._pointer_etag: str | None = None
        self._loading: str | None = None  # "pending" or the revision being loaded
        self._replacing = False
        self._active = 0
        self._no_model = False
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: dict[str, str] | None = None
        self._last_check: str | None = None
        self._loads = 0
        self._poller: threading.Thread | None = None
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
            return self._state_locked()

    def _state_locked(self) -> HealthState:
        if self._current is not None and not self._replacing:
            return "ready"
        if self._loading is not None:
            return "loading"
        if self._last_error is not None and not self._no_model:
            return "error"
        return "empty"

    @property
    def loads(self) -> int:
        """How many loads this holder started (tests count single flight with it)."""
        return self._loads

    def health(self) -> dict[str, Any]:
        """State as fixed codes, for the anonymous health route (no reasons, no settings): the
        JSON of :class:`~shared.serving.shapes.Health`."""
        with self._cond:
            state, degraded, current = self._state_locked(), self._degraded_locked(), self._current
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

    def _degraded_locked(self) -> bool:
        """Serving, but not what was asked for: an earlier version, or a fallback backend because
        an artifact failed (a version that simply has no artifact is served by torch, not degraded)."""
        return self._current is not None and (self._damaged is not None or any(f["code"] != "not_found" for f in self._fallbacks))

    def describe(self) -> dict[str, Any]:
        """What this instance has loaded, is loading, and its last load error (operators only)."""
        with self._cond:
            settings = self._settings
            return {
                "state": self._state_locked(),
                "degraded": self._degraded_locked(),
                "loaded": None if self._current is None else to_json(self._current.describe()),
                "loading": self._loading,
                "last_error": self._last_error,
                "damaged": None if self._damaged is None else dict(self._damaged),
                "fallbacks": [dict(f) for f in self._fallbacks],
                "last_pointer_check": self._last_check,
                "load_mode": settings.load_mode if settings else None,
                "reload": settings.reload if settings else None,
                "poll_seconds": settings.poll_seconds if settings else None,
                "backend": settings.backend if settings else None,
                "quantize": settings.quantize if settings else None,
            }

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
                if self._current is not None and not self._replacing:
                    self._active += 1
                    return self._current
                if self._loading is None:
                    if time.monotonic() >= self._retry_at:
                        self._begin_load_locked()
                        continue
                    raise self._not_ready_locked()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ModelNotReadyError("The model is still loading; retry in a few seconds", retry_after=5)
                self._cond.wait(remaining)

    def _not_ready_locked(self) -> ModelNotReadyError:
        retry_after = max(1, int(self._retry_at - time.monotonic()) + 1)
        if self._no_model:
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

    def warm(self) -> None:
        """Start loading in the background if nothing is loaded or loading (``?warm=1``)."""
        with self._cond:
            self._start_locked()
            if self._current is None and self._loading is None and time.monotonic() >= self._retry_at:
                self._begin_load_locked()

    # --- loading ----------------------------------------------------------------------------

    def _start_locked(self) -> None:
        try:
            settings = self.settings
        except SettingsError as err:
            log.error("Bad app settings: %s", err.message)
            raise
        if self._poller is None and settings.poll_seconds > 0:
            self._poller = threading.Thread(target=self._poll, name="model-pointer-poll", daemon=True)
            self._poller.start()

    def _begin_load_locked(self) -> None:
        self._loading = "pending"
        self._loads += 1
        threading.Thread(target=self._load, name="model-load", daemon=True).start()

    def _load(self) -> None:
        """Resolve the pointer and load the best version it allows (runs in its own thread)."""
        try:
            store = self.store
            pointer = store.read_pointer()
            with self._cond:
                self._last_check = utc_now()
            if pointer is None:
                self._finish_empty()
                return
            with self._cond:
                if self._current is not None and self._current.revision == pointer.revision and not self._fallbacks:
                    self._pointer_etag = pointer.etag  # touched, same revision
                    self._loading = None
                    self._cond.notify_all()
                    return
                self._loading = pointer.revision
            if self.settings.reload == "replace":
                self._release_current()
            loaded, fallbacks, damaged = self._load_best(store, pointer)
            watch = self._damaged_artifact(store, pointer.revision, fallbacks)
        except QAError as err:
            self._finish_failed(err.code, err.message)
            return
        except Exception as err:  # a load failure must never kill the worker
            log.exception("Unexpected failure while loading the model")
            self._finish_failed("load_failed", f"unexpected {type(err).__name__}; see the logs")
            return
        with self._cond:
            previous = self._current
            self._current = loaded
            self._pointer_etag = pointer.etag
            self._loading = None
            self._replacing = False
            self._failures = 0
            self._no_model = False
            self._fallbacks = fallbacks
            self._damaged = damaged
            self._artifact_watch = watch
            self._cond.notify_all()
        if damaged is not None:
            log.warning(
                "Serving %s instead of the current version %s, which failed verification (%s); degraded until it is repaired",
                loaded.revision,
                pointer.revision,
                damaged["message"],
            )
            self._watch_damaged(pointer.revision)
        if previous is not None:
            log.info("Now serving %s (was %s)", loaded.revision, previous.revision)
            del previous
            gc.collect()

    @staticmethod
    def _damaged_artifact(store: ModelStore, revision: str, fallbacks: list[dict[str, Any]]) -> tuple[str, str, str | None] | None:
        """What to watch when the current version's artifact was refused as damaged (its record's
        ETag now, after the load marked it), else ``None``."""
        for tried in fallbacks:
            if (tried["revision"], tried["backend"], tried["code"]) == (revision, "onnx", "integrity_error"):
                return revision, tried["variant"], record_etag(store, revision, tried["variant"])
        return None

    def _load_best(self, store: ModelStore, pointer: Pointer) -> tuple[LoadedModel, list[dict[str, Any]], dict[str, Any] | None]:
        """Walk the fallback order (:func:`~shared.serving.fallback.load_best`); when nothing loads
        and the current version is damaged, watch it before raising the current version's error."""
        walk = load_best(store, pointer, self.settings, loader=self._loader, artifact_loader=self._artifact_loader)
        if walk.loaded is not None:
            return walk.loaded, walk.tried, walk.damaged
        assert walk.error is not None
        if walk.damaged is not None:
            with self._cond:
                self._damaged = walk.damaged
            self._watch_damaged(pointer.revision)
        raise walk.error

    def _watch_damaged(self, revision: str) -> None:
        """Re-hash the damaged current version in the background until it verifies, then reload."""
        with self._cond:
            if self._watcher is not None and self._watcher.is_alive():
                return
            self._watcher = threading.Thread(target=self._recheck_damaged, args=(revision,), name="model-damage-check", daemon=True)
            self._watcher.start()

    def _recheck_damaged(self, revision: str) -> None:
        delay = self._damage_backoff
        while True:
            with self._cond:
                if self._damaged is None or self._damaged["revision"] != revision:
                    return
                self._damaged["next_check_at"] = utc_now_plus(delay)
            if self._stop.wait(delay):
                return
            try:
                problems = self.store.verify_version(revision)  # streamed: no second model in memory
            except QAError as err:
                problems = [err.message]
            if not problems:
                log.info("The current version %s verifies again; loading it", revision)
                with self._cond:
                    self._damaged = None
                    self._fallbacks = []
                    self._retry_at = 0.0
                    if self._loading is None:
                        self._begin_load_locked()
                return
            log.warning("The current version %s still fails verification (%s); next check in %.0fs", revision, problems[0], delay * 2)
            with self._cond:
                if self._damaged is not None:
                    self._damaged["message"] = problems[0]
            delay = min(self._max_damage_backoff, delay * 2)

    def _release_current(self) -> None:
        """``replace`` mode: stop handing out the old engine, let in-flight requests finish, free it."""
        with self._cond:
            if self._current is None:
                return
            self._replacing = True
            patience = time.monotonic() + self.settings.deadline_seconds
            while self._active > 0 and time.monotonic() < patience:
                self._cond.wait(patience - time.monotonic())
            old, self._current = self._current, None
        log.info("Freed %s before loading the new version (MODEL_RELOAD=replace)", old.revision)
        del old
        gc.collect()

    def _finish_empty(self) -> None:
        log.warning("No model isolated yet in the container; serving 503 until a refresh publishes one")
        with self._cond:
            self._no_model = True
            self._last_error = {"code": "no_model", "message": NO_MODEL, "at": utc_now()}
            self._retry_at = time.monotonic() + min(10.0, self._backoff * 5)
            self._loading = None
            self._replacing = False
            self._cond.notify_all()

    def _finish_failed(self, code: str, message: str) -> None:
        with self._cond:
            self._failures += 1
            delay = min(self._max_backoff, self._backoff * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay
            self._last_error = {"code": code, "message": message, "at": utc_now()}
            self._no_model = False
            self._loading = None
            self._replacing = False
            keeps = self._current.revision if self._current is not None else None
            self._cond.notify_all()
        log.error("Model load failed (%s): %s; retrying in %.0fs; still serving: %s", code, message, delay, keeps)

    # --- hot reload -------------------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_seconds):
            try:
                self.check_pointer()
            except Exception:  # the poller must outlive storage outages
                log.warning("Pointer check failed; will retry", exc_info=True)

    def check_pointer(self) -> None:
        """Start a load if ``current.json`` changed (or a failed load is due for a retry)."""
        with self._cond:
            if self._loading is not None or time.monotonic() < self._retry_at:
                return
            if self._current is None and self._last_error is None:
                return  # never asked for: loading stays lazy
            watch = self._artifact_watch
        etag = self.store.pointer_etag()
        rebuilt = False
        if watch is not None and etag == self._pointer_etag:
            revision, variant, seen = watch
            now = record_etag(self.store, revision, variant)
            rebuilt = now is not None and now != seen
            if rebuilt:
                log.info("The %s artifact of %s was rebuilt; loading it in the background", variant, revision)
        with self._cond:
            self._last_check = utc_now()
            changed = etag is not None and etag != self._pointer_etag
            due = self._current is None and self._last_error is not None
            if (changed or due or rebuilt) and self._loading is None:
                log.info("current.json changed (or a retry is due); loading in the background")
                self._begin_load_locked()

    def close(self) -> None:
        """Stop the poller (tests; the worker process just exits)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
