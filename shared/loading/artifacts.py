"""ONNX serving artifacts of a stored version: their records, where they live, and loading them
without torch or transformers (``shared.build.artifacts`` builds them).

Layout, under a version's prefix (the manifest's ``files`` never list these, so code that
predates artifacts reads new versions unchanged)::

    onnx/{variant}/model.onnx      the graph; its initializers are external data in weights.bin
    onnx/{variant}/weights.bin     the weights
    onnx/{variant}/artifact.json   the record, written last with If-None-Match: no record, no artifact

The record holds the size and sha256 of both blobs, what the artifact was built from (the
version's files by sha256, the exporter's versions, opset, recipe, CPU flags; see
:func:`shared.build.onnx_export.build_onnx`) and whether it is usable. An artifact that does not answer
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
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobClient

from ..engine.question_answering import Limits, QAEngine
from ..errors import IntegrityError, NotFoundError
from ..settings import ARTIFACT_VARIANTS, Settings
from ..store.model_files import FileEntry, Manifest, utc_now
from ..store.model_store import ModelStore, VersionInfo
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
    return tuple(
        v for v in ARTIFACT_VARIANTS if f"{ARTIFACTS_FOLDER}/{v}/{ARTIFACT_RECORD}" in version.folder_blobs
    )


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


def read_record(store: ModelStore, manifest: Manifest, variant: str) -> tuple[ArtifactRecord, str] | None:
    """The record of ``variant`` for ``manifest``'s version and its sha256, checked; ``None`` if absent.

    Raises:
        IntegrityError: the record's bytes differ from the sha256 written with it, it does not
            parse, or it belongs to other files than the version's.
    """
    blob = artifact_blob(store, manifest.revision, variant, ARTIFACT_RECORD)
    where = f"The {variant} artifact record of version {manifest.revision}"
    with storage_errors(f"reading the {variant} artifact record"):
        try:
            downloader = blob.download_blob()
        except ResourceNotFoundError:
            return None
        raw = downloader.readall()
        expected = (downloader.properties.metadata or {}).get("sha256")
    digest = hashlib.sha256(raw).hexdigest()
    if expected != digest:
        raise IntegrityError(f"{where} does not match its sha256 (changed after it was written)")
    record = ArtifactRecord.from_json(raw, where=where)
    source = {f.name: f.sha256 for f in manifest.files}
    if (record.variant, record.revision, record.model_id, record.source_files) != (variant, manifest.revision, manifest.model_id, source):
        raise IntegrityError(f"{where} was built from other files than this version's")
    return record, digest


def list_artifacts(store: ModelStore, manifest: Manifest, variants: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Each recorded variant's total size, record sha256 and usability (``/api/model``, ``status``).

    A record that fails its checks is listed as unusable with the reason; nothing is raised for it.
    """
    found: dict[str, dict[str, Any]] = {}
    for variant in variants if variants is not None else ARTIFACT_VARIANTS:
        try:
            read = read_record(store, manifest, variant)
        except IntegrityError as err:
            found[variant] = {"size": 0, "sha256": "", "usable": False, "reason": err.message}
            continue
        if read is not None:
            record, digest = read
            found[variant] = {"size": record.total_bytes, "sha256": digest, "usable": record.usable, "reason": record.reason}
    return found


def load_artifact(store: ModelStore, manifest: Manifest, variant: str, settings: Settings) -> LoadedModel:
    """Load the ``variant`` artifact of a version into an ONNX Runtime engine (no torch import).

    Every blob is sha256-checked while it streams into memory; the session is built over those
    buffers (``onnx_engine``), which it then releases.

    Raises:
        NotFoundError: the version has no such artifact, or its record says it is unusable.
        IntegrityError: the record or a blob does not verify.
        StorageUnavailableError: storage could not be read.
    """
    began = time.monotonic()
    read = read_record(store, manifest, variant)
    if read is None:
        raise NotFoundError(
            f"Version {manifest.revision} has no {variant} ONNX artifact (build it: python -m shared build-artifacts, "
            'or a refresh with {"build_artifacts": true})'
        )
    record, _ = read
    if not record.usable:
        raise NotFoundError(f"The {variant} ONNX artifact of version {manifest.revision} is unusable: {record.reason}")
    engine = artifact_engine(store, manifest, record, settings)
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


def artifact_engine(store: ModelStore, manifest: Manifest, record: ArtifactRecord, settings: Settings, *, prepack: bool = True) -> QAEngine:
    """An ONNX Runtime engine over the stored, sha256-checked blobs of ``record`` (``prepack``:
    see :func:`~shared.engine.onnx_runner.onnx_engine`)."""
    from ..engine.onnx_runner import default_threads, onnx_engine

    files = {
        entry.name: store.read_file(manifest.revision, entry, blob=artifact_blob(store, manifest.revision, record.variant, entry.name))
        for entry in record.files
    }
    tokenizer = {entry.name: store.read_file(manifest.revision, entry) for entry in manifest.files if entry.name in TOKENIZER_FILES}
    return onnx_engine(
        files,
        record.engine,
        tokenizer,
        limits=Limits.from_settings(settings),
        batch_windows=settings.batch_windows,
        threads=default_threads(settings.threads, settings.max_concurrent),
        prepack=prepack,
    )




def status(store: ModelStore) -> dict[str, Any]:
    """:meth:`ModelStore.status` with each version's artifacts (``/api/model``, ``status``)."""

    def artifacts(version: VersionInfo, manifest: Manifest | None) -> dict[str, Any]:
        variants = recorded_variants(version)
        return {"artifacts": list_artifacts(store, manifest, variants) if variants and manifest is not None else {}}

    return store.status(artifacts)
