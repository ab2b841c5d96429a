"""ONNX serving artifacts of a stored version: their records, where they live, and loading them
without torch or transformers (``shared.refresh.artifact_builds`` builds them).

Layout, under a version's prefix (the manifest's ``files`` never list these, so code that
predates artifacts reads new versions unchanged)::

    onnx/{variant}/model.onnx      the graph; its initializers are external data in weights.bin
    onnx/{variant}/weights.bin     the weights
    onnx/{variant}/artifact.json   the record, written last with If-None-Match: no record, no artifact

The record holds the size and sha256 of both blobs, what the artifact was built from (the
version's files by sha256, the exporter's versions, opset, recipe, CPU flags; see
:func:`shared.refresh.onnx_export.build_onnx`) and whether it is usable. An artifact that does not answer
the canary, or a model the exporter cannot handle, gets a record with ``usable: false`` and the
reason, so serving falls back to torch without retrying the build on every load. The record's own
sha256 is kept in its blob metadata: a changed byte in the record, in the graph or in the weights
is refused on load (:class:`IntegrityError`), and the holder falls back (current onnx, current
torch, earlier versions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobClient

from ..engine.question_answering import QAEngine
from ..errors import IntegrityError, NotFoundError, QAError
from ..settings import ARTIFACT_VARIANTS, Settings
from ..store.model_files import FileEntry, Manifest, utc_now
from ..store.model_store import ModelStore, VersionInfo
from ..store.status import ArtifactListing, ArtifactStateName, RecordDamage, StoreStatus
from ..store.storage import storage_errors
from .versions import LoadedModel

log = logging.getLogger(__name__)

ARTIFACTS_FOLDER = "onnx"
ARTIFACT_RECORD = "artifact.json"
ARTIFACT_FILES = ("model.onnx", "weights.bin")
RECORD_FORMAT = 1
# tokenizer files serving reads from the version (tokenizer.json when the model has one)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt")


def artifact_blob(store: ModelStore, revision: str, variant: str, name: str) -> BlobClient:
    """A blob of the ``variant`` ONNX artifact of ``revision`` (``onnx/{variant}/{name}``)."""
    if variant not in ARTIFACT_VARIANTS:
        raise IntegrityError(f"{variant!r} is not an artifact variant ({', '.join(ARTIFACT_VARIANTS)})")
    return store.folder_blob(revision, f"{ARTIFACTS_FOLDER}/{variant}", name)


def recorded_variants(version: VersionInfo) -> tuple[str, ...]:
    """The variants of a listed version that have a record (usable or not)."""
    return tuple(v for v in ARTIFACT_VARIANTS if f"{ARTIFACTS_FOLDER}/{v}/{ARTIFACT_RECORD}" in version.folder_blobs)


@dataclass(frozen=True)
class ArtifactRecord:
    """``artifact.json``: one variant's blobs and provenance."""

    variant: str
    model_id: str
    revision: str
    usable: bool
    files: tuple[FileEntry, ...]
    source_files: dict[str, str]  # the version's files, name -> sha256
    engine: dict[str, Any]  # build_onnx's record: recipe, opset, versions, tokenizer facts
    built_at: str
    reason: str | None = None

    @classmethod
    def of_version(
        cls,
        manifest: Manifest,
        variant: str,
        *,
        usable: bool,
        files: tuple[FileEntry, ...],
        engine: dict[str, Any],
        reason: str | None = None,
    ) -> ArtifactRecord:
        """A record of ``manifest``'s version, built now from its files."""
        return cls(
            variant=variant,
            model_id=manifest.model_id,
            revision=manifest.revision,
            usable=usable,
            files=files,
            source_files={f.name: f.sha256 for f in manifest.files},
            engine=engine,
            built_at=utc_now(),
            reason=reason,
        )

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        data = {
            "format": RECORD_FORMAT,
            "variant": self.variant,
            "model_id": self.model_id,
            "revision": self.revision,
            "usable": self.usable,
            "reason": self.reason,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
            "source_files": self.source_files,
            "engine": self.engine,
            "built_at": self.built_at,
        }
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> ArtifactRecord:
        try:
            data = json.loads(raw)
            if data.get("format") != RECORD_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            files = tuple(FileEntry(name=f["name"], size=int(f["size"]), sha256=str(f["sha256"])) for f in data["files"])
            record = cls(
                variant=str(data["variant"]),
                model_id=str(data["model_id"]),
                revision=str(data["revision"]),
                usable=bool(data["usable"]),
                files=files,
                source_files={str(k): str(v) for k, v in dict(data["source_files"]).items()},
                engine=dict(data["engine"]),
                built_at=str(data["built_at"]),
                reason=data.get("reason"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise IntegrityError(f"{where} is not a valid artifact record ({err})") from None
        if record.usable and sorted(f.name for f in files) != sorted(ARTIFACT_FILES):
            raise IntegrityError(f"{where} lists {[f.name for f in files]}, not {list(ARTIFACT_FILES)}")
        return record


# --- reading --------------------------------------------------------------------------------

DAMAGED_MARK = "damaged"  # metadata of artifact.json: the blob a serving load found damaged


def build_command(revision: str) -> str:
    """What builds the artifacts a version lacks."""
    return f"python -m shared build-artifacts --revision {revision}"


def repair_command(revision: str) -> str:
    """What rebuilds a damaged or unusable artifact of ``revision``."""
    return (
        f"python -m shared build-artifacts --rebuild --revision {revision} "
        '(or python -m shared isolate --repair, or a refresh with {"repair": true})'
    )


class ArtifactDamagedError(IntegrityError):
    """A blob of an artifact (or its record) does not match what was recorded; ``blob`` names it."""

    def __init__(self, message: str, *, blob: str) -> None:
        super().__init__(message)
        self.blob = blob


@dataclass(frozen=True)
class _StoredRecord:
    record: ArtifactRecord
    sha256: str
    etag: str
    metadata: dict[str, str]


def _read_stored_record(store: ModelStore, manifest: Manifest, variant: str) -> _StoredRecord | None:
    blob = artifact_blob(store, manifest.revision, variant, ARTIFACT_RECORD)
    where = f"The {variant} artifact record of version {manifest.revision}"
    with storage_errors(f"reading the {variant} artifact record"):
        try:
            downloader = blob.download_blob()
        except ResourceNotFoundError:
            return None
        raw = downloader.readall()
        metadata = dict(downloader.properties.metadata or {})
        etag = str(downloader.properties.etag)
    digest = hashlib.sha256(raw).hexdigest()
    if metadata.get("sha256") != digest:
        raise ArtifactDamagedError(f"{where} does not match its sha256 (changed after it was written)", blob=ARTIFACT_RECORD)
    try:
        record = ArtifactRecord.from_json(raw, where=where)
    except IntegrityError as err:
        raise ArtifactDamagedError(err.message, blob=ARTIFACT_RECORD) from None
    source = {f.name: f.sha256 for f in manifest.files}
    if (record.variant, record.revision, record.model_id, record.source_files) != (variant, manifest.revision, manifest.model_id, source):
        raise ArtifactDamagedError(f"{where} was built from other files than this version's", blob=ARTIFACT_RECORD)
    return _StoredRecord(record, digest, etag, metadata)


def read_record(store: ModelStore, manifest: Manifest, variant: str) -> tuple[ArtifactRecord, str] | None:
    """The record of ``variant`` for ``manifest``'s version and its sha256, checked; ``None`` if absent.

    Raises:
        IntegrityError: the record's bytes differ from the sha256 written with it, it does not
            parse, or it belongs to other files than the version's.
    """
    stored = _read_stored_record(store, manifest, variant)
    return None if stored is None else (stored.record, stored.sha256)


@dataclass(frozen=True)
class ArtifactState:
    """One variant's state: ``ok``, ``unusable`` (recorded at build, with a reason), ``damaged``
    (a blob does not match the record, or the record its own sha256; ``blob`` names which) or
    ``missing``."""

    variant: str
    state: ArtifactStateName
    message: str | None = None
    blob: str | None = None
    record: ArtifactRecord | None = None
    sha256: str = ""
    etag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "blob": self.blob, "message": self.message}

    def listing(self, revision: str) -> ArtifactListing:
        """The ``artifacts`` entry of ``status`` and ``/api/model``: state, size, record sha256, usable, reason."""
        reason = self.message
        if self.state == "damaged":
            reason = f"{self.blob}: {self.message}; repair: {repair_command(revision)}"
        elif self.state == "missing":
            reason = f"MODEL_ARTIFACTS expects it and there is none; build it: {build_command(revision)}"
        size = self.record.total_bytes if self.record is not None else 0
        return ArtifactListing(state=self.state, size=size, sha256=self.sha256, usable=self.state == "ok", reason=reason)


def artifact_state(store: ModelStore, manifest: Manifest, variant: str, *, verify_blobs: bool = False) -> ArtifactState:
    """The state of ``variant`` for ``manifest``'s version.

    Without ``verify_blobs`` only the record is read (a few KB): its sha256, its provenance and a
    damage mark left by a serving load. With it every blob is re-hashed as it streams (nothing
    kept in memory), as ``verify`` and ``build-artifacts`` do.
    """
    try:
        stored = _read_stored_record(store, manifest, variant)
    except ArtifactDamagedError as err:  # the record itself: its ETag lets a rebuild replace it, and only it
        return ArtifactState(variant, "damaged", err.message, err.blob, etag=record_etag(store, manifest.revision, variant))
    if stored is None:
        return ArtifactState(variant, "missing")
    record = stored.record

    def state(name: ArtifactStateName, message: str | None = None, blob: str | None = None) -> ArtifactState:
        return ArtifactState(variant, name, message, blob, record=record, sha256=stored.sha256, etag=stored.etag)

    if not record.usable:
        return state("unusable", record.reason)
    marked = stored.metadata.get(DAMAGED_MARK)
    if marked:
        when = stored.metadata.get("damaged_at", "earlier")
        return state("damaged", f"{marked} did not match its sha256 when a serving load read it ({when})", marked)
    if verify_blobs:
        for entry in record.files:
            problem = store.file_problem(manifest.revision, entry, blob=artifact_blob(store, manifest.revision, variant, entry.name))
            if problem is not None:
                return state("damaged", problem, entry.name)
    return state("ok")


def artifact_states(
    store: ModelStore, manifest: Manifest, variants: tuple[str, ...] | None = None, *, expected: tuple[str, ...] = ()
) -> dict[str, ArtifactState]:
    """The state of each of ``variants`` (default: all) that has a record, from the records alone,
    and of each ``expected`` one (``MODEL_ARTIFACTS``), which is ``missing`` when it has none."""
    wanted = variants if variants is not None else ARTIFACT_VARIANTS
    found: dict[str, ArtifactState] = {}
    for variant in ARTIFACT_VARIANTS:
        if variant not in wanted and variant not in expected:
            continue
        state = artifact_state(store, manifest, variant) if variant in wanted else ArtifactState(variant, "missing")
        if state.state != "missing" or variant in expected:
            found[variant] = state
    return found


def list_artifacts(
    store: ModelStore, manifest: Manifest, variants: tuple[str, ...] | None = None, *, expected: tuple[str, ...] = ()
) -> dict[str, ArtifactListing]:
    """Each variant's entry of ``/api/model`` and ``status`` (:func:`artifact_states`): total size,
    record sha256, usability, and for a damaged or missing one the reason and how to repair it."""
    return {
        variant: state.listing(manifest.revision)
        for variant, state in artifact_states(store, manifest, variants, expected=expected).items()
    }


def record_etag(store: ModelStore, revision: str, variant: str) -> str | None:
    """The ETag of a variant's record (a HEAD), ``None`` when there is none: it changes when the
    artifact is marked damaged or rebuilt, so serving can notice a repair without downloading."""
    with storage_errors(f"checking the {variant} artifact record"):
        try:
            return str(artifact_blob(store, revision, variant, ARTIFACT_RECORD).get_blob_properties().etag)
        except ResourceNotFoundError:
            return None


def _mark_damaged(store: ModelStore, manifest: Manifest, variant: str, stored: _StoredRecord, blob_name: str) -> None:
    """Note in the record's metadata that ``blob_name`` failed its sha256, so that later loads (and
    ``status``) know without downloading the artifact again. If-Match on the record as it was
    read: a record rebuilt meanwhile is never marked. Best effort: serving goes on either way."""
    from azure.core import MatchConditions

    metadata = {**stored.metadata, DAMAGED_MARK: blob_name, "damaged_at": utc_now()}
    try:
        with storage_errors(f"marking the {variant} artifact damaged"):
            artifact_blob(store, manifest.revision, variant, ARTIFACT_RECORD).set_blob_metadata(
                metadata, etag=stored.etag, match_condition=MatchConditions.IfNotModified
            )
    except QAError as err:
        log.warning("Could not mark the %s artifact of %s damaged: %s", variant, manifest.revision, err.message)
        return
    log.warning(
        "Marked the %s artifact of %s damaged (%s); repair: %s", variant, manifest.revision, blob_name, repair_command(manifest.revision)
    )


def load_artifact(store: ModelStore, manifest: Manifest, variant: str, settings: Settings) -> LoadedModel:
    """Load the ``variant`` artifact of a version into an ONNX Runtime engine (no torch import).

    Every blob is sha256-checked while it streams into memory; the session is built over those
    buffers (``onnx_engine``), which it then releases. A blob that fails its check marks the
    artifact damaged in its record (once): later loads refuse it without downloading it again,
    until it is rebuilt (:func:`repair_command`).

    Raises:
        NotFoundError: the version has no such artifact, or its record says it is unusable.
        IntegrityError: the record or a blob does not verify, or the artifact is marked damaged;
            the message says how to repair it.
        StorageUnavailableError: storage could not be read.
    """
    began = time.monotonic()
    what = f"The {variant} ONNX artifact of version {manifest.revision}"
    try:
        stored = _read_stored_record(store, manifest, variant)
    except ArtifactDamagedError as err:
        raise _damaged(what, err, manifest.revision) from None
    if stored is None:
        raise NotFoundError(
            f"Version {manifest.revision} has no {variant} ONNX artifact (build it: python -m shared build-artifacts, "
            'or a refresh with {"build_artifacts": true})'
        )
    record = stored.record
    if not record.usable:
        raise NotFoundError(f"{what} is unusable: {record.reason}")
    marked = stored.metadata.get(DAMAGED_MARK)
    if marked:
        raise ArtifactDamagedError(
            f"{what} is damaged ({marked} did not match its sha256 on an earlier load); repair: {repair_command(manifest.revision)}",
            blob=marked,
        )
    try:
        engine = _staged_engine(store, manifest, record, settings)
        if engine is None:
            engine = artifact_engine(store, manifest, record, settings, files=_read_blobs(store, manifest, record))
    except ArtifactDamagedError as err:
        _mark_damaged(store, manifest, variant, stored, err.blob)
        raise _damaged(what, err, manifest.revision) from None
    seconds = time.monotonic() - began
    log.info(
        "Loaded the %s ONNX artifact of %s@%s (%d bytes) in %.1fs",
        variant, manifest.model_id, manifest.revision, record.total_bytes, seconds,
    )  # fmt: skip
    return LoadedModel(
        engine=engine,
        model_id=manifest.model_id,
        revision=manifest.revision,
        mode="memory",
        bytes=record.total_bytes,
        load_seconds=seconds,
        backend="onnx",
        variant=variant,
    )


def _damaged(what: str, err: ArtifactDamagedError, revision: str) -> ArtifactDamagedError:
    return ArtifactDamagedError(f"{what} is damaged: {err.message}; repair: {repair_command(revision)}", blob=err.blob)


def _staged_engine(store: ModelStore, manifest: Manifest, record: ArtifactRecord, settings: Settings) -> QAEngine | None:
    """The engine built part by part as ``weights.bin`` streams in, repacked, when ``QA_MEMORY_MB``
    leaves room for that but not for a load that holds the weights twice
    (:func:`~shared.engine.onnx_runner.staged_parts`); ``None`` when that is not the case.

    Raises:
        ArtifactDamagedError: a blob does not match the record (or is missing), naming it.
    """
    from ..engine.onnx_runner import default_threads, staged_engine, staged_parts

    bounded = _bounded_graph(store, manifest, record, settings)
    if bounded is None:
        return None
    graph, weights = bounded
    parts = staged_parts(graph, weights.size, settings.memory_mb)
    if parts is None:
        return None
    log.info("Loading the %s artifact of %s in %d parts, each repacked as it arrives", record.variant, manifest.revision, len(parts))
    tokenizer = {entry.name: store.read_file(manifest.revision, entry) for entry in manifest.files if entry.name in TOKENIZER_FILES}
    return staged_engine(
        graph,
        record.engine,
        tokenizer,
        parts=parts,
        weights_bytes=weights.size,
        stream=weights_stream(store, manifest, record),
        limits=settings.limits,
        batch_windows=settings.batch_windows,
        threads=default_threads(settings.threads, settings.max_concurrent),
        memory_mb=settings.memory_mb,
        max_concurrent=settings.max_concurrent,
    )


def weights_stream(store: ModelStore, manifest: Manifest, record: ArtifactRecord) -> Callable[[Any], None]:
    """``stream(sink)``: the artifact's ``weights.bin``, every byte in order, into ``sink`` (calling
    its ``restart`` if the blob is rewritten meanwhile), sha256-checked at the end.

    Raises (from ``stream``):
        ArtifactDamagedError: the blob does not match the record, or is missing.
    """
    entry = next(e for e in record.files if e.name == "weights.bin")
    blob = artifact_blob(store, manifest.revision, record.variant, entry.name)

    def stream(sink: Any) -> None:
        try:
            store.stream_file(manifest.revision, entry, sink, restart=sink.restart, blob=blob)
        except IntegrityError as err:
            raise ArtifactDamagedError(err.message, blob=entry.name) from err
        except NotFoundError as err:
            raise ArtifactDamagedError(f"{entry.name} is missing from storage", blob=entry.name) from err

    return stream


def partwise_artifact_engine(store: ModelStore, manifest: Manifest, record: ArtifactRecord, settings: Settings) -> QAEngine | None:
    """An engine that runs each call part by part while ``weights.bin`` streams in again
    (:func:`~shared.engine.onnx_runner.partwise_engine`), when ``QA_MEMORY_MB`` does not leave room
    for the weights twice and the graph can be cut; ``None`` otherwise. For a canary, not serving.

    Raises:
        ArtifactDamagedError: a blob does not match the record (or is missing), naming it.
    """
    from ..engine.onnx_parts import split_graph
    from ..engine.onnx_runner import part_size, partwise_engine

    bounded = _bounded_graph(store, manifest, record, settings)
    if bounded is None:
        return None
    graph, weights = bounded
    parts = split_graph(graph, part_bytes=part_size(weights.size, 16))
    if parts is None:
        return None
    tokenizer = {entry.name: store.read_file(manifest.revision, entry) for entry in manifest.files if entry.name in TOKENIZER_FILES}
    return partwise_engine(
        graph, record.engine, tokenizer, parts=parts, weights_bytes=weights.size, stream=weights_stream(store, manifest, record)
    )


def _bounded_graph(store: ModelStore, manifest: Manifest, record: ArtifactRecord, settings: Settings) -> tuple[bytes, FileEntry] | None:
    """The artifact's graph and its ``weights.bin`` entry when ``QA_MEMORY_MB`` leaves no room for
    the weights twice (the loads that go part by part); ``None`` otherwise.

    Raises:
        ArtifactDamagedError: the graph's blob does not match the record (or is missing).
    """
    from ..engine.onnx_runner import prepack_fits

    sizes = {entry.name: entry for entry in record.files}
    weights = sizes.get("weights.bin")
    if weights is None or settings.memory_mb is None or prepack_fits(weights.size, settings.memory_mb):
        return None
    return bytes(_read_blob(store, manifest, record, sizes["model.onnx"])), weights


def _read_blob(store: ModelStore, manifest: Manifest, record: ArtifactRecord, entry: FileEntry) -> bytearray:
    blob = artifact_blob(store, manifest.revision, record.variant, entry.name)
    try:
        return store.read_file(manifest.revision, entry, blob=blob)
    except IntegrityError as err:
        raise ArtifactDamagedError(err.message, blob=entry.name) from err
    except NotFoundError as err:
        raise ArtifactDamagedError(f"{entry.name} is missing from storage", blob=entry.name) from err


def _read_blobs(store: ModelStore, manifest: Manifest, record: ArtifactRecord) -> dict[str, bytearray]:
    """The artifact's blobs in memory, each sha256-checked as it streams in.

    Raises:
        ArtifactDamagedError: a blob does not match the record (or is missing), naming it.
    """
    return {entry.name: _read_blob(store, manifest, record, entry) for entry in record.files}


def stored_artifact(store: ModelStore, manifest: Manifest, variant: str) -> tuple[ArtifactRecord, dict[str, bytearray]] | None:
    """A usable artifact's record and blobs in memory, every blob sha256-checked as it streams in
    (each ``bytearray`` the caller's to keep or spend); ``None`` when the variant has no sound,
    usable artifact (missing, unusable, damaged or marked so).

    Raises:
        StorageUnavailableError: storage could not be read.
    """
    state = artifact_state(store, manifest, variant)
    if state.state != "ok" or state.record is None:
        return None
    try:
        return state.record, _read_blobs(store, manifest, state.record)
    except ArtifactDamagedError:
        return None


def artifact_engine(
    store: ModelStore,
    manifest: Manifest,
    record: ArtifactRecord,
    settings: Settings,
    *,
    prepack: bool | None = None,
    files: dict[str, bytearray] | None = None,
) -> QAEngine:
    """An ONNX Runtime engine over the stored, sha256-checked blobs of ``record`` (or ``files``,
    already read by :func:`_read_blobs`).

    ``prepack`` (see :func:`~shared.engine.onnx_runner.onnx_engine`): ``None`` repacks the weights
    when twice their size fits in ``QA_MEMORY_MB`` (or memory is not bounded), and otherwise
    serves them from the download buffer itself, with runs bounded to the memory left.
    """
    from ..engine.onnx_runner import default_threads, onnx_engine, prepack_fits

    files = _read_blobs(store, manifest, record) if files is None else files
    tokenizer = {entry.name: store.read_file(manifest.revision, entry) for entry in manifest.files if entry.name in TOKENIZER_FILES}
    weights = len(files.get("weights.bin", b""))
    if prepack is None:
        prepack = prepack_fits(weights, settings.memory_mb)
        if not prepack:
            log.info(
                "Serving the %s artifact's %d MB of weights from the download, not repacked: twice that does not fit QA_MEMORY_MB=%d",
                record.variant, weights // 10**6, settings.memory_mb,
            )  # fmt: skip
    return onnx_engine(
        files,
        record.engine,
        tokenizer,
        limits=settings.limits,
        batch_windows=settings.batch_windows,
        threads=default_threads(settings.threads, settings.max_concurrent),
        prepack=prepack,
        memory_mb=settings.memory_mb,
        max_concurrent=settings.max_concurrent,
    )


def status(store: ModelStore, *, expected: tuple[str, ...] = ()) -> StoreStatus:
    """:meth:`ModelStore.status` with each version's artifacts (``/api/model``, ``status``); the
    ``expected`` variants (``MODEL_ARTIFACTS``) a complete version lacks are listed as ``missing``,
    and damaged artifacts join the store's list of damage."""

    def artifacts(version: VersionInfo, manifest: Manifest | None) -> tuple[dict[str, ArtifactListing], list[RecordDamage]]:
        if manifest is None:
            return {}, []
        states = artifact_states(store, manifest, recorded_variants(version), expected=expected)
        damage = [
            RecordDamage(
                f"onnx/{variant}/{state.blob} of version {version.revision}", state.message or "damaged", repair_command(version.revision)
            )
            for variant, state in states.items()
            if state.state == "damaged"
        ]
        return {variant: state.listing(version.revision) for variant, state in states.items()}, damage

    return store.status(artifacts)
