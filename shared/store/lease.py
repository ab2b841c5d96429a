"""The writers' lock of one model: a lease on ``refresh.lock``, renewed in the background while a
refresh (or a repair, a rollback's retention) writes.

Storage that dies under a writer never costs it more than the failure itself: the renewal thread
logs one line and tells the work to stop at its next check, and the release after a storage
failure makes one quick attempt (the lease lapses by itself within its duration anyway).
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError
from azure.storage.blob import BlobClient, BlobLeaseClient

from ..errors import QAError, RefreshAlreadyRunningError, StorageUnavailableError
from .storage import QUICK, storage_errors

log = logging.getLogger(__name__)

BREAK_LOCK = "python -m shared repair --break-lock"
# a renewal is small: short timeouts, one retry, so that stopping the thread never waits long
_RENEW: dict[str, Any] = {"retry_total": 1, "connection_timeout": 3, "read_timeout": 5}


class RefreshLock:
    """The writers' lock: a lease on ``refresh.lock``, renewed in the background.

    Use as a context manager; a second writer gets :class:`RefreshAlreadyRunningError`. Its content
    is never read: a damaged, emptied or deleted ``refresh.lock`` is as good as a new one.
    """

    def __init__(self, blob: BlobClient, *, duration: int = 60, renew_every: float = 15.0) -> None:
        self._blob = blob
        self._duration = duration
        self._renew_every = renew_every
        self._lease: BlobLeaseClient | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()

    def __enter__(self) -> RefreshLock:
        with storage_errors("creating refresh.lock"):
            try:
                self._blob.upload_blob(b"", overwrite=False)
            except (ResourceExistsError, ResourceModifiedError):
                pass
            except HttpResponseError as err:  # leased and present: someone holds it right now
                if err.status_code not in (409, 412):
                    raise
        try:
            self._lease = self._blob.acquire_lease(lease_duration=self._duration)
        except HttpResponseError as err:
            if err.status_code == 409:
                raise RefreshAlreadyRunningError(self._held_message()) from err
            with storage_errors("leasing refresh.lock"):
                raise
        self._thread = threading.Thread(target=self._renew, name="refresh-lock", daemon=True)
        self._thread.start()
        return self

    def _held_message(self) -> str:
        """Why the lease could not be taken: a writer at work, or a lease nobody will release."""
        running = (
            "A refresh is already running for this model (refresh.lock is leased); wait for it to finish, then look at "
            "GET /api/model or python -m shared status"
        )
        try:
            with storage_errors("checking refresh.lock"):
                duration = self._blob.get_blob_properties(**QUICK).lease.duration
        except QAError:
            return running
        if duration == "infinite":
            return (
                "refresh.lock holds an infinite lease, which this app never takes (its leases last at most 60 s and are "
                f"renewed): someone took it by hand. If no refresh is running, break it: {BREAK_LOCK}"
            )
        return running + f" (a writer that died leaves a lease that lapses within {self._duration} s)"

    def _renew(self) -> None:
        while not self._stop.wait(self._renew_every):
            try:
                assert self._lease is not None
                self._lease.renew(**_RENEW)
            except Exception as err:  # noqa: BLE001 - any failure means the lease may be gone
                log.warning("Could not renew the lease on refresh.lock (%s); the work stops at its next step", type(err).__name__)
                self.lost.set()
                return

    def check(self) -> None:
        """Raise if the lease could not be renewed (another writer may take over)."""
        if self.lost.is_set():
            raise StorageUnavailableError("Lost the lease on refresh.lock (storage stopped answering); the work was stopped")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)  # a renewal under way ends by itself within its short timeouts
        if self._lease is None:
            return
        quick = isinstance(exc, StorageUnavailableError) or self.lost.is_set()
        try:
            self._lease.release(**(QUICK if quick else {}))
        except Exception as err:  # noqa: BLE001 - it expires by itself within its duration
            log.warning("Could not release the lease on refresh.lock (%s); it lapses within %s s", type(err).__name__, self._duration)
