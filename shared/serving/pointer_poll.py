"""The hot-reload poller: every ``MODEL_POLL_SECONDS`` it asks the holder to check ``current.json``
(a HEAD of its ETag, and of a damaged artifact's record) and to load what changed, off the request path."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class PointerPoller:
    """Calls ``check`` every ``interval`` seconds until ``stop`` is set; outlives storage outages."""

    def __init__(self, check: Callable[[], None], *, interval: float, stop: threading.Event) -> None:
        self._check = check
        self._interval = interval
        self._stop = stop
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="model-pointer-poll", daemon=True)
        self._thread.start()

    def run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._check()
            except Exception as err:  # noqa: BLE001 - the poller must outlive storage outages
                log.warning("Pointer check failed (%s: %s); will retry", type(err).__name__, getattr(err, "message", err))

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout)
