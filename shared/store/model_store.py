"""Versioned, verified model versions in one Blob container.

Layout (docs/architecture.md, docs/storage.md)::

    {model_id}/versions/{revision}/{file}      the files; each blob's metadata keeps its sha256
    {model_id}/versions/{revision}/manifest.json  written last: without it a version is incomplete
    {model_id}/versions/{revision}/onnx/{variant}/...  serving artifacts (shared.loading.onnx_artifacts), not in the manifest
    {model_id}/current.json                    the pointer, replaced with If-Match on its ETag
    {model_id}/refresh.lock                    leased by the one writer at work
    {model_id}/last-refresh.json               outcome of the last refresh
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobClient, ContainerClient

from ..errors import (
    IntegrityError,
    NotFoundError,
    PreconditionFailedError,
    StorageUnavailableError,
)
from ..settings import Settings
from .lease import RefreshLock
from .model_files import FileEntry, Manifest, Pointer, check_file_name, check_revision, utc_now
from .storage import container_client, storage_errors
from .transfer import BlobChangedError, Progress, _noop, download_ranges, upload_blocks

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "current.json"
LOCK = "refresh.lock"
LAST_REFRESH = "last-refresh.json"
INCOMPLETE_GRACE = dt.timedelta(days=1)
CHANGED_RETRIES = 2
MIN_LEASE_SECONDS, MAX_LEASE_SECONDS = 15, 60  # what Blob Storage accepts for a fixed-duration lease


@dataclass(frozen=True)
class VersionInfo:
    """A version found in the container: complete when its manifest exists."""

    revision: str
    complete: bool
    files: int
    bytes: int
    last_modified: dt.datetime
    folder_blobs: tuple[str, ...] = ()  # blobs in sub-folders of the version (derived files: artifacts), relative paths


class ModelStore:
    """Versions of one model in one container.

    Args:
        container: the model container.
        model_id: the Hub id; it is the prefix of every blob.
        block_size: bytes per staged block or downloaded range.
        concurrency: blocks or ranges in flight at once.
        lease_seconds: duration of the writers' lease on ``refresh.lock`` (Azure allows 15 to 60),
            renewed every quarter of it: how long a writer that died (process killed, storage gone
            before it could release) keeps the next refresh out.
    """

    def __init__(
        self, container: ContainerClient, model_id: str, *, block_size: int = 8 << 20, concurrency: int = 4, lease_seconds: int = 60
    ) -> None:
        if not MIN_LEASE_SECONDS <= lease_seconds <= MAX_LEASE_SECONDS:
            raise ValueError(f"lease_seconds must be {MIN_LEASE_SECONDS} to {MAX_LEASE_SECONDS} (a Blob lease), got {lease_seconds}")
        self.container = container
        self.model_id = model_id
        self.block_size = block_size
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds

    @classmethod
    def from_settings(cls, settings: Settings, *, serving: bool = False, model_id: str | None = None) -> ModelStore:
        """The store the settings describe (``serving``: short timeouts, few retries)."""
        client = container_client(settings.require_storage(), settings.container, serving=serving)
        return cls(
            client,
            model_id or settings.model_id,
            block_size=settings.block_size,
            concurrency=settings.transfer_concurrency,
        )

    # --- names -----------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join((self.model_id, *parts))

    def version_prefix(self, revision: str) -> str:
        return self._path("versions", check_revision(revision)) + "/"

    def file_blob(self, revision: str, name: str) -> BlobClient:
        return self.container.get_blob_client(self.version_prefix(revision) + check_file_name(name))

    def folder_blob(self, revision: str, folder: str, name: str) -> BlobClient:
        """A blob in a sub-folder of a version (``{folder}/{name}``, each part a checked name): files
        derived from the version, which its manifest does not list (the ONNX artifacts)."""
        parts = [check_file_name(part) for part in folder.split("/")]
        return self.container.get_blob_client(self.version_prefix(revision) + "/".join([*parts, check_file_name(name)]))

    # --- container -------------------------------------------------------------------------

    def ensure_container(self) -> None:
        """Create the container if it does not exist yet."""
        with storage_errors("creating the model container"):
            try:
                self.container.create_container()
            except ResourceExistsError:
                pass

    # --- small JSON blobs ------------------------------------------------------------------

    def _read_json_blob(self, name: str) -> tuple[bytes, str] | None:
        blob = self.container.get_blob_client(name)
        with storage_errors(f"reading {name.rsplit('/', 1)[-1]}"):
            try:
                downloader = blob.download_blob()
            except ResourceNotFoundError:
                return None
            # small JSON documents (a few KB); model files are never read this way
            return downloader.readall(), downloader.properties.etag

    def read_pointer(self) -> Pointer | None:
        """``current.json`` with its ETag, or ``None`` when no version was published yet."""
        found = self._read_json_blob(self._path(POINTER))
        return None if found is None else Pointer.from_json(found[0], etag=found[1])

    def pointer_etag(self) -> str | None:
        """The pointer's ETag only (a cheap HEAD), for hot-reload polling."""
        with storage_errors("checking current.json"):
            try:
                return str(self.container.get_blob_client(self._path(POINTER)).get_blob_properties().etag)
            except ResourceNotFoundError:
                return None

    def write_pointer(self, pointer: Pointer, *, replacing: Pointer | None) -> Pointer:
        """Write ``current.json``: If-None-Match * the first time, If-Match on ``replacing.etag`` after.

        Raises:
            PreconditionFailedError: someone else changed (or created) the pointer meanwhile.
        """
        blob = self.container.get_blob_client(self._path(POINTER))
        try:
            with storage_errors("writing current.json"):
                if replacing is None:
                    result = blob.upload_blob(pointer.to_json(), overwrite=False)
                else:
                    result = blob.upload_blob(
                        pointer.to_json(), overwrite=True, etag=replacing.etag, match_condition=MatchConditions.IfNotModified
                    )
        except StorageUnavailableError as err:
            cause = err.__cause__
            if isinstance(cause, (ResourceExistsError, ResourceModifiedError)) or (
                isinstance(cause, HttpResponseError) and cause.status_code in (409, 412)
            ):
                raise PreconditionFailedError("current.json changed while this writer worked; nothing was overwritten") from cause
            raise
        log.info("Pointer of %s now at %s (pinned=%s)", self.model_id, pointer.revision, pointer.pinned)
        return Pointer(
            model_id=pointer.model_id,
            revision=pointer.revision,
            previous=pointer.previous,
            pinned=pointer.pinned,
            updated_at=pointer.updated_at,
            etag=str(result["etag"]),
        )

    def read_manifest(self, revision: str) -> Manifest | None:
        """The manifest of ``revision``, or ``None`` when the version is absent or incomplete."""
        found = self._read_json_blob(self.version_prefix(revision) + MANIFEST)
        return None if found is None else Manifest.from_json(found[0], revision=revision)

    def require_manifest(self, revision: str) -> Manifest:
        manifest = self.read_manifest(revision)
        if manifest is None:
            raise NotFoundError(f"Version {revision} of {self.model_id} is not a complete version in this container")
        return manifest

    def write_manifest(self, manifest: Manifest) -> None:
        """Write ``manifest.json`` with If-None-Match *: a complete version never changes."""
        blob = self.file_blob(manifest.revision, MANIFEST)
        try:
            with storage_errors("writing manifest.json"):
                blob.upload_blob(manifest.to_json(), overwrite=False)
        except StorageUnavailableError as err:
            if isinstance(err.__cause__, ResourceExistsError):
                raise IntegrityError(f"Version {manifest.revision} already has a manifest; versions are immutable") from err
            raise

    def read_last_refresh(self) -> dict[str, Any] | None:
        found = self._read_json_blob(self._path(LAST_REFRESH))
        if found is None:
            return None
        try:
            data = json.loads(found[0])
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def write_last_refresh(self, record: dict[str, Any]) -> None:
        with storage_errors("writing last-refresh.json"):
            self.container.get_blob_client(self._path(LAST_REFRESH)).upload_blob(json.dumps(record, indent=2).encode(), overwrite=True)

    # --- versions --------------------------------------------------------------------------

    def list_versions(self) -> list[VersionInfo]:
        """Every version under this model, complete or not, newest first."""
        prefix = self._path("versions") + "/"
        found: dict[str, dict[str, Any]] = {}
        with storage_errors("listing versions"):
            try:
                blobs = list(self.container.list_blobs(name_starts_with=prefix))
            except ResourceNotFoundError:  # no container yet: nothing isolated
                return []
            for blob in blobs:
                rest = blob.name[len(prefix) :]
                revision, _, name = rest.partition("/")
                entry = found.setdefault(
                    revision, {"files": 0, "bytes": 0, "complete": False, "modified": blob.last_modified, "folder_blobs": []}
                )
                entry["modified"] = max(entry["modified"], blob.last_modified)
                if name == MANIFEST:
                    entry["complete"] = True
                elif "/" in name:  # derived files (artifacts), counted apart from the model's files
                    entry["folder_blobs"].append(name)
                else:
                    entry["files"] += 1
                    entry["bytes"] += blob.size
        versions = [
            VersionInfo(
                revision=r,
                complete=e["complete"],
                files=e["files"],
                bytes=e["bytes"],
                last_modified=e["modified"],
                folder_blobs=tuple(sorted(e["folder_blobs"])),
            )
            for r, e in found.items()
        ]
        return sorted(versions, key=lambda v: v.last_modified, reverse=True)

    def complete_revisions(self) -> list[str]:
        return [v.revision for v in self.list_versions() if v.complete]

    def delete_version(self, revision: str) -> int:
        """Delete every blob of ``revision`` (manifest first, so it never looks complete half-deleted)."""
        prefix = self.version_prefix(revision)
        with storage_errors(f"deleting version {revision}"):
            names = [b.name for b in self.container.list_blobs(name_starts_with=prefix)]
            names.sort(key=lambda n: n != prefix + MANIFEST)
            for name in names:
                try:
                    self.container.delete_blob(name)
                except ResourceNotFoundError:
                    pass
        log.info("Deleted version %s of %s (%d blobs)", revision, self.model_id, len(names))
        return len(names)

    # --- files -----------------------------------------------------------------------------

    def stored_file_matches(self, revision: str, entry: FileEntry) -> bool:
        """Whether ``entry`` is already stored with its size and sha256 (for resume)."""
        with storage_errors(f"checking {entry.name}"):
            try:
                props = self.file_blob(revision, entry.name).get_blob_properties()
            except ResourceNotFoundError:
                return False
        return props.size == entry.size and (props.metadata or {}).get("sha256") == entry.sha256

    def upload_file(self, revision: str, entry: FileEntry, chunks: Iterable[bytes], *, progress: Progress = _noop) -> int:
        """Stream ``chunks`` into the blob of ``entry``, committed only if size and sha256 match."""
        return upload_blocks(
            self.file_blob(revision, entry.name),
            chunks,
            name=entry.name,
            expected_size=entry.size,
            expected_sha256=entry.sha256,
            block_size=self.block_size,
            concurrency=self.concurrency,
            progress=progress,
        )

    def upload_folder_file(self, revision: str, folder: str, entry: FileEntry, data: bytes | bytearray) -> int:
        """Store one derived file (in memory) under ``folder`` of a version (:meth:`folder_blob`),
        committed only if size and sha256 match."""
        view = memoryview(data)
        return upload_blocks(
            self.folder_blob(revision, folder, entry.name),
            (bytes(view[i : i + self.block_size]) for i in range(0, len(view), self.block_size)),  # block-sized copies
            name=f"{folder}/{entry.name}",
            expected_size=entry.size,
            expected_sha256=entry.sha256,
            block_size=self.block_size,
            concurrency=self.concurrency,
        )

    def _fetch(
        self,
        revision: str,
        entry: FileEntry,
        *,
        into: memoryview | None = None,
        sink: Callable[[memoryview], object] | None = None,
        restart: Callable[[], object] | None = None,
        progress: Progress = _noop,
        blob: BlobClient | None = None,
    ) -> None:
        """Stream one stored file into a buffer or a sink, sha256 checked in order; errors name the version.

        A blob rewritten meanwhile (a concurrent repair changes its ETag) is read again from the
        start, up to :data:`CHANGED_RETRIES` times; ``restart`` rewinds the sink first.
        """
        for attempt in range(CHANGED_RETRIES + 1):
            try:
                download_ranges(
                    blob or self.file_blob(revision, entry.name),
                    name=entry.name,
                    size=entry.size,
                    expected_sha256=entry.sha256,
                    block_size=self.block_size,
                    concurrency=self.concurrency,
                    into=into,
                    sink=sink,
                    progress=progress,
                )
                return
            except BlobChangedError as err:
                if attempt == CHANGED_RETRIES:
                    raise IntegrityError(f"Version {revision}: {err.message} {attempt + 1} times; try again later") from err
                log.info("Version %s: %s changed while it was read; reading it again", revision, entry.name)
                if restart is not None:
                    restart()
            except IntegrityError as err:
                raise IntegrityError(f"Version {revision}: {err.message}") from err

    def read_file(
        self, revision: str, entry: FileEntry, *, progress: Progress = _noop, blob: BlobClient | None = None
    ) -> bytearray:
        """The bytes of one file (or of ``blob``, an artifact's) in memory, sha256 checked while they stream in.

        Raises:
            IntegrityError: size or sha256 mismatch, naming the file and the version.
        """
        buffer = bytearray(entry.size)
        self._fetch(revision, entry, into=memoryview(buffer), progress=progress, blob=blob)
        return buffer

    def stream_file(
        self, revision: str, entry: FileEntry, sink: Callable[[memoryview], object], *, restart: Callable[[], object]
    ) -> None:
        """Feed one file's bytes, in order, to ``sink``; sha256 is checked once all have flowed (a
        mismatch raises :class:`IntegrityError` after the sink saw them: discard what it built).
        ``restart`` is called before the file is read again (it changed meanwhile)."""
        self._fetch(revision, entry, sink=sink, restart=restart)

    def download_file(self, revision: str, entry: FileEntry, dest_dir: Path, *, progress: Progress = _noop) -> Path:
        """Stream one file to ``dest_dir/name`` through a temp name; verified before the rename."""
        final = dest_dir / check_file_name(entry.name)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".part", dir=dest_dir)
        try:
            with os.fdopen(fd, "wb") as out:

                def rewind() -> None:
                    out.seek(0)
                    out.truncate()

                self._fetch(revision, entry, sink=out.write, restart=rewind, progress=progress)
            os.replace(tmp_name, final)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        return final

    def download_version(self, revision: str, dest_dir: Path | str, *, progress: Progress = _noop) -> Manifest:
        """Download a complete version into ``dest_dir``, every file verified; returns its manifest."""
        manifest = self.require_manifest(revision)
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for entry in manifest.files:
            self.download_file(revision, entry, dest, progress=progress)
        return manifest

    def verify_version(self, revision: str, *, progress: Progress = _noop) -> list[str]:
        """Re-hash every stored file of ``revision`` against its manifest.

        Returns:
            One message per bad file (empty when the version is intact).
        """
        manifest = self.require_manifest(revision)
        found = (self.file_problem(revision, entry, progress=progress) for entry in manifest.files)
        return [problem for problem in found if problem is not None]

    def file_problem(self, revision: str, entry: FileEntry, *, progress: Progress = _noop, blob: BlobClient | None = None) -> str | None:
        """Re-hash one stored file (or ``blob``, an artifact's) as it streams (nothing kept in memory);
        what is wrong with it, or ``None``."""
        try:
            self._fetch(revision, entry, sink=lambda _view: None, progress=progress, blob=blob)
        except IntegrityError as err:
            return err.message
        except NotFoundError:
            return f"Version {revision}: {entry.name} is missing from storage"
        return None

    # --- writers ---------------------------------------------------------------------------

    def lock(self) -> RefreshLock:
        """The writers' lock (a context manager), leased for :attr:`lease_seconds`."""
        return RefreshLock(
            self.container.get_blob_client(self._path(LOCK)), duration=self.lease_seconds, renew_every=self.lease_seconds / 4
        )

    def publish(self, manifest: Manifest, *, pinned: bool) -> Pointer:
        """Write the manifest (if absent) and move the pointer to the version. Call under :meth:`lock`."""
        if self.read_manifest(manifest.revision) is None:
            self.write_manifest(manifest)
        return self.move_pointer(manifest.revision, pinned=pinned)

    def move_pointer(self, revision: str, *, pinned: bool) -> Pointer:
        """Point ``current.json`` at the complete version ``revision``. Call under :meth:`lock`."""
        self.require_manifest(revision)
        current = self.read_pointer()
        if current is None:
            return self.write_pointer(Pointer(model_id=self.model_id, revision=revision, pinned=pinned), replacing=None)
        return self.write_pointer(current.moved_to(revision, pinned=pinned), replacing=current)

    def publication_order(self) -> list[Manifest]:
        """The complete versions' manifests, newest isolation first."""
        manifests = [m for m in (self.read_manifest(r) for r in self.complete_revisions()) if m is not None]
        return sorted(manifests, key=lambda m: _isolated_at(m.isolated_at), reverse=True)

    def rollback(self, to: str | None = None) -> Pointer:
        """Point back at ``to``, or at the complete version isolated just before the current one, and pin it.

        Repeated rollbacks walk back in publication order (v3 -> v2 -> v1), never flip between two.

        Raises:
            RefreshAlreadyRunningError: a refresh holds the lock.
            NotFoundError: nothing isolated yet, ``to`` is not a complete version, or there is
                no earlier complete version.
        """
        if self.read_pointer() is None:  # before the lock: an empty store (no container) stays untouched
            raise NotFoundError("Nothing has been isolated yet: there is nothing to roll back")
        with self.lock():
            current = self.read_pointer()
            if current is None:
                raise NotFoundError("Nothing has been isolated yet: there is nothing to roll back")
            order = [m.revision for m in self.publication_order()]
            if to is None:
                earlier = order[order.index(current.revision) + 1 :] if current.revision in order else order
                if not earlier:
                    raise NotFoundError(f"There is no complete version isolated before {current.revision}: nothing earlier to roll back to")
                target = earlier[0]
            else:
                target = check_revision_arg(to)
                if target not in order:
                    raise NotFoundError(f"Version {target} is not a complete version of {self.model_id}")
            pointer = self.write_pointer(current.moved_to(target, pinned=True), replacing=current)
        log.info("Rolled %s back from %s to %s", self.model_id, current.revision, target)
        return pointer

    def apply_retention(self, keep: int, *, now: dt.datetime | None = None) -> list[str]:
        """Delete old versions: keep the newest ``keep`` complete ones and always the current and
        previous; remove incomplete ones older than a day. Call under :meth:`lock`.

        "Newest" follows the pointer's history (current, then previous ones), which is exact
        where blob times have a resolution of one second; other versions follow by time.

        Returns:
            The deleted revisions.
        """
        now = now or dt.datetime.now(dt.UTC)
        pointer = self.read_pointer()
        history = [] if pointer is None else [pointer.revision, *pointer.previous]
        versions = self.list_versions()
        complete = {v.revision for v in versions if v.complete}
        ranked = [r for r in dict.fromkeys(history) if r in complete]
        ranked += [v.revision for v in versions if v.complete and v.revision not in ranked]
        kept = set(ranked[:keep]) | set(history[:2])
        deleted = []
        for version in versions:
            if version.revision in kept:
                continue
            if not version.complete and now - version.last_modified < INCOMPLETE_GRACE:
                continue
            self.delete_version(version.revision)
            deleted.append(version.revision)
        return deleted

    def status(self, describe_version: Callable[[VersionInfo, Manifest | None], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Pointer, versions and last refresh, as plain JSON-able data (an empty or missing
        container reads as nothing isolated yet: ``pointer`` is ``None``). ``describe_version``
        adds fields to each version's entry, given its manifest (``None`` while incomplete): the
        artifacts code lists its artifacts so."""
        pointer = self.read_pointer()
        versions = self.list_versions()
        isolated = {v.revision: self.read_manifest(v.revision) for v in versions if v.complete}
        extra = {v.revision: describe_version(v, isolated.get(v.revision)) for v in versions} if describe_version else {}
        return {
            "model_id": self.model_id,
            "container": self.container.container_name,
            "pointer": None
            if pointer is None
            else {
                "revision": pointer.revision,
                "previous": list(pointer.previous),
                "pinned": pointer.pinned,
                "updated_at": pointer.updated_at,
            },
            "versions": [
                {
                    "revision": v.revision,
                    "complete": v.complete,
                    "files": v.files,
                    "bytes": v.bytes,
                    "last_modified": v.last_modified.isoformat(timespec="seconds"),
                    "isolated_at": manifest.isolated_at if (manifest := isolated.get(v.revision)) else None,
                    **extra.get(v.revision, {}),
                }
                for v in versions
            ],
            "last_refresh": self.read_last_refresh(),
        }


def _isolated_at(value: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def check_revision_arg(revision: str) -> str:
    """Check a revision given by a user (CLI or HTTP), as a 404-able input."""
    try:
        return check_revision(revision.strip())
    except IntegrityError:
        raise NotFoundError(f"{revision!r} is not a stored revision (40 hex characters, or local- and 16 hex)") from None


__all__ = ["ModelStore", "VersionInfo", "check_revision_arg", "utc_now"]
