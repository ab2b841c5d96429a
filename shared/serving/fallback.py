"""Which version and which backend a serving load ends up with: the fallback walk.

Order: the current version's ONNX artifact (``QA_BACKEND=onnx``, in the ``QA_QUANTIZE`` variant),
then its safetensors through torch, then the same for each earlier complete version, newest
isolation first. Earlier versions are tried only when the current one is *damaged* (its files fail
verification): any other failure of the current version is the real problem and is not hidden.
A storage outage or bad settings stop the walk at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import IntegrityError, QAError, SettingsError, StorageUnavailableError
from ..loading.versions import LoadedModel
from ..settings import Settings
from ..store.model_files import Manifest, Pointer, utc_now
from ..store.model_store import ModelStore
from ..telemetry import log_event

log = logging.getLogger(__name__)

Loader = Callable[[ModelStore, str, Settings], LoadedModel]
ArtifactLoader = Callable[[ModelStore, Manifest, str, Settings], LoadedModel]


@dataclass
class Walk:
    """The outcome of one walk: what loaded (or the error to report), and what was refused first."""

    loaded: LoadedModel | None = None
    error: QAError | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)  # each refused (revision, backend, variant) with its error
    damaged: dict[str, Any] | None = None  # the current version's verification failure, if that was the reason


def candidates(store: ModelStore, pointer: Pointer) -> Iterator[str]:
    """The current revision, then earlier complete versions, newest isolation first (read lazily:
    the usual load never lists the container)."""
    yield pointer.revision
    order = [m.revision for m in store.publication_order()]
    earlier = order[order.index(pointer.revision) + 1 :] if pointer.revision in order else order
    yield from (r for r in earlier if r != pointer.revision)


def backends(settings: Settings, *, onnx: bool) -> list[tuple[str, str]]:
    """The (backend, variant) pairs to try for one version, in order; ``onnx``: an artifact loader exists."""
    variant = settings.variant
    if settings.backend == "onnx" and onnx:
        return [("onnx", variant), ("torch", variant)]
    return [("torch", variant)]


def load_best(
    store: ModelStore,
    pointer: Pointer,
    settings: Settings,
    *,
    loader: Loader,
    artifact_loader: ArtifactLoader | None,
) -> Walk:
    """Walk the fallback order; the first load that works wins.

    Returns:
        A :class:`Walk` with ``loaded`` set, or with ``error``: the current version's own error
        when nothing could be loaded.

    Raises:
        StorageUnavailableError, SettingsError: at once (no fallback hides an outage).
    """
    walk = Walk()
    for revision in candidates(store, pointer):
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
                if walk.error is None or (backend == "torch" and revision == pointer.revision):
                    walk.error = err  # the current version's own (torch) error names the real problem
                walk.tried.append({"revision": revision, "backend": backend, "variant": variant, "code": err.code, "message": err.message})
                log_event(
                    log, "model_load", level=logging.WARNING, model_id=store.model_id, revision=revision, backend=backend,
                    variant=variant, mode=settings.load_mode, bytes=0, seconds=time.monotonic() - began, outcome="failed",
                    error_code=err.code,
                )  # fmt: skip
                if backend == "torch" and isinstance(err, IntegrityError) and revision == pointer.revision:
                    walk.damaged = {"revision": revision, "code": err.code, "message": err.message, "at": utc_now(), "next_check_at": None}
                continue
            log_event(
                log, "model_load", model_id=loaded.model_id, revision=loaded.revision, backend=loaded.backend,
                variant=loaded.variant, mode=loaded.mode, bytes=loaded.bytes, seconds=loaded.load_seconds, outcome="ok",
                error_code=None,
            )  # fmt: skip
            walk.loaded, walk.error = loaded, None
            return walk
        if walk.damaged is None and revision == pointer.revision:
            break  # the current version is not damaged: an earlier one would hide a real problem
    assert walk.error is not None
    return walk
