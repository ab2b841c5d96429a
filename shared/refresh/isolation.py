"""The refresh: copy one model snapshot from a source into the store as a verified version.

Steps (docs/architecture.md, Isolation): lease the lock; describe the source (revision, files, sha256);
no-op when the pointer is already there; stream every missing file into its blob, checking
sha256 on the fly; validate the staged version; write the manifest, move the pointer; apply
retention; record the outcome in ``last-refresh.json``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ..errors import IntegrityError, NotFoundError, QAError, StorageUnavailableError
from ..store.model_files import FileEntry, Manifest, Pointer, check_config, hash_file, select_files, utc_now
from ..store.model_store import ModelStore, PointerState
from ..store.transfer import file_chunks
from ..telemetry import log_event
from .model_checks import CheckedSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """What a source offers: a revision and its allowed files with sizes and sha256."""

    revision: str
    source: str
    files: tuple[FileEntry, ...]
    source_revision: str | None = None
    derived: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> what it was made from, by what
    label: str = ""  # the source as messages name it ("folder /models/x", "repo org/name@abc123")
    provenance: dict[str, Any] = field(default_factory=dict)  # where the files were read (Manifest.provenance)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class Source(Protocol):
    """A place models are isolated from (the Hub, a local folder, a container holding a folder's files)."""

    def revision(self) -> str:
        """The revision the source resolves to (cheap where it can be: one Hub API call)."""
        ...

    def snapshot(self) -> Snapshot:
        """Resolve the revision and list the allowed files with their sha256."""
        ...

    def open(self, entry: FileEntry) -> Iterator[bytes]:
        """The bytes of one file, in order."""
        ...


class TransferProgress(Protocol):
    """Receives the size of the work, then each chunk moved (a progress bar, a log)."""

    def plan(self, total_bytes: int) -> None: ...

    def advance(self, n: int) -> None: ...


class _Quiet:
    def plan(self, total_bytes: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


def local_revision(files: tuple[FileEntry, ...]) -> str:
    """``local-`` + 16 hex of the sha256 over the files' names and hashes."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda f: f.name):
        digest.update(f"{entry.name}\0{entry.sha256}\n".encode())
    return "local-" + digest.hexdigest()[:16]


class LocalDirSource:
    """A model folder on local disk (offline isolation, tests, benchmarks).

    Each file is hashed once up front (that names the version and decides the no-op) and again
    while it uploads, so a file that changes meanwhile fails the publish.
    """

    def __init__(self, folder: Path | str, *, block_size: int = 8 << 20) -> None:
        self.folder = Path(folder)
        self.block_size = block_size
        self._snapshot: Snapshot | None = None

    def revision(self) -> str:
        return self.snapshot().revision

    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            self._snapshot = self._describe()
        return self._snapshot

    def _describe(self) -> Snapshot:
        chosen = self._chosen()
        check_config((self.folder / "config.json").read_bytes(), where=f"in folder {self.folder}")  # before anything is copied
        files = tuple(
            FileEntry(name=name, size=(self.folder / name).stat().st_size, sha256=hash_file(self.folder / name)) for name in chosen
        )
        return Snapshot(revision=local_revision(files), source="local", files=files, label=f"folder {self.folder}")

    def _chosen(self) -> list[str]:
        if not self.folder.is_dir():
            what = "is a file, not a folder" if self.folder.exists() else "does not exist"
            raise NotFoundError(f"{self.folder} {what}: give the folder of a model (config.json, *.safetensors, tokenizer files)")
        names = [p.name for p in self.folder.iterdir() if p.is_file() and not p.is_symlink()]
        return select_files(names, where=f"folder {self.folder}", convert=True)

    def config_json(self) -> bytes:
        """The folder's ``config.json`` (for the model id) after the checks of its file names,
        before any file is hashed."""
        self._chosen()
        return (self.folder / "config.json").read_bytes()

    def open(self, entry: FileEntry) -> Iterator[bytes]:
        with (self.folder / entry.name).open("rb") as stream:
            yield from file_chunks(stream, self.block_size)


Validator = Callable[[ModelStore, Manifest], None]


class ArtifactBuilder(Protocol):
    """Builds a version's serving artifacts (:func:`shared.refresh.artifact_builds.build_artifacts`): per variant
    ``built``, ``rebuilt``, ``exists``, ``unusable: ...`` or ``damaged: ...``."""

    def __call__(self, store: ModelStore, manifest: Manifest, *, rebuild: bool = False, build_missing: bool = True) -> dict[str, str]: ...


@dataclass
class IsolationResult:
    """What a refresh did; also what ``last-refresh.json`` records.

    ``outcome``: ``published`` (a new version written and made current), ``made_current`` (already
    stored and complete: the pointer moved to it, 0 bytes), ``up_to_date`` (already current),
    ``repaired`` (damaged files or artifacts rebuilt), ``skipped`` (``skipped_reason`` ``pinned``:
    nothing moved, no record of its own) or ``failed``.
    """

    outcome: str
    model_id: str
    revision: str | None = None
    previous_revision: str | None = None
    source: str | None = None
    bytes_moved: int = 0
    files_copied: int = 0
    files_reused: int = 0
    deleted_versions: list[str] = field(default_factory=list)
    started: str = field(default_factory=utc_now)
    finished: str | None = None
    seconds: float = 0.0
    error: str | None = None
    error_code: str | None = None
    files_repaired: list[str] = field(default_factory=list)
    skipped_reason: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    # What happened to the pointer, for the command line; not in last-refresh.json, whose
    # document (/api/model's last_refresh) lists its fields. ``pin``: ``kept`` (pinned here and
    # still), ``lifted`` (was pinned, now not), ``held`` (pinned at another version, left there).
    pointer_moved: bool = False
    pin: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The record of ``last-refresh.json``."""
        record = asdict(self)
        for name in _NOT_RECORDED:
            record.pop(name)
        return record

    def summary(self) -> str:
        """One line that says what was done, the pointer included (the command line prints it)."""
        where = f"{self.model_id}@{self.revision}"
        moved = f"{self.bytes_moved} bytes moved in {self.seconds:.1f}s"
        was = f" (was {self.previous_revision})" if self.previous_revision and self.previous_revision != self.revision else ""
        if self.outcome == "skipped":
            return (
                f"skipped: the pointer is pinned at {self.previous_revision}; nothing moved "
                "(name a revision with --revision, or pass --unpin, to move it)"
            )
        if self.outcome == "published":
            text = f"published: {where} ({moved}); now current{was}"
        elif self.outcome == "made_current":
            text = f"made_current: {where} already stored; now current{was}, 0 bytes moved"
        elif self.outcome == "up_to_date":
            text = f"up_to_date: {where} already current ({moved})"
        else:
            text = f"{self.outcome}: {where} ({moved})"
            if self.pointer_moved:
                text += f"; now current{was}"
            elif self.revision == self.previous_revision:
                text += "; current"
        if self.files_repaired:
            text += f"; repaired {', '.join(self.files_repaired)}"
        if self.artifacts:
            text += "; ONNX artifacts: " + ", ".join(f"{variant} {outcome}" for variant, outcome in self.artifacts.items())
        if self.pin == "kept":
            text += "; still pinned (pass --unpin to let scheduled refreshes move it)"
        elif self.pin == "lifted":
            text += f"; the pointer was pinned at {self.previous_revision} and is now unpinned"
        elif self.pin == "held":
            text += f"; the pointer stays pinned at {self.previous_revision} (name this revision, or pass --unpin, to move it)"
        return text


_NOT_RECORDED = ("pointer_moved", "pin")


def isolate(
    store: ModelStore,
    source: Source,
    *,
    explicit: bool,
    keep_versions: int,
    validate: Validator | None = None,
    progress: TransferProgress | None = None,
    repair: bool = False,
    reason: str = "cli",
    build: ArtifactBuilder | None = None,
    build_existing: bool = False,
    unpin: bool = False,
) -> IsolationResult:
    """Run one refresh of ``store`` from ``source`` under the writers' lock.

    Args:
        store: where the version goes.
        source: where it comes from.
        explicit: the caller named this revision or folder, or asked to unpin: a pinned pointer
            is moved to another version (and unpinned). A scheduled refresh passes ``False``: on a
            pinned pointer it is skipped before the source is even asked (no Hub call), and
            ``last-refresh.json`` keeps the last real outcome, adding ``last_skipped_at`` and
            ``skipped_reason``.
        keep_versions: retention (``MODEL_KEEP_VERSIONS``).
        validate: loads the staged version and answers the canary; raises to stop the publish.
        progress: told the bytes to move and each chunk moved.
        repair: when the source's revision is already stored, re-hash its stored files and copy
            again every file whose bytes differ from the source, and rebuild its damaged or
            unusable artifacts (outcome ``repaired``).
        reason: why it runs (``schedule``, ``http``, ``cli``), for the operators' event line.
        build: builds the serving artifacts of a version (:func:`shared.refresh.artifact_builds.build_artifacts`):
            for a new version after its files are validated and before the pointer moves; a
            variant that cannot be built is recorded as unusable, never a failed refresh.
        build_existing: also run ``build`` when the revision was already stored (the only way an
            existing version gets artifacts: a no-op refresh never touches them otherwise).
        unpin: the caller asked to unpin: a pinned pointer at this very revision is unpinned
            (naming the current revision alone keeps its pin).

    The rule for a version that is already stored and complete: it becomes current
    (``made_current``) unless it already is (``up_to_date``); a pinned pointer moves only when
    ``explicit``, and :attr:`IsolationResult.pin` says what happened to the pin.

    Raises:
        RefreshAlreadyRunningError: another writer holds the lock; nothing is changed or recorded.
        QAError: any other failure, after it was recorded in ``last-refresh.json``.
    """
    progress = progress or _Quiet()
    # refusals, the derived tokenizer.json and converted PyTorch weights, before any copy
    checked = source if isinstance(source, CheckedSource) else CheckedSource(source)
    store.ensure_container()
    started = time.monotonic()
    result = IsolationResult(outcome="failed", model_id=store.model_id)
    with store.lock() as lock:
        pointer = store.read_pointer_state().effective  # a damaged current.json: its last recorded value
        # named before the source is asked: a failure then still says which version stays served
        result.previous_revision = pointer.revision if pointer else None
        if pointer is not None and pointer.pinned and not explicit and not repair:
            log.info("Pointer of %s is pinned at %s; the scheduled refresh is skipped", store.model_id, pointer.revision)
            result.outcome, result.skipped_reason, result.revision = "skipped", "pinned", pointer.revision
            result.pin = "held"
            result.finished = utc_now()
            _record_skip(store, result, fast=False)
            _event(result, reason)
            return result
        try:
            _isolate_locked(
                store, checked, result, lock_check=lock.check, explicit=explicit, validate=validate, progress=progress, repair=repair,
                build=build, build_existing=build_existing, unpin=unpin,
            )  # fmt: skip
            if result.pointer_moved:
                result.deleted_versions = store.apply_retention(keep_versions)
        except QAError as err:
            result.outcome = "failed"
            result.error = err.message
            result.error_code = err.code
            raise
        except Exception:
            result.outcome = "failed"
            result.error = "internal error (see logs)"
            result.error_code = "internal_error"
            raise
        finally:
            checked.release()
            result.finished = utc_now()
            result.seconds = round(time.monotonic() - started, 3)
            # after storage failed, one quick attempt: the outcome must not cost minutes of retries
            fast = isinstance(sys.exc_info()[1], StorageUnavailableError) or lock.lost.is_set()
            (_record_skip if result.outcome == "skipped" else _record)(store, result, fast=fast)
            _event(result, reason)
    log.info(
        "Refresh of %s: %s at %s, %d bytes moved in %.1fs",
        store.model_id,
        result.outcome,
        result.revision,
        result.bytes_moved,
        result.seconds,
    )
    return result


def _event(result: IsolationResult, reason: str) -> None:
    log_event(
        log, "refresh", level=logging.ERROR if result.outcome == "failed" else logging.INFO, outcome=result.outcome,
        model_id=result.model_id, revision=result.revision, bytes=result.bytes_moved, seconds=result.seconds,
        error_code=result.error_code, reason=reason,
    )  # fmt: skip


def _record(store: ModelStore, result: IsolationResult, *, fast: bool) -> None:
    try:
        store.write_last_refresh(result.to_dict(), fast=fast)
    except QAError as err:
        log.warning("Could not record the refresh outcome in last-refresh.json: %s", err.message)


def _record_skip(store: ModelStore, result: IsolationResult, *, fast: bool) -> None:
    """Keep the last real outcome (a damaged record starts again); note when and why a refresh was skipped."""
    try:
        record = store.read_last_refresh() or {**result.to_dict(), "outcome": None}
        record.update(last_skipped_at=result.finished, skipped_reason=result.skipped_reason)
        store.write_last_refresh(record, fast=fast)
    except QAError as err:
        log.warning("Could not record the skipped refresh in last-refresh.json: %s", err.message)


def _isolate_locked(
    store: ModelStore,
    source: CheckedSource,
    result: IsolationResult,
    *,
    lock_check: Callable[[], None],
    explicit: bool,
    validate: Validator | None,
    progress: TransferProgress,
    repair: bool,
    build: ArtifactBuilder | None,
    build_existing: bool,
    unpin: bool,
) -> None:
    def build_for(manifest: Manifest, *, rebuild: bool = False) -> None:
        if build is not None:
            # a repair also builds the expected artifacts a version lacks: a repaired version serves as asked
            result.artifacts = build(store, manifest, rebuild=rebuild, build_missing=True)
            lock_check()

    revision = source.revision()
    result.revision = revision
    pointer = _repaired_pointer(store, store.read_pointer_state(), result)
    result.previous_revision = pointer.revision if pointer else None
    stored, damage = store.manifest_state(revision)
    repaired = False
    if damage is not None:
        # stored, but its manifest is damaged: rewritten from the source, every file checked against it
        log.warning("Repairing version %s of %s: %s", revision, store.model_id, damage.message)
        stored = _rewrite_manifest(store, source, revision, result, validate=validate, lock_check=lock_check, progress=progress)
        build_for(stored, rebuild=True)
        repaired = True
    if stored is not None:
        # Already stored and complete: repaired if asked, then made current by the one rule.
        if repair and not repaired:
            repaired = _repair(store, source, stored, result, lock_check=lock_check, progress=progress)
            source.release()
            build_for(stored, rebuild=True)
            repaired = repaired or any(outcome in ("rebuilt", "built") for outcome in result.artifacts.values())
        elif build_existing and not repaired:
            build_for(stored)
        moved = _make_current(store, pointer, revision, result, explicit=explicit, unpin=unpin)
        if repaired or result.files_repaired:
            result.outcome = "repaired"
        elif moved:
            result.outcome = "made_current"
        elif pointer is not None and pointer.revision != revision:
            # pinned elsewhere, and the caller did not name this revision nor ask to unpin
            result.outcome, result.skipped_reason = "skipped", "pinned"
        else:
            result.outcome = "up_to_date"
        return
    if pointer is not None and pointer.pinned and not explicit:
        # The pointer was pinned between the check before the lock and now.
        log.info("Pointer of %s is pinned at %s; the scheduled refresh leaves it", store.model_id, pointer.revision)
        result.outcome, result.skipped_reason, result.pin = "skipped", "pinned", "held"
        return

    snapshot = source.snapshot()
    result.source = snapshot.source
    _stage(store, source, snapshot, result, lock_check=lock_check, progress=progress)
    source.release()  # converted weights held for the copy: freed before the canary loads the version
    manifest = _manifest_of(store, snapshot, validated=validate is not None)
    if validate is not None:
        validate(store, manifest)
    lock_check()
    build_for(manifest)  # before the pointer moves: serving finds the artifacts with the version
    store.publish(manifest, pinned=False)
    result.pointer_moved = True
    result.pin = "lifted" if pointer is not None and pointer.pinned else None
    result.outcome = "published"


def _manifest_of(store: ModelStore, snapshot: Snapshot, *, validated: bool, isolated_at: str | None = None) -> Manifest:
    """The manifest of a staged snapshot (``validated``: it answers the canary before it is written)."""
    manifest = Manifest(
        model_id=store.model_id,
        revision=snapshot.revision,
        source=snapshot.source,
        source_revision=snapshot.source_revision,
        files=snapshot.files,
        derived=snapshot.derived,
        canary="passed" if validated else "skipped",
        provenance=snapshot.provenance,
    )
    return replace(manifest, isolated_at=isolated_at) if isolated_at else manifest


def _repaired_pointer(store: ModelStore, state: PointerState, result: IsolationResult) -> Pointer | None:
    """The pointer to go by; a damaged or missing ``current.json`` is rewritten first, at its last
    recorded value (noted in ``files_repaired``), when an intact version is there to point at."""
    if state.damage is None:
        return state.effective
    try:
        pointer, what = store.repair_pointer()
    except NotFoundError:  # nothing intact to point at yet: the version this run publishes will be
        return state.effective
    log.warning("Repaired the pointer of %s: %s", store.model_id, what)
    result.files_repaired.append("current.json")
    return pointer


def _rewrite_manifest(
    store: ModelStore,
    source: CheckedSource,
    revision: str,
    result: IsolationResult,
    *,
    validate: Validator | None,
    lock_check: Callable[[], None],
    progress: TransferProgress,
) -> Manifest:
    """Rewrite the damaged manifest of a stored version from its source: every stored file is
    checked against the source's sha256 (those that differ are copied again), the canary is asked
    again, then the manifest is replaced (If-Match on the damaged blob: a concurrent repair wins)."""
    snapshot = source.snapshot()
    result.source = snapshot.source
    etag = store.manifest_etag(revision)
    facts = store.manifest_facts(revision)
    damaged = [entry for entry in snapshot.files if store.file_problem(revision, entry) is not None]
    progress.plan(sum(entry.size for entry in damaged))
    for entry in damaged:
        lock_check()
        log.warning("Repairing %s of %s: its stored bytes differ from the source", entry.name, revision)
        result.bytes_moved += store.upload_file(revision, entry, source.open(entry), progress=progress.advance)
        result.files_copied += 1
        result.files_repaired.append(entry.name)
    result.files_reused = len(snapshot.files) - len(damaged)
    source.release()  # converted weights: freed before the canary loads the version
    manifest = _manifest_of(store, snapshot, validated=validate is not None, isolated_at=facts.get("isolated_at"))
    if validate is not None:
        validate(store, manifest)
    lock_check()
    store.write_manifest(manifest, replacing_etag=etag)
    result.files_repaired.append("manifest.json")
    log.info("Rewrote manifest.json of %s from its source", revision)
    return manifest


def _make_current(
    store: ModelStore, pointer: Pointer | None, revision: str, result: IsolationResult, *, explicit: bool, unpin: bool
) -> bool:
    """Point at the stored ``revision`` by the rule of :func:`isolate`; whether the pointer moved."""
    if pointer is None:
        store.move_pointer(revision, pinned=False)
    elif pointer.revision == revision:
        if pointer.pinned and unpin:
            store.move_pointer(revision, pinned=False)
            result.pin = "lifted"
        elif pointer.pinned:
            result.pin = "kept"
        return False
    elif pointer.pinned and not explicit:
        result.pin = "held"
        return False
    else:
        store.move_pointer(revision, pinned=False)
        result.pin = "lifted" if pointer.pinned else None
    log.info("Version %s of %s was already stored; it is now current", revision, store.model_id)
    result.pointer_moved = True
    return True


def _repair(
    store: ModelStore,
    source: Source,
    stored: Manifest,
    result: IsolationResult,
    *,
    lock_check: Callable[[], None],
    progress: TransferProgress,
) -> bool:
    """Re-hash every stored file of ``stored`` and copy again from ``source`` each one whose bytes
    differ; whether any was."""
    snapshot = source.snapshot()
    result.source = snapshot.source
    if {(f.name, f.size, f.sha256) for f in snapshot.files} != {(f.name, f.size, f.sha256) for f in stored.files}:
        raise IntegrityError(f"The source's files for {stored.revision} differ from the stored manifest; it cannot repair this version")
    damaged = [entry for entry in stored.files if store.file_problem(stored.revision, entry) is not None]
    progress.plan(sum(entry.size for entry in damaged))
    for entry in damaged:
        lock_check()
        log.warning("Repairing %s of %s: its stored bytes differ from the manifest", entry.name, stored.revision)
        result.bytes_moved += store.upload_file(stored.revision, entry, source.open(entry), progress=progress.advance)
        result.files_copied += 1
        result.files_repaired.append(entry.name)
    result.files_reused = len(stored.files) - len(damaged)
    remaining = store.verify_version(stored.revision)
    if remaining:
        raise IntegrityError(f"Version {stored.revision} still fails verification after the repair: {remaining[0]}")
    return bool(damaged)


def _stage(
    store: ModelStore,
    source: Source,
    snapshot: Snapshot,
    result: IsolationResult,
    *,
    lock_check: Callable[[], None],
    progress: TransferProgress,
) -> None:
    todo = [entry for entry in snapshot.files if not store.stored_file_matches(snapshot.revision, entry)]
    result.files_reused = len(snapshot.files) - len(todo)
    todo_bytes = sum(entry.size for entry in todo)
    progress.plan(todo_bytes)
    log.info(
        "Copying %d file(s), %d bytes, %d already stored; memory bound about %d MB (block %d MB x %d in flight + 1)",
        len(todo),
        todo_bytes,
        result.files_reused,
        store.block_size * (store.concurrency + 1) // (1 << 20),
        store.block_size // (1 << 20),
        store.concurrency,
    )
    for entry in todo:
        lock_check()
        began = time.monotonic()
        try:
            sent = store.upload_file(snapshot.revision, entry, source.open(entry), progress=progress.advance)
        except IntegrityError:
            log.error("Integrity check failed for %s of %s; deleting the staged version", entry.name, snapshot.revision)
            store.delete_version(snapshot.revision)
            raise
        took = max(time.monotonic() - began, 1e-6)
        log.info("Copied %s (%d bytes) in %.1fs, %.1f MB/s", entry.name, sent, took, sent / took / 1e6)
        result.bytes_moved += sent
        result.files_copied += 1
