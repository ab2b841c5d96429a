"""Build a version's ONNX serving artifacts from its verified files, check each with the canary,
and store it with its record (``shared.loading.onnx_artifacts`` describes the layout and loads them).

A failure of one variant never fails the version: a model the exporter cannot handle, or an
artifact that does not answer the canary, gets a record with ``usable: false`` and the reason, so
serving falls back to torch without retrying the build on every load.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

from ..engine.question_answering import QAEngine
from ..errors import IntegrityError, NotFoundError, QAError, StorageUnavailableError, UnsafeModelError
from ..loading.onnx_artifacts import (
    ARTIFACT_FILES,
    ARTIFACT_RECORD,
    ARTIFACTS_FOLDER,
    ArtifactDamagedError,
    ArtifactRecord,
    ArtifactState,
    artifact_blob,
    artifact_engine,
    artifact_state,
    partwise_artifact_engine,
    repair_command,
    stored_artifact,
    weights_stream,
)
from ..memory import release_memory
from ..settings import Settings
from ..store.model_files import FileEntry, Manifest, version_repair
from ..store.model_store import ModelStore
from ..store.storage import storage_errors
from ..store.transfer import PlacedUpload
from .onnx_weights import WEIGHTS_FILE

log = logging.getLogger(__name__)

CanaryCheck = Callable[[QAEngine, Manifest], None]


def build_artifacts(
    store: ModelStore,
    manifest: Manifest,
    settings: Settings,
    *,
    variants: tuple[str, ...] | None = None,
    canary: CanaryCheck | None = None,
    progress: Callable[[str], None] | None = None,
    rebuild: bool = False,
    build_missing: bool = True,
    verify_blobs: bool = False,
) -> dict[str, str]:
    """Build, check and store the ONNX artifacts a complete (or staged, validated) version lacks.

    Args:
        store, manifest: the version; its files must already verify.
        settings: ``MODEL_ARTIFACTS`` gives the variants unless ``variants`` does.
        canary: answers the canary with an artifact's engine; raises :class:`QAError` when the
            answer is wrong (the artifact is then recorded unusable). ``None``: no canary.
        progress: told each step, for a terminal.
        rebuild: build again each damaged or unusable artifact (``build-artifacts --rebuild``,
            a repair). Its record stays until the new artifact is built and checked, then is replaced
            (If-Match on the record that was judged): a rebuild that fails leaves it as it was.
        build_missing: build the variants that have no record (``False``: a repair of a version
            that never had artifacts does not start exporting).
        verify_blobs: re-hash an existing artifact's blobs (else only its record is checked).

    Returns:
        Per variant: ``built``, ``rebuilt``, ``exists`` (a sound record was already there; from a
        concurrent builder too), ``unusable: <reason>``, ``damaged: <what>`` (not rebuilt: pass
        ``rebuild``), or ``missing`` (not built: ``build_missing`` is off). A failure of one
        variant never fails the version or the other variant.

    Raises:
        StorageUnavailableError: storage failed (the refresh's usual retry applies).
    """
    wanted = variants if variants is not None else settings.artifacts
    outcomes: dict[str, str] = {}
    todo: list[ArtifactState] = []
    for variant in wanted:
        state = artifact_state(store, manifest, variant, verify_blobs=verify_blobs)
        if state.state == "ok":
            outcomes[variant] = "exists"
        elif state.state == "missing":
            if build_missing:
                todo.append(state)
            else:
                outcomes[variant] = "missing"
        elif rebuild:
            log.warning("Rebuilding the %s artifact of %s (%s): %s", variant, manifest.revision, state.state, state.message)
            todo.append(state)
        elif state.state == "unusable":
            outcomes[variant] = f"unusable: {state.message} (recorded; build it again with python -m shared build-artifacts --rebuild)"
        else:
            outcomes[variant] = f"damaged: {state.blob}: {state.message}; rebuild it: {repair_command(manifest.revision)}"
    for state in todo:
        try:
            outcome = _build_one(store, manifest, state.variant, settings, canary, progress, replacing=state.etag)
        except ArtifactDamagedError:
            raise
        except IntegrityError as err:  # the version's own files, read before anything is written
            raise IntegrityError(
                f"{err.message}: the version's own files do not verify, so its artifacts cannot be built (they were left as "
                f"they were); repair the version first: {_version_repair(store, manifest)}"
            ) from err
        outcomes[state.variant] = "rebuilt" if outcome == "built" and state.state != "missing" else outcome
        release_memory()
    return outcomes


def _version_repair(store: ModelStore, manifest: Manifest) -> str:
    return version_repair(
        manifest.revision, manifest.source, manifest.source_revision, model_id=manifest.model_id, provenance=manifest.provenance
    )


def _build_one(
    store: ModelStore,
    manifest: Manifest,
    variant: str,
    settings: Settings,
    canary: CanaryCheck | None,
    progress: Callable[[str], None] | None,
    *,
    replacing: str | None = None,
) -> str:
    """Build, check and record one variant; ``replacing``: the ETag of the record it replaces (a rebuild)."""
    placed = store.placed_upload(manifest.revision, f"{ARTIFACTS_FOLDER}/{variant}", WEIGHTS_FILE)
    try:
        return _build_placed(store, manifest, variant, settings, canary, progress, placed, replacing=replacing)
    finally:
        placed.close()  # blocks of a build that stopped are never committed


def _build_placed(
    store: ModelStore,
    manifest: Manifest,
    variant: str,
    settings: Settings,
    canary: CanaryCheck | None,
    progress: Callable[[str], None] | None,
    placed: PlacedUpload,
    *,
    replacing: str | None,
) -> str:
    from .onnx_export import OnnxArtifact, StreamedArtifact, build_fp32, build_int8

    began = time.monotonic()
    say = progress or (lambda _: None)
    say(f"exporting {variant}")
    # Straight from storage, sha256-checked as the bytes stream in: no temporary copy on disk (Flex
    # has 0.8 GB of it). fp32: the graph is exported over placeholder weights and each tensor of
    # weights.bin staged as blocks of its blob as the checkpoint streams in (the build never holds
    # the file: a 2 GB instance could not hold it beside torch). int8: from the version's fp32
    # artifact when it has a usable one (just built, before it), else from an fp32 build in memory.
    try:
        if variant == "fp32":
            artifact = build_fp32(_store_source(store, manifest), say, place=placed.put)
        else:
            fp32 = _stored_fp32(store, manifest, settings, say)
            if fp32 is None:
                fp32 = build_fp32(_store_source(store, manifest), say)
            tokenizer_json = next((store.read_file(manifest.revision, f) for f in manifest.files if f.name == "tokenizer.json"), None)
            if tokenizer_json is None:
                raise UnsafeModelError("the version has no tokenizer.json; the ONNX path reads the tokenizer from it alone")
            try:
                artifact = build_int8(fp32, tokenizer_json, progress=say)
            except ArtifactDamagedError as err:  # the stored fp32 weights did not verify as they streamed
                if not isinstance(fp32, StreamedArtifact):
                    raise
                log.warning(
                    "The fp32 artifact of %s did not verify while int8 read it (%s): int8 is built from a new export",
                    manifest.revision,
                    err,
                )
                say("the fp32 artifact did not verify: exporting fp32 again for int8")
                fp32 = build_fp32(_store_source(store, manifest), say)
                artifact = build_int8(fp32, tokenizer_json, progress=say)
            del fp32
    except (MemoryError, StorageUnavailableError, IntegrityError):
        raise  # as before the weights streamed during the build: storage, not the model
    except UnsafeModelError as err:  # the model itself: the same every time, so record it
        return _write_unusable(store, manifest, variant, f"the exporter cannot handle this model: {err.message}", replacing=replacing)
    except Exception as err:
        log.exception("Export of the %s artifact of %s failed", variant, manifest.revision)
        return f"unusable: export failed ({type(err).__name__}); not recorded, the next build tries again"
    finally:
        release_memory()
    assert isinstance(artifact, OnnxArtifact)
    engine_record = artifact.record
    entries = []
    for name in ARTIFACT_FILES:
        if name == WEIGHTS_FILE and artifact.placed_weights is not None:
            say(f"committing {variant}/{name} ({artifact.placed_weights} bytes) and reading it back for its sha256")
            entry = FileEntry(name=name, size=artifact.placed_weights, sha256=placed.commit(artifact.placed_weights))
            entries.append(entry)
            continue
        data = artifact.files.pop(name)
        entry = FileEntry(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        say(f"uploading {variant}/{name} ({entry.size} bytes)")
        store.upload_folder_file(manifest.revision, f"{ARTIFACTS_FOLDER}/{variant}", entry, data)
        entries.append(entry)
        del data
    del artifact
    release_memory()
    record = ArtifactRecord.of_version(manifest, variant, usable=True, files=tuple(entries), engine=engine_record)
    if canary is not None:
        # the canary reads back what was stored, through the serving loader's own path
        say(f"answering the canary with {variant}")
        try:
            # the weights served from the download itself (a repacked copy would set the refresh's
            # peak), or, where QA_MEMORY_MB leaves no room for them beside the build's runtime, run
            # part by part as they stream in again
            engine = partwise_artifact_engine(store, manifest, record, settings)
            canary(engine or artifact_engine(store, manifest, record, settings, prepack=False), manifest)
        except StorageUnavailableError:
            raise
        except QAError as err:
            return _write_unusable(store, manifest, variant, f"the canary failed: {err.message}", files=record.files, replacing=replacing)
        except Exception as err:
            log.exception("The %s artifact of %s failed to load or answer", variant, manifest.revision)
            reason = f"it failed to load or answer ({type(err).__name__})"
            return _write_unusable(store, manifest, variant, reason, files=record.files, replacing=replacing)
        finally:
            release_memory()
    outcome = _write_record(store, manifest, record, replacing=replacing)
    log.info(
        "Built the %s artifact of %s@%s (%d bytes) in %.1fs",
        variant, manifest.model_id, manifest.revision, record.total_bytes, time.monotonic() - began,
    )  # fmt: skip
    return outcome


def _store_source(store: ModelStore, manifest: Manifest) -> Any:
    """The version's files as the export reads them: the small ones in memory, each ``.safetensors``
    streamed from storage (its header read first, by range; the whole file sha256-checked as it flows).

    Raises:
        StorageUnavailableError: storage could not be read.
        IntegrityError: a small file does not match its sha256.
    """
    from .onnx_export import ModelSource, WeightFile
    from .onnx_weights import header_length

    source = ModelSource(files={}, where=f"version {manifest.revision}")
    for entry in manifest.files:
        if not entry.name.endswith(".safetensors"):
            source.files[entry.name] = store.read_file(manifest.revision, entry)
            continue
        blob = store.file_blob(manifest.revision, entry.name)
        with storage_errors(f"reading the header of {entry.name}"):
            length = header_length(blob.download_blob(offset=0, length=8).readall())
            header = blob.download_blob(offset=8, length=length).readall()

        def stream(sink: Callable[[memoryview], object], restart: Callable[[], object], entry: FileEntry = entry) -> None:
            store.stream_file(manifest.revision, entry, sink, restart=restart)

        source.weights.append(WeightFile(entry.name, header, stream))
    return source


def _stored_fp32(store: ModelStore, manifest: Manifest, settings: Settings, say: Callable[[str], None]) -> Any:
    """The version's usable fp32 artifact, read back (verified) into memory the int8 build may spend;
    where ``QA_MEMORY_MB`` does not leave room for its weights twice, a
    :class:`~shared.refresh.onnx_export.StreamedArtifact` instead (its weights read as they are needed)."""
    from ..engine.onnx_runner import prepack_fits
    from .onnx_export import OnnxArtifact, StreamedArtifact

    state = artifact_state(store, manifest, "fp32")
    weights = next((f for f in state.record.files if f.name == WEIGHTS_FILE), None) if state.record is not None else None
    if state.state == "ok" and state.record is not None and weights is not None and not prepack_fits(weights.size, settings.memory_mb):
        record = state.record
        graph = next(f for f in record.files if f.name != WEIGHTS_FILE)
        try:
            data = store.read_file(manifest.revision, graph, blob=artifact_blob(store, manifest.revision, "fp32", graph.name))
        except (IntegrityError, NotFoundError):
            return None
        say("streaming the fp32 artifact for int8")
        return StreamedArtifact(bytes(data), dict(record.engine), weights.size, weights_stream(store, manifest, record))
    found = stored_artifact(store, manifest, "fp32")
    if found is None:
        return None
    record, files = found
    say("reading the fp32 artifact back for int8")
    return OnnxArtifact(files=dict(files), record=dict(record.engine))


def _write_unusable(
    store: ModelStore,
    manifest: Manifest,
    variant: str,
    reason: str,
    *,
    files: tuple[FileEntry, ...] = (),
    replacing: str | None = None,
) -> str:
    log.warning("The %s artifact of %s is unusable: %s", variant, manifest.revision, reason)
    record = ArtifactRecord.of_version(manifest, variant, usable=False, files=files, engine={}, reason=reason)
    outcome = _write_record(store, manifest, record, replacing=replacing)
    return outcome if outcome == "exists" else f"unusable: {reason}"


def _write_record(store: ModelStore, manifest: Manifest, record: ArtifactRecord, *, replacing: str | None = None) -> str:
    """Write ``artifact.json`` last: If-None-Match for a new artifact (a concurrent builder's record
    wins: ``exists``), If-Match on ``replacing`` for a rebuild (a record changed meanwhile wins too)."""
    from azure.core import MatchConditions

    raw = record.to_json()
    blob = artifact_blob(store, manifest.revision, record.variant, ARTIFACT_RECORD)
    conditions: dict[str, Any] = (
        {"overwrite": False}
        if replacing is None
        else {"overwrite": True, "etag": replacing, "match_condition": MatchConditions.IfNotModified}
    )
    try:
        with storage_errors(f"writing the {record.variant} artifact record"):
            blob.upload_blob(raw, metadata={"sha256": hashlib.sha256(raw).hexdigest()}, **conditions)
    except StorageUnavailableError as err:
        if isinstance(err.__cause__, (ResourceExistsError, ResourceModifiedError)):
            return "exists"
        raise
    return "built"
