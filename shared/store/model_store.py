"""Versioned, verified model versions in one Blob container.

Layout (docs/architecture.md, docs/storage.md)::

    {model_id}/versions/{revision}/{file}      the files; each blob's metadata keeps its sha256
    {model_id}/versions/{revision}/manifest.json  written last: without it a version is incomplete
    {model_id}/versions/{revision}/onnx/{variant}/...  serving artifacts (shared.loading.onnx_artifacts), not in the manifest
    {model_id}/current.json                    the pointer, replaced with If-Match on its ETag
    {model_id}/pointer-history/{time}.json     every value the pointer took, newest last: its way back
    {model_id}/refresh.lock                    leased by the one writer at work
    {model_id}/last-refresh.json               outcome of the last refresh

Every JSON record is sealed with a checksum of its own content (:mod:`shared.store.records`). A
damaged record damages what it describes and nothing else: a damaged manifest, its version; a
damaged or missing ``current.json``, only the pointer, whose last value the history keeps
(:meth:`ModelStore.read_pointer_state`); a damaged ``last-refresh.json``, only the last outcome.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobClient, ContainerClient

from ..errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    PreconditionFailedError,
    QAError,
    RecordDamagedError,
    StorageUnavailableError,
)
from ..settings import Settings
from .lease import RefreshLock
from .model_files import POINTER_REPAIR, FileEntry, Manifest, Pointer, check_file_name, check_revision, utc_now, version_repair
from .records import seal, unseal
from .status import ArtifactListing, LastRefresh, PointerStatus, RecordDamage, StoreStatus, VersionStatus, is_refresh_record
from .storage import QUICK, container_client, storage_errors
from .transfer import BlobChangedError, PlacedUpload, Progress, _noop, download_ranges, upload_blocks

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "current.json"
LOCK = "refresh.lock"
LAST_REFRESH = "last-refresh.json"
LAST_REFRESH_REPAIR = "python -m shared repair (removes it), or nothing: the next refresh writes it anew"
POINTER_HISTORY = "pointer-history"
HISTORY_KEEP = 50
# where an adopted container's files came from, kept in the manifest blob's metadata too, so that the
# repair of a damaged manifest can name the --container and --prefix to adopt again
ADOPTED_FACTS = ("account", "container", "prefix")
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


@dataclass(frozen=True)
class PointerState:
    """``current.json`` as found.

    ``pointer``: the intact pointer (``None`` when it is damaged or missing). ``etag``: the blob's
    ETag as found, damaged or not, for the If-Match of its rewrite. ``damage``: why it cannot be
    trusted (also set when it is missing while versions are stored). ``history``: then, the newest
    intact value the pointer's history recorded.
    """

    pointer: Pointer | None = None
    etag: str | None = None
    damage: RecordDamage | None = None
    history: Pointer | None = None

    @property
    def effective(self) -> Pointer | None:
        """The pointer to go by: current.json when intact, else its last recorded value."""
        return self.pointer or self.history

    @property
    def empty(self) -> bool:
        """No pointer was ever written: no current.json and no history of one (nothing damaged)."""
        return self.pointer is None and self.damage is None


# a version's artifacts and their damage, given the version and its manifest (None: incomplete or damaged)
DescribeVersion = Callable[[VersionInfo, Manifest | None], tuple[dict[str, ArtifactListing], list[RecordDamage]]]


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
    def from_settings(
        cls, settings: Settings, *, serving: bool = False, profile: str | None = None, model_id: str | None = None
    ) -> ModelStore:
        """The store the settings describe, with a storage ``profile`` (``serving``: short timeouts, few
        retries, also given as ``serving=True``; ``command``: a terminal's; default ``worker``: patient)."""
        client = container_client(settings.require_storage(), settings.container, profile=profile or ("serving" if serving else "worker"))
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

    # --- small JSON records ----------------------------------------------------------------

    def _read_record(self, name: str, *, fast: bool = False) -> tuple[bytes, str, dict[str, str]] | None:
        """A small JSON record's bytes, ETag and metadata, or ``None`` when the blob is absent."""
        blob = self.container.get_blob_client(name)
        with storage_errors(f"reading {name.rsplit('/', 1)[-1]}"):
            try:
                downloader = blob.download_blob(**(QUICK if fast else {}))
            except ResourceNotFoundError:
                return None
            # small JSON documents (a few KB); model files are never read this way
            return downloader.readall(), str(downloader.properties.etag), dict(downloader.properties.metadata or {})

    def read_pointer_state(self) -> PointerState:
        """``current.json`` as it is: intact, damaged or missing, with the pointer's last recorded
        value from its history when it cannot be trusted (see :class:`PointerState`)."""
        found = self._read_record(self._path(POINTER))
        damage = None
        if found is not None:
            raw, etag, _ = found
            try:
                return PointerState(pointer=Pointer.from_json(raw, etag=etag), etag=etag)
            except RecordDamagedError as err:
                damage = RecordDamage(POINTER, err.message, err.repair)
                log.warning("current.json of %s is damaged: %s", self.model_id, err.message)
        history = self.pointer_history(limit=1)
        if found is None:
            if not history:
                # never published (a first refresh may have stopped between its manifest and the pointer)
                return PointerState()
            damage = RecordDamage(POINTER, "current.json is missing (its history keeps its last value)", POINTER_REPAIR)
            log.warning("current.json of %s is missing; its history keeps its last value", self.model_id)
        return PointerState(etag=found[1] if found else None, damage=damage, history=history[0] if history else None)

    def read_pointer(self) -> Pointer | None:
        """``current.json`` with its ETag, or ``None`` when it is absent.

        Raises:
            RecordDamagedError: it is damaged (use :meth:`read_pointer_state` to go on without it).
        """
        found = self._read_record(self._path(POINTER))
        return None if found is None else Pointer.from_json(found[0], etag=found[1])

    def pointer_etag(self) -> str | None:
        """The pointer's ETag only (a cheap HEAD), for hot-reload polling."""
        with storage_errors("checking current.json"):
            try:
                return str(self.container.get_blob_client(self._path(POINTER)).get_blob_properties().etag)
            except ResourceNotFoundError:
                return None

    def write_pointer(self, pointer: Pointer, *, replacing: Pointer | None, etag: str | None = None) -> Pointer:
        """Write ``current.json``: If-None-Match * the first time, If-Match on ``replacing.etag``
        (or ``etag``: the ETag of a damaged pointer being rewritten) after; then note the new value
        in the pointer's history.

        Raises:
            PreconditionFailedError: someone else changed (or created) the pointer meanwhile.
        """
        blob = self.container.get_blob_client(self._path(POINTER))
        match = replacing.etag if replacing is not None else etag
        try:
            with storage_errors("writing current.json"):
                if match is None:
                    result = blob.upload_blob(pointer.to_json(), overwrite=False)
                else:
                    result = blob.upload_blob(pointer.to_json(), overwrite=True, etag=match, match_condition=MatchConditions.IfNotModified)
        except StorageUnavailableError as err:
            cause = err.__cause__
            if isinstance(cause, (ResourceExistsError, ResourceModifiedError)) or (
                isinstance(cause, HttpResponseError) and cause.status_code in (409, 412)
            ):
                raise PreconditionFailedError("current.json changed while this writer worked; nothing was overwritten") from cause
            raise
        log.info("Pointer of %s now at %s (pinned=%s)", self.model_id, pointer.revision, pointer.pinned)
        written = replace(pointer, etag=str(result["etag"]))
        self._note_in_history(written)
        return written

    def _note_in_history(self, pointer: Pointer) -> None:
        """Keep the pointer's new value in its history (newest :data:`HISTORY_KEEP` entries). Best
        effort: current.json is already written, and a missed entry only makes the way back one
        step shorter."""
        name = self._path(POINTER_HISTORY, f"{_history_stamp()}.json")
        try:
            with storage_errors("writing the pointer's history"):
                self.container.get_blob_client(name).upload_blob(pointer.to_json(), overwrite=False)
                names = sorted(b.name for b in self.container.list_blobs(name_starts_with=self._path(POINTER_HISTORY) + "/"))
                for old in names[:-HISTORY_KEEP]:
                    self.container.delete_blob(old)
        except (QAError, ResourceNotFoundError, ResourceExistsError) as err:
            log.warning("Could not note the pointer's new value in its history: %s", getattr(err, "message", type(err).__name__))

    def pointer_history(self, *, limit: int = HISTORY_KEEP) -> list[Pointer]:
        """The pointer's recorded values, newest first, damaged entries skipped (``limit``: at most)."""
        prefix = self._path(POINTER_HISTORY) + "/"
        with storage_errors("listing the pointer's history"):
            try:
                names = sorted((b.name for b in self.container.list_blobs(name_starts_with=prefix)), reverse=True)
            except ResourceNotFoundError:
                return []
        found: list[Pointer] = []
        for name in names:
            record = self._read_record(name)
            if record is None:
                continue
            try:
                found.append(Pointer.from_json(record[0], etag=None, record=f"the pointer's history entry {name.rsplit('/', 1)[-1]}"))
            except RecordDamagedError as err:
                log.warning("Skipping a damaged entry of the pointer's history: %s", err.message)
                continue
            if len(found) >= limit:
                break
        return found

    def read_manifest(self, revision: str) -> Manifest | None:
        """The manifest of ``revision``, or ``None`` when the version is absent or incomplete.

        Raises:
            RecordDamagedError: the manifest is damaged; the message names the version and how to
                rewrite it from its source.
        """
        manifest, damage = self.manifest_state(revision)
        if damage is not None:
            raise RecordDamagedError(damage.message, record=damage.record, repair=damage.repair)
        return manifest

    def manifest_state(self, revision: str) -> tuple[Manifest | None, RecordDamage | None]:
        """The manifest of ``revision`` and ``None``, or ``None`` and what is wrong with it (or
        ``(None, None)``: no manifest, an incomplete or absent version)."""
        found = self._read_record(self.version_prefix(revision) + MANIFEST)
        if found is None:
            return None, None
        raw, _, metadata = found
        adopted: dict[str, Any] = {key: metadata[key] for key in ADOPTED_FACTS if key in metadata}
        repair = version_repair(
            revision, metadata.get("source"), metadata.get("source_revision"), model_id=self.model_id, provenance=adopted
        )
        try:
            return Manifest.from_json(raw, revision=revision, repair=repair), None
        except RecordDamagedError as err:
            log.warning("manifest.json of version %s of %s is damaged: %s", revision, self.model_id, err.message)
            return None, RecordDamage(err.record, err.message, err.repair)

    def require_manifest(self, revision: str) -> Manifest:
        manifest = self.read_manifest(revision)
        if manifest is None:
            raise NotFoundError(
                f"Version {revision} of {self.model_id} is not a complete version in this container (python -m shared status lists them)"
            )
        return manifest

    def write_manifest(self, manifest: Manifest, *, replacing_etag: str | None = None) -> None:
        """Write ``manifest.json`` with If-None-Match *: a complete version never changes; except a
        damaged manifest, rewritten from the version's source with If-Match on the damaged blob's
        ``replacing_etag``. A few facts go into the blob's metadata too, so that the repair of a
        damaged manifest can still be named."""
        blob = self.file_blob(manifest.revision, MANIFEST)
        facts = {"source": manifest.source, "source_revision": manifest.source_revision or "", "isolated_at": manifest.isolated_at}
        facts.update({key: str(manifest.provenance[key]) for key in ADOPTED_FACTS if manifest.provenance.get(key)})
        metadata = {key: value for key, value in facts.items() if value and value.isascii() and "\n" not in value}
        try:
            with storage_errors("writing manifest.json"):
                if replacing_etag is None:
                    blob.upload_blob(manifest.to_json(), overwrite=False, metadata=metadata)
                else:
                    blob.upload_blob(
                        manifest.to_json(),
                        overwrite=True,
                        metadata=metadata,
                        etag=replacing_etag,
                        match_condition=MatchConditions.IfNotModified,
                    )
        except StorageUnavailableError as err:
            if isinstance(err.__cause__, ResourceExistsError):
                raise IntegrityError(f"Version {manifest.revision} already has a manifest; versions are immutable") from err
            if isinstance(err.__cause__, ResourceModifiedError):
                raise PreconditionFailedError(
                    f"manifest.json of {manifest.revision} changed while it was repaired; nothing was overwritten"
                ) from err
            raise

    def manifest_facts(self, revision: str) -> dict[str, str]:
        """What the metadata of a version's ``manifest.json`` keeps (source, source revision, isolation
        time; an adopted container's account, container and prefix): readable when its content is
        damaged. Empty when absent, or written by an older app."""
        with storage_errors("checking manifest.json"):
            try:
                return dict(self.file_blob(revision, MANIFEST).get_blob_properties().metadata or {})
            except ResourceNotFoundError:
                return {}

    def manifest_etag(self, revision: str) -> str | None:
        """The ETag of a version's ``manifest.json`` (a HEAD), ``None`` when there is none."""
        with storage_errors("checking manifest.json"):
            try:
                return str(self.file_blob(revision, MANIFEST).get_blob_properties().etag)
            except ResourceNotFoundError:
                return None

    def last_refresh_state(self) -> tuple[dict[str, Any] | None, RecordDamage | None]:
        """``last-refresh.json``'s record, or what is wrong with it (the next refresh rewrites it)."""
        found = self._read_record(self._path(LAST_REFRESH))
        if found is None:
            return None, None
        try:
            record = unseal(found[0], kind="last-refresh", record=LAST_REFRESH, repair=LAST_REFRESH_REPAIR).data
        except RecordDamagedError as err:
            log.warning("last-refresh.json of %s is damaged: %s", self.model_id, err.message)
            return None, RecordDamage(LAST_REFRESH, err.message, err.repair)
        if not is_refresh_record(record):
            return None, RecordDamage(LAST_REFRESH, f"{LAST_REFRESH} is damaged: it is not a refresh record", LAST_REFRESH_REPAIR)
        return record, None

    def read_last_refresh(self) -> dict[str, Any] | None:
        """``last-refresh.json``'s record; ``None`` when there is none or it is damaged."""
        return self.last_refresh_state()[0]

    def write_last_refresh(self, record: dict[str, Any], *, fast: bool = False) -> None:
        """Write ``last-refresh.json`` (sealed); ``fast``: one attempt with short timeouts, for a record
        written after storage already failed (the command must end, not retry for minutes)."""
        with storage_errors("writing last-refresh.json"):
            blob = self.container.get_blob_client(self._path(LAST_REFRESH))
            blob.upload_blob(seal(record, kind="last-refresh"), overwrite=True, **(QUICK if fast else {}))

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

    def placed_upload(self, revision: str, folder: str, name: str) -> PlacedUpload:
        """A derived file of a version (as :meth:`upload_folder_file`) whose bytes come in pieces, in
        any order (:class:`~shared.store.transfer.PlacedUpload`): never held whole in memory."""
        blob = self.folder_blob(revision, folder, name)
        return PlacedUpload(blob, name=f"{folder}/{name}", block_size=self.block_size, concurrency=self.concurrency)

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
                    recorded_in="the manifest" if blob is None else "its artifact record",
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

    def read_file(self, revision: str, entry: FileEntry, *, progress: Progress = _noop, blob: BlobClient | None = None) -> bytearray:
        """The bytes of one file (or of ``blob``, an artifact's) in memory, sha256 checked while they stream in.

        Raises:
            IntegrityError: size or sha256 mismatch, naming the file and the version.
        """
        buffer = bytearray(entry.size)
        self._fetch(revision, entry, into=memoryview(buffer), progress=progress, blob=blob)
        return buffer

    def stream_file(
        self,
        revision: str,
        entry: FileEntry,
        sink: Callable[[memoryview], object],
        *,
        restart: Callable[[], object],
        blob: BlobClient | None = None,
    ) -> None:
        """Feed one file's bytes (or ``blob``'s, an artifact's), in order, to ``sink``; sha256 is
        checked once all have flowed (a mismatch raises :class:`IntegrityError` after the sink saw
        them: discard what it built). ``restart`` is called before the file is read again (it
        changed meanwhile)."""
        self._fetch(revision, entry, sink=sink, restart=restart, blob=blob)

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
        """Point ``current.json`` at the complete version ``revision``. Call under :meth:`lock`.

        A damaged or missing ``current.json`` is replaced, its history continued from its last
        recorded value."""
        self.require_manifest(revision)
        state = self.read_pointer_state()
        base = state.effective
        pointer = (
            Pointer(model_id=self.model_id, revision=revision, pinned=pinned) if base is None else base.moved_to(revision, pinned=pinned)
        )
        return self.write_pointer(pointer, replacing=state.pointer, etag=state.etag)

    def intact_versions(self) -> list[Manifest]:
        """The manifests of the complete versions whose manifest is intact, newest isolation first."""
        manifests = [m for m in (self.manifest_state(r)[0] for r in self.complete_revisions()) if m is not None]
        return sorted(manifests, key=lambda m: _isolated_at(m.isolated_at), reverse=True)

    def publication_order(self) -> list[Manifest]:
        """The intact complete versions' manifests, newest isolation first (damaged ones skipped)."""
        return self.intact_versions()

    def serving_order(self, state: PointerState) -> list[str]:
        """The revisions serving may load, best first: the pointer's own (or, when it is damaged or
        missing, its last recorded value), then the earlier values of its history, newest first, then
        any other intact complete version, newest isolation first. Versions that passed their canary
        come before those published with ``--skip-canary``."""
        intact = self.intact_versions()
        by_revision = {m.revision: m for m in intact}
        base = state.effective
        history = [] if base is None else [base.revision, *base.previous]
        order = [r for r in dict.fromkeys(history) if r in by_revision]
        order += [m.revision for m in intact if m.revision not in order]
        return sorted(order, key=lambda r: by_revision[r].canary == "skipped")  # stable: keeps the order within each tier

    def rollback(self, to: str | None = None) -> Pointer:
        """Point back at ``to``, or at the complete version isolated just before the current one, and pin it.

        Repeated rollbacks walk back in publication order (v3 -> v2 -> v1), never flip between two.
        A damaged or missing ``current.json`` is rewritten (it is the way to repair it by hand);
        versions whose manifest is damaged are never a target.

        Raises:
            RefreshAlreadyRunningError: a refresh holds the lock.
            NotFoundError: nothing isolated yet, ``to`` is not a complete version, or there is
                no earlier complete version.
            ConflictError: ``to`` is a version whose manifest is damaged (repair it first).
        """
        if self.read_pointer_state().empty:  # before the lock: an empty store (no container) stays untouched
            raise NotFoundError("Nothing has been isolated yet: there is nothing to roll back")
        with self.lock():
            state = self.read_pointer_state()
            base = state.effective
            order = [m.revision for m in self.intact_versions()]
            if to is None:
                if base is None or base.revision not in order:
                    earlier = order if base is None or state.damage is None else [r for r in order if r != base.revision]
                else:
                    earlier = order[order.index(base.revision) + 1 :]
                if not earlier:
                    what = base.revision if base is not None else "the current version"
                    raise NotFoundError(
                        f"There is no intact complete version isolated before {what}: nothing earlier to roll back to "
                        "(python -m shared status lists the versions, and the repair of a damaged one)"
                    )
                target = earlier[0]
            else:
                target = check_revision_arg(to)
                if target not in order:
                    _, damage = self.manifest_state(target)
                    if damage is not None:
                        raise ConflictError(f"Version {target} cannot be made current: {damage.message}; repair it first: {damage.repair}")
                    raise NotFoundError(
                        f"Version {target} is not a complete version of {self.model_id} (python -m shared status lists them)"
                    )
            moved = Pointer(model_id=self.model_id, revision=target, pinned=True) if base is None else base.moved_to(target, pinned=True)
            pointer = self.write_pointer(moved, replacing=state.pointer, etag=state.etag)
        log.info("Rolled %s back from %s to %s", self.model_id, base.revision if base else None, target)
        return pointer

    def repair_pointer(self) -> tuple[Pointer | None, str]:
        """Rewrite a damaged, missing or dangling ``current.json``: its last recorded value (from its
        history) when that version is intact, else the first intact version of :meth:`serving_order`;
        the pin is kept as recorded. Call under :meth:`lock`.

        Returns:
            The pointer now in place (``None``: nothing isolated) and one line saying what was done.
        """
        state = self.read_pointer_state()
        if state.empty:
            return None, "nothing isolated yet: there is no pointer to repair"
        order = self.serving_order(state)
        base = state.effective
        if state.pointer is not None and state.pointer.revision in order:
            return state.pointer, f"current.json is intact and points at the intact version {state.pointer.revision}: nothing to repair"
        if not order:
            raise NotFoundError("No intact complete version is stored: repair a version first (python -m shared verify names how)")
        target = order[0]
        if base is None:
            pointer = Pointer(model_id=self.model_id, revision=target)
        elif base.revision == target:
            pointer = Pointer(model_id=self.model_id, revision=target, previous=base.previous, pinned=base.pinned)
        else:
            pointer = base.moved_to(target, pinned=base.pinned)
        written = self.write_pointer(pointer, replacing=state.pointer, etag=state.etag)
        if state.pointer is None:
            was = "damaged" if state.damage is not None and "missing" not in state.damage.message else "missing"
            how = "its last recorded value" if base is not None and base.revision == target else "the newest intact version"
            return written, f"current.json was {was}: rewritten at {target} ({how}{', pinned' if written.pinned else ''})"
        return written, f"current.json pointed at {state.pointer.revision}, which is not an intact version: now at {target}"

    def repair_last_refresh(self) -> str:
        """Remove a damaged ``last-refresh.json`` (its outcome is lost either way; the next refresh
        writes a new one). Call under :meth:`lock`. Returns one line saying what was done."""
        found = self._read_record(self._path(LAST_REFRESH))
        if found is None or self.last_refresh_state()[1] is None:
            return "last-refresh.json is intact (or absent): nothing to repair"
        with storage_errors("removing the damaged last-refresh.json"):
            try:
                blob = self.container.get_blob_client(self._path(LAST_REFRESH))
                blob.delete_blob(etag=found[1], match_condition=MatchConditions.IfNotModified)
            except (ResourceNotFoundError, ResourceModifiedError):
                return "last-refresh.json changed meanwhile (a refresh wrote it): nothing to repair"
        return "last-refresh.json was damaged: removed (the next refresh writes a new one)"

    def lock_damage(self) -> RecordDamage | None:
        """A lease on ``refresh.lock`` that nobody will release (an infinite one: this app's last at
        most 60 s), which keeps every writer out; ``None`` otherwise (a writer at work is no damage)."""
        with storage_errors("checking refresh.lock"):
            try:
                lease = self.container.get_blob_client(self._path(LOCK)).get_blob_properties().lease
            except ResourceNotFoundError:
                return None
        if lease.state == "leased" and lease.duration == "infinite":
            return RecordDamage(
                LOCK,
                "refresh.lock holds an infinite lease, which this app never takes: no refresh, repair or rollback can run",
                "python -m shared repair --break-lock (once you know no refresh is running)",
            )
        return None

    def break_lock(self) -> str:
        """Break the lease on ``refresh.lock`` (one nobody will release: an infinite lease taken by
        hand). A writer at work then loses its lease and stops at its next step. Returns one line."""
        from azure.storage.blob import BlobLeaseClient

        blob = self.container.get_blob_client(self._path(LOCK))
        with storage_errors("breaking the lease on refresh.lock"):
            try:
                state = blob.get_blob_properties().lease.state
                if state != "leased":
                    return f"refresh.lock is not leased ({state}): nothing to break"
                BlobLeaseClient(blob).break_lease(lease_break_period=0)
            except ResourceNotFoundError:
                return "refresh.lock does not exist: nothing to break"
        log.warning("Broke the lease on refresh.lock of %s", self.model_id)
        return "refresh.lock: its lease was broken"

    def apply_retention(self, keep: int, *, now: dt.datetime | None = None) -> list[str]:
        """Delete old versions: keep the newest ``keep`` complete ones and always the current and
        previous; remove incomplete ones older than a day. Call under :meth:`lock`.

        "Newest" follows the pointer's history (current, then previous ones), which is exact
        where blob times have a resolution of one second; other versions follow by time.

        Returns:
            The deleted revisions.
        """
        now = now or dt.datetime.now(dt.UTC)
        base = self.read_pointer_state().effective
        history = [] if base is None else [base.revision, *base.previous]
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

    def status(self, describe_version: DescribeVersion | None = None) -> StoreStatus:
        """Pointer, versions and last refresh, every damaged record listed with its repair (an empty
        or missing container reads as nothing isolated yet: ``pointer`` is ``None``).
        ``describe_version`` lists a version's artifacts and their damage, given its manifest
        (``None`` while incomplete or damaged): the artifacts code fills it."""
        state = self.read_pointer_state()
        versions = self.list_versions()
        manifests: dict[str, Manifest | None] = {}
        damages: dict[str, RecordDamage] = {}
        for version in versions:
            if version.complete:
                manifests[version.revision], damage = self.manifest_state(version.revision)
                if damage is not None:
                    damages[version.revision] = damage
        last, last_damage = self.last_refresh_state()
        damage_list = [d for d in (state.damage, *damages.values(), last_damage, self.lock_damage()) if d is not None]
        entries = []
        for v in versions:
            manifest = manifests.get(v.revision)
            damage = damages.get(v.revision)
            artifacts: dict[str, ArtifactListing] = {}
            if describe_version is not None:
                artifacts, artifact_damage = describe_version(v, manifest)
                damage_list += artifact_damage
            entries.append(
                VersionStatus(
                    revision=v.revision,
                    state="damaged" if damage else "complete" if v.complete else "incomplete",
                    complete=v.complete,
                    files=v.files,
                    bytes=v.bytes,
                    last_modified=v.last_modified.isoformat(timespec="seconds"),
                    isolated_at=manifest.isolated_at if manifest else None,
                    problem=None if damage is None else damage.problem,
                    repair=None if damage is None else damage.repair,
                    artifacts=artifacts,
                )
            )
        return StoreStatus(
            model_id=self.model_id,
            container=self.container.container_name,
            pointer=self._pointer_status(state, {r for r, m in manifests.items() if m is not None}),
            versions=tuple(entries),
            last_refresh=None if last is None else LastRefresh.of(last),
            damage=tuple(damage_list),
        )

    def _pointer_status(self, state: PointerState, intact: set[str]) -> PointerStatus | None:
        """The ``pointer`` of :meth:`status`: current.json's values (or its last recorded ones) and its
        ``state``: ``ok``, ``damaged``, ``missing`` or ``dangling`` (intact, but pointing at a
        version that is gone or damaged)."""
        if state.empty:
            return None
        base = state.effective
        problem, repair = (state.damage.problem, state.damage.repair) if state.damage else (None, None)
        kind: Literal["ok", "damaged", "missing", "dangling"] = "ok"
        if state.damage is not None:
            kind = "missing" if state.etag is None else "damaged"
        elif base is not None and base.revision not in intact:
            kind = "dangling"
            problem = f"current.json points at {base.revision}, which is not an intact complete version"
            repair = f"{POINTER_REPAIR}, or repair the version"
        return PointerStatus(
            state=kind,
            revision=base.revision if base else None,
            previous=tuple(base.previous) if base else (),
            pinned=base.pinned if base else False,
            updated_at=base.updated_at if base else None,
            problem=problem,
            repair=repair,
        )


def _history_stamp() -> str:
    """A name that sorts in time order (microseconds, UTC) for a pointer history entry."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


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


__all__ = ["ModelStore", "PointerState", "RecordDamage", "VersionInfo", "check_revision_arg", "utc_now"]
