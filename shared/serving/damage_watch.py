"""Watching a damaged current version until it verifies again (after a repair), without a second
model in memory: its files are re-hashed as they stream, with a backoff that doubles up to a cap."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from ..errors import QAError

log = logging.getLogger(__name__)


def utc_in(seconds: float) -> str:
    """The UTC time ``seconds`` from now, ISO 8601 to the second."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat(timespec="seconds")


class DamageWatch:
    """A background check of one damaged revision.

    Args:
        verify: re-hashes the revision; returns the problems found (empty: it verifies).
        still_wanted: whether the revision is still the damaged current one (else the watch ends).
        on_next_check: told when the next check is due (ISO time), for ``/api/model``.
        on_problem: told the first problem of a check that failed again.
        on_repaired: called once when the revision verifies again.
        first_delay, max_delay: seconds before the first check, and the cap of the doubling backoff.
        stop: set to end the watch (the holder closing).
    """

    def __init__(
        self,
        *,
        verify: Callable[[], list[str]],
        still_wanted: Callable[[], bool],
        on_next_check: Callable[[str], None],
        on_problem: Callable[[str], None],
        on_repaired: Callable[[], None],
        first_delay: float,
        max_delay: float,
        stop: threading.Event,
    ) -> None:
        self._verify = verify
        self._still_wanted = still_wanted
        self._on_next_check = on_next_check
        self._on_problem = on_problem
        self._on_repaired = on_repaired
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._stop = stop
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, name: str = "model-damage-check") -> None:
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Check until the revision verifies, is no longer wanted, or the watch is stopped."""
        delay = self._first_delay
        while self._still_wanted():
            self._on_next_check(utc_in(delay))
            if self._stop.wait(delay):
                return
            if not self._still_wanted():
                return
            try:
                problems = self._verify()  # streamed: no second model in memory
            except QAError as err:
                problems = [err.message]
            if not problems:
                self._on_repaired()
                return
            delay = min(self._max_delay, delay * 2)
            log.warning("The current version still fails verification (%s); next check in %.0fs", problems[0], delay)
            self._on_problem(problems[0])
