"""Load a stored version into a :class:`~shared.engine.question_answering.QAEngine`.

``memory`` mode streams each file from Blob into a buffer of its exact size, checking sha256
as the ranges arrive, and builds the model on tensors that *share* those buffers (safetensors
parsed in place, no copy, no file written): peak RSS is about the model size plus the runtime.
``disk`` mode keeps a verified copy under ``MODEL_CACHE_DIR/{revision}`` (written to a staging
folder, then renamed), re-hashed on every load and reused across restarts.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.question_answering import QAEngine
from ..engine.torch_model import engine_from_dir, engine_from_files
from ..errors import IntegrityError
from ..settings import ARTIFACT_VARIANTS, BACKENDS, LOAD_MODES, Settings
from ..store.model_files import Manifest, hash_file, utc_now
from ..store.model_store import ModelStore
from ..wire import wire_field

log = logging.getLogger(__name__)

CACHE_MARKER = ".verified-manifest.json"


@dataclass(frozen=True)
class Loaded:
    """What an instance has loaded (``GET /api/model``'s ``instance.loaded``)."""

    model_id: str = wire_field()
    revision: str = wire_field()
    mode: str = wire_field("memory: streamed into buffers; disk: a verified copy in MODEL_CACHE_DIR", schema={"enum": list(LOAD_MODES)})
    bytes: int = wire_field("of the version's files", schema={"minimum": 0})
    load_seconds: float = wire_field(schema={"minimum": 0})
    loaded_at: str = wire_field("ISO 8601 time, UTC")
    backend: str = wire_field(schema={"enum": list(BACKENDS)})
    variant: str = wire_field(schema={"enum": list(ARTIFACT_VARIANTS)})


@dataclass
class LoadedModel:
    """An engine and where it came from."""

    engine: QAEngine
    model_id: str
    revision: str
    mode: str
    bytes: int
    load_seconds: float
    backend: str = "torch"
    variant: str = "fp32"
    loaded_at: str = field(default_factory=utc_now)

    def describe(self) -> Loaded:
        return Loaded(
            model_id=self.model_id,
            revision=self.revision,
            mode=self.mode,
            bytes=self.bytes,
            load_seconds=round(self.load_seconds, 3),
            loaded_at=self.loaded_at,
            backend=self.backend,
            variant=self.variant,
        )


def load_version(
    store: ModelStore,
    revision: str,
    settings: Settings,
    *,
    manifest: Manifest | None = None,
    mode: str | None = None,
) -> LoadedModel:
    """Load ``revision`` of ``store`` the way ``settings`` say (``MODEL_LOAD_MODE``).

    ``manifest`` loads a staged version before its manifest is published (the refresh's
    validation); ``mode`` overrides the load mode.

    Raises:
        NotFoundError: the version is not complete.
        IntegrityError: a file's bytes do not match the manifest.
        UnsafeModelError: the model cannot be served (no QA head, no safetensors).
        StorageUnavailableError: storage could not be read.
    """
    began = time.monotonic()
    manifest = manifest or store.require_manifest(revision)
    mode = mode or settings.load_mode
    options = {"limits": settings.limits, "batch_windows": settings.batch_windows}
    if mode == "disk":
        assert settings.cache_dir is not None
        folder = cached_version(store, manifest, Path(settings.cache_dir))
        engine = engine_from_dir(folder, quantize=settings.quantize, **options)
    else:
        files = {entry.name: store.read_file(revision, entry) for entry in manifest.files}
        engine = engine_from_files(files, quantize=settings.quantize, **options)
    seconds = time.monotonic() - began
    log.info(
        "Loaded %s@%s (%s mode, %d bytes) in %.1fs, %.1f MB/s",
        manifest.model_id,
        revision,
        mode,
        manifest.total_bytes,
        seconds,
        manifest.total_bytes / max(seconds, 1e-6) / 1e6,
    )
    return LoadedModel(
        engine=engine,
        model_id=manifest.model_id,
        revision=revision,
        mode=mode,
        bytes=manifest.total_bytes,
        load_seconds=seconds,
        variant=settings.variant,
    )


# --- disk mode ---------------------------------------------------------------------------------


def cached_version(store: ModelStore, manifest: Manifest, cache_dir: Path) -> Path:
    """The verified local copy of a version, downloaded into the cache if needed.

    Every load re-hashes the cached files against the manifest; a bad copy is deleted and
    downloaded again.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / manifest.revision
    if _cache_is_intact(final, manifest):
        log.info("Using the cached copy of %s at %s", manifest.revision, final)
        return final
    if final.exists():
        log.warning("Cached copy of %s is damaged or incomplete; downloading again", manifest.revision)
        shutil.rmtree(final, ignore_errors=True)
    staging = cache_dir / f".{manifest.revision}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        store.download_version(manifest.revision, staging)
        (staging / CACHE_MARKER).write_bytes(manifest.to_json())
        try:
            os.replace(staging, final)
        except OSError:  # another process finished first: use its copy
            if not _cache_is_intact(final, manifest):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _cache_is_intact(folder: Path, manifest: Manifest) -> bool:
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        if Manifest.from_json(marker.read_bytes(), revision=manifest.revision).files != manifest.files:
            return False
    except IntegrityError:
        return False
    for entry in manifest.files:
        path = folder / entry.name
        if not path.is_file() or path.stat().st_size != entry.size or hash_file(path) != entry.sha256:
            return False
    return True
