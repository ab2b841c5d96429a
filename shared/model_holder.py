"""The serving instance's model: loaded lazily on first use, once, and reloaded when the pointer moves.

A :class:`ModelHolder` lives at module level in ``function_app.py``. Importing it costs nothing:
settings are read, storage is touched and the model is loaded on the first request (or on
``/api/health?warm=1``), in a background thread that concurrent first requests all wait for
(single flight). A poller thread checks ``current.json``'s ETag every ``MODEL_POLL_SECONDS`` and
loads a new version without a restart: ``overlap`` keeps the old engine serving meanwhile,
``replace`` lets in-flight requests finish, frees the old engine, then loads (two bert-large
copies never sit in a 4 GB instance).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import BusyError, ModelNotReadyError, QAError, SettingsError
from .model_files import utc_now
from .model_loader import LoadedModel, load_version
from .model_store import ModelStore
from .settings import Settings

log = logging.getLogger(__name__)

Loader = Callable[[ModelStore, str, Settings], LoadedModel]
NO_MODEL = "No model has been isolated yet: run a refresh (POST /api/model/refresh, or python -m shared isolate), then retry"
GATE_WAIT_SECONDS = 5.0


class ModelHolder:
    """Lazily loaded, hot-reloaded engine of one serving process; thread safe.

    Args:
        settings_factory: builds the settings on first use (default: from the environment).
        store_factory: builds the store (default: the serving profile of :class:`ModelStore`).
        loader: loads one version (default: :func:`~shared.model_loader.load_version`).
        backoff_seconds: first wait after a failed load; it doubles up to ``max_backoff_seconds``.
    """

    def __init__(
        self,
        settings_factory: Callable[[], Settings] = Settings.from_env,
        *,
        store_factory: Callable[[Settings], ModelStore] | None = None,
        loader: Loader | None = None,
        backoff_seconds: float = 2.0,
        max_backoff_seconds: float = 120.0,
    ) -> None:
        self._settings_factory = settings_factory
        self._store_factory = store_factory or (lambda s: ModelStore.from_settings(s, serving=True))
        self._loader: Loader = loader or (lambda store, revision, settings: load_version(store, revision, settings))
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
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
    def state(self) -> str:
        """``ready``, ``loading``, ``empty`` (nothing loaded, nothing to load) or ``error``."""
        with self._cond:
            return self._state_locked()

    def _state_locked(self) -> str:
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
        """State as fixed codes, for the anonymous health route (no reasons, no settings)."""
        with self._cond:
            state = self._state_locked()
            body: dict[str, Any] = {"state": state}
            if self._current is not None:
                body.update(
                    model_id=self._current.model_id,
                    revision=self._current.revision,
                    load_seconds=round(self._current.load_seconds, 3),
                )
            return body

    def describe(self) -> dict[str, Any]:
        """What this instance has loaded, is loading, and its last load error (operators only)."""
        with self._cond:
            settings = self._settings
            return {
                "state": self._state_locked(),
                "loaded": None if self._current is None else self._current.describe(),
                "loading": self._loading,
                "last_error": self._last_error,
                "last_pointer_check": self._last_check,
                "load_mode": settings.load_mode if settings else None,
                "reload": settings.reload if settings else None,
                "poll_seconds": settings.poll_seconds if settings else None,
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
        """Resolve the pointer and load its version (runs in its own thread)."""
        try:
            store = self.store
            pointer = store.read_pointer()
            with self._cond:
                self._last_check = utc_now()
            if pointer is None:
                self._finish_empty()
                return
            with self._cond:
                if self._current is not None and self._current.revision == pointer.revision:
                    self._pointer_etag = pointer.etag  # touched, same revision
                    self._loading = None
                    self._cond.notify_all()
                    return
                self._loading = pointer.revision
            if self.settings.reload == "replace":
                self._release_current()
            loaded = self._loader(store, pointer.revision, self.settings)
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
            self._cond.notify_all()
        if previous is not None:
            log.info("Now serving %s (was %s)", loaded.revision, previous.revision)
            del previous
            gc.collect()

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
        etag = self.store.pointer_etag()
        with self._cond:
            self._last_check = utc_now()
            changed = etag is not None and etag != self._pointer_etag
            due = self._current is None and self._last_error is not None
            if (changed or due) and self._loading is None:
                log.info("current.json changed (or a retry is due); loading in the background")
                self._begin_load_locked()

    def close(self) -> None:
        """Stop the poller (tests; the worker process just exits)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
