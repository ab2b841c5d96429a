"""The refresh worker: the queue-triggered run of a refresh, and the canary checks.

The timer and ``POST /api/model/refresh`` only enqueue a message (``shared.store.refresh_queue``);
the queue-triggered worker runs the refresh, so it can outlive the 230 s HTTP limit. Only transient
failures (storage or Hub unreachable) are raised for the host to retry; a permanent failure or
"already running" is recorded and the message completed.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import (
    InputError,
    QAError,
    RefreshAlreadyRunningError,
    SourceUnavailableError,
    StorageUnavailableError,
    ValidationFailedError,
)
from ..memory import release_memory
from ..settings import Canary, Settings
from ..store.model_files import Manifest
from ..store.model_store import ModelStore
from ..store.refresh_queue import RefreshRequest
from .isolation import ArtifactBuilder, IsolationResult, TransferProgress, Validator, isolate

if TYPE_CHECKING:
    from ..engine.question_answering import QAEngine

log = logging.getLogger(__name__)

_PUNCTUATION = frozenset(string.punctuation)


def is_transient(err: BaseException) -> bool:
    """Whether retrying the same refresh later may succeed."""
    return isinstance(err, (StorageUnavailableError, SourceUnavailableError)) or not isinstance(err, QAError)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def canary_validator(settings: Settings) -> Validator | None:
    """A check that loads a staged version with the serving loader (memory mode) and answers
    ``MODEL_CANARY``: with an expected answer, a different one fails; without, any span passes.
    ``None`` when the canary is switched off (``--skip-canary``)."""
    from ..loading.versions import load_version

    canary = settings.canary
    if canary is None:
        return None

    def validate(store: ModelStore, manifest: Manifest) -> None:
        loaded = load_version(store, manifest.revision, settings, manifest=manifest, mode="memory")
        try:
            check_canary(loaded.engine, manifest, canary)
        finally:
            del loaded
            release_memory()  # the artifacts' build comes next: hand the model's pages back first

    return validate


def check_canary(engine: QAEngine, manifest: Manifest, canary: Canary, *, what: str = "") -> None:
    """Answer ``canary`` with ``engine``: no answer, or another answer than an expected one, fails.

    Raises:
        ValidationFailedError: naming the version (and ``what``, an artifact) and how to proceed.
    """
    from ..engine.question_answering import QAItem

    answers = engine.answer([QAItem(canary.question, canary.context)])[0]
    subject = f"Version {manifest.revision}{what}"
    how = (
        "; the staged files are kept and the next isolate resumes. Set MODEL_CANARY to a question this model answers "
        '(JSON {"question", "context", "answer"?}) or, from the command line, pass --skip-canary'
    )
    if not answers or not answers[0].answer.strip():
        raise ValidationFailedError(f"{subject} gave no answer to the canary question{how}")
    got = answers[0].answer
    expected = canary.expected_answer(manifest.model_id)
    if expected is not None and normalize_answer(got) != normalize_answer(expected):
        raise ValidationFailedError(f"{subject} answered the canary with {got!r}, expected {expected!r}; not published{how}")
    log.info("Canary passed for %s%s: %r (score %.3f)", manifest.revision, what, got, answers[0].score)


def artifact_canary(settings: Settings) -> Callable[[QAEngine, Manifest], None] | None:
    """The canary an ONNX artifact must answer as its version did; ``None`` when the canary is
    switched off (then the build does not load the artifact back at all)."""
    canary = settings.canary
    if canary is None:
        return None

    def check(engine: QAEngine, manifest: Manifest) -> None:
        check_canary(engine, manifest, canary, what=" (ONNX artifact)")

    return check


def artifact_builder(settings: Settings) -> ArtifactBuilder | None:
    """Builds the ONNX artifacts of ``MODEL_ARTIFACTS`` (``None`` when it is ``none``); each must
    answer the canary as the version did, else it is recorded unusable (the version still publishes)."""
    if not settings.artifacts:
        return None
    from .artifact_builds import build_artifacts

    def build(store: ModelStore, manifest: Manifest, *, rebuild: bool = False, build_missing: bool = True) -> dict[str, str]:
        return build_artifacts(
            store, manifest, settings, canary=artifact_canary(settings), rebuild=rebuild, build_missing=build_missing, verify_blobs=rebuild
        )

    return build


def run_refresh(
    settings: Settings, request: RefreshRequest, *, progress: TransferProgress | None = None, profile: str = "worker"
) -> IsolationResult:
    """Refresh the model from the Hub as ``request`` says (the queue worker and the CLI).

    Raises:
        RefreshAlreadyRunningError: another refresh holds the lock.
        QAError: the refresh failed (already recorded in ``last-refresh.json``).
    """
    from .hub import HubSource

    store = ModelStore.from_settings(settings, profile=profile)  # the queue worker's patient retries; a terminal's are short
    source = HubSource.from_settings(settings, revision=request.revision)
    return isolate(
        store,
        source,
        explicit=request.explicit,
        keep_versions=settings.keep_versions,
        validate=canary_validator(settings),
        progress=progress,
        repair=request.repair,
        reason=request.reason,
        build=artifact_builder(settings),
        build_existing=request.build_artifacts,
        unpin=request.unpin,
    )


def handle_message(settings: Settings, raw: bytes) -> IsolationResult | None:
    """The queue worker: run the refresh; raise only what is worth retrying.

    Returns:
        The result, or ``None`` when the message was completed without a run (already running,
        malformed, or a permanent failure, which ``isolate`` recorded).
    """
    try:
        request = RefreshRequest.from_bytes(raw)
    except InputError as err:
        log.error("Dropping a malformed refresh message: %s", err.message)
        return None
    try:
        return run_refresh(settings, request)
    except RefreshAlreadyRunningError:
        log.warning("A refresh is already running; this request (%s) is completed without a second run", request.reason)
        return None
    except Exception as err:
        if is_transient(err):
            log.warning("Refresh failed for a transient reason; the message will be retried", exc_info=True)
            raise
        log.error("Refresh failed for a permanent reason (recorded in last-refresh.json): %s", getattr(err, "message", err))
        return None
