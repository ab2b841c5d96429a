"""The writers' lock of one model: a lease on ``refresh.lock``, renewed in the background while a
refresh (or a repair, a rollback's retention) writes."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError
from azure.storage.blob import BlobClient, BlobLeaseClient

from ..errors import RefreshAlreadyRunningError, StorageUnavailableError
from .storage import storage_errors

log = logging.getLogger(__name__)


class RefreshLock:
    """The writers' lock: a lease on ``refresh.lock``, renewed in the background.

    Use as a context manager; a second writer gets :class:`RefreshAlreadyRunningError`.
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
                raise RefreshAlreadyRunningError(
                    "A refresh is already running for this model (refresh.lock is leased); "
                    "wait for it to finish, then look at GET /api/model"
                ) from err
            with storage_errors("leasing refresh.lock"):
                raise
        self._thread = threading.Thread(target=self._renew, name="refresh-lock", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self._renew_every):
            try:
                assert self._lease is not None
                self._lease.renew()
            except Exception:
                log.warning("Could not renew the lease on refresh.lock", exc_info=True)
                self.lost.set()

    def check(self) -> None:
        """Raise if the lease could not be renewed (another writer may take over)."""
        if self.lost.is_set():
            raise StorageUnavailableError("Lost the lease on refresh.lock; the work was stopped")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lease is not None:
            try:
                self._lease.release()
            except Exception:  # noqa: BLE001 - it expires by itself within its duration
                log.warning("Could not release the lease on refresh.lock; it expires in %ss", self._duration)
