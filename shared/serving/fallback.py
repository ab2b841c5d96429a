"""Which version and which backend a serving load ends up with: the fallback walk.

Order: the version the pointer names (or, when ``current.json`` is damaged or missing, its last
recorded value), its ONNX artifact first (``QA_BACKEND=onnx``, in the ``QA_QUANTIZE`` variant), then
its safetensors through torch; then the same for each earlier value of the pointer's history, then
any other intact version, newest isolation first (:meth:`ModelStore.serving_order`). Earlier
versions are tried only when that version is *damaged* or gone (its files or its manifest fail
verification): any other failure is the real problem and is not hidden. A storage outage or bad
settings stop the walk at once.

What makes the result *degraded* is listed as ``problems``, each with its repair: a damaged pointer,
a damaged current version, an artifact that was expected (``MODEL_ARTIFACTS``) and could not serve.
An artifact the settings never asked for is not a problem, and its absence is not logged as a failed load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import IntegrityError, NotFoundError, QAError, RecordDamagedError, SettingsError, StorageUnavailableError
from ..loading.onnx_artifacts import build_command, repair_command
from ..loading.versions import LoadedModel
from ..settings import Settings
from ..store.model_files import Manifest, utc_now, version_repair
from ..store.model_store import ModelStore, PointerState
from ..telemetry import log_event

log = logging.getLogger(__name__)

Loader = Callable[[ModelStore, str, Settings], LoadedModel]
ArtifactLoader = Callable[[ModelStore, Manifest, str, Settings], LoadedModel]


@dataclass
class Walk:
    """The outcome of one walk: what loaded (or the error to report), what was refused first, and
    why what loaded is not what was asked for."""

    loaded: LoadedModel | None = None
    error: QAError | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)  # each refused (revision, backend, variant) with its error
    damaged: dict[str, Any] | None = None  # the pointer's version failed verification (or is gone), if that was the reason
    problems: list[dict[str, Any]] = field(default_factory=list)  # why the load is degraded: {cause, problem, repair}


def candidates(store: ModelStore, state: PointerState) -> Iterator[str]:
    """The pointer's revision, then the rest of :meth:`ModelStore.serving_order` (read lazily: the
    usual load never lists the container)."""
    first = state.effective.revision if state.effective is not None else None
    if first is not None:
        yield first
    yield from (r for r in store.serving_order(state) if r != first)


def backends(settings: Settings, *, onnx: bool) -> list[tuple[str, str]]:
    """The (backend, variant) pairs to try for one version, in order; ``onnx``: an artifact loader exists."""
    if settings.backend == "onnx" and onnx:
        return [("onnx", settings.variant), ("torch", settings.variant)]
    return [("torch", settings.variant)]


def load_best(
    store: ModelStore,
    state: PointerState,
    settings: Settings,
    *,
    loader: Loader,
    artifact_loader: ArtifactLoader | None,
) -> Walk:
    """Walk the fallback order; the first load that works wins.

    Returns:
        A :class:`Walk` with ``loaded`` set, or with ``error``: the pointer's version's own error
        when nothing could be loaded.

    Raises:
        StorageUnavailableError, SettingsError: at once (no fallback hides an outage).
    """
    walk = Walk()
    first = state.effective.revision if state.effective is not None else None
    for revision in candidates(store, state):
        for backend, variant in backends(settings, onnx=artifact_loader is not None):
            began = time.monotonic()
            try:
                if backend == "onnx":
                    assert artifact_loader is not None
                    loaded = artifact_loader(store, store.require_manifest(revision), variant, settings)
                else:
                    loaded = loader(store, revision, settings)
            except (StorageUnavailableError, SettingsError):
                raise
            except QAError as err:
                _refused(walk, store, revision, backend, variant, err, first=first, settings=settings, seconds=time.monotonic() - began)
                continue
            log_event(
                log, "model_load", model_id=loaded.model_id, revision=loaded.revision, backend=loaded.backend,
                variant=loaded.variant, mode=loaded.mode, bytes=loaded.bytes, seconds=loaded.load_seconds, outcome="ok",
                error_code=None,
            )  # fmt: skip
            walk.loaded, walk.error = loaded, None
            walk.problems = problems_of(walk, store, state, settings)
            return walk
        if walk.damaged is None and first is not None and revision == first:
            break  # the pointer's version is not damaged: an earlier one would hide a real problem
    assert walk.error is not None
    return walk


def _refused(
    walk: Walk,
    store: ModelStore,
    revision: str,
    backend: str,
    variant: str,
    err: QAError,
    *,
    first: str | None,
    settings: Settings,
    seconds: float,
) -> None:
    """Note one refused load: in ``tried``, in a failed ``model_load`` event (unless it is an artifact
    the settings never asked for), and as the pointer's version's damage when it is that."""
    current = first is None or revision == first
    if walk.error is None or (backend == "torch" and revision == first):
        walk.error = err  # the pointer's version's own (torch) error names the real problem
    walk.tried.append({"revision": revision, "backend": backend, "variant": variant, "code": err.code, "message": err.message})
    unasked = backend == "onnx" and isinstance(err, NotFoundError) and variant not in settings.artifacts
    if unasked:
        log.debug("Version %s has no %s ONNX artifact (MODEL_ARTIFACTS does not ask for one)", revision, variant)
    else:
        log_event(
            log, "model_load", level=logging.WARNING, model_id=store.model_id, revision=revision, backend=backend,
            variant=variant, mode=settings.load_mode, bytes=0, seconds=seconds, outcome="failed", error_code=err.code,
        )  # fmt: skip
    if backend == "torch" and current and walk.damaged is None and isinstance(err, (IntegrityError, NotFoundError)):
        walk.damaged = {
            "revision": revision,
            "code": err.code,
            "message": err.message,
            "repair": err.repair if isinstance(err, RecordDamagedError) else _version_repair(store, revision),
            "at": utc_now(),
            "next_check_at": None,
        }


def _version_repair(store: ModelStore, revision: str) -> str:
    try:
        facts = store.manifest_facts(revision)
    except QAError:
        facts = {}
    return version_repair(revision, facts.get("source"), facts.get("source_revision"))


def problems_of(walk: Walk, store: ModelStore, state: PointerState, settings: Settings) -> list[dict[str, Any]]:
    """Why what ``walk`` loaded is not what was asked for, each ``{cause, problem, repair}``."""
    loaded = walk.loaded
    assert loaded is not None
    found: list[dict[str, Any]] = []
    if state.damage is not None:
        found.append({"cause": "pointer", "problem": f"{state.damage.message}; serving {loaded.revision}", "repair": state.damage.repair})
    if walk.damaged is not None and walk.damaged["revision"] != loaded.revision:
        found.append(
            {
                "cause": "version",
                "problem": f"the current version {walk.damaged['revision']} cannot be served ({walk.damaged['message']}); "
                f"serving {loaded.revision}",
                "repair": walk.damaged["repair"],
            }
        )
    for tried in walk.tried:
        if tried["revision"] != loaded.revision or tried["backend"] != "onnx" or loaded.backend == "onnx":
            continue
        missing = tried["code"] == "not_found"
        if missing and tried["variant"] not in settings.artifacts:
            continue
        what = "is missing (MODEL_ARTIFACTS expects it)" if missing else f"cannot serve: {tried['message']}"
        found.append(
            {
                "cause": "artifact",
                "problem": f"the {tried['variant']} ONNX artifact of {loaded.revision} {what}; serving torch",
                "repair": build_command(loaded.revision) if missing else repair_command(loaded.revision),
            }
        )
    return found
