"""The scheduled and on-demand refresh: queue messages, the worker's run, and the canary check.

The timer and ``POST /api/model/refresh`` only enqueue a message (base64 JSON, as the Functions
queue trigger expects); the queue-triggered worker runs the refresh, so it can outlive the 230 s
HTTP limit. Only transient failures (storage or Hub unreachable) are raised for the host to
retry; a permanent failure or "already running" is recorded and the message completed.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import (
    InputError,
    QAError,
    RefreshAlreadyRunningError,
    SourceUnavailableError,
    StorageUnavailableError,
    ValidationFailedError,
)
from .isolation import ArtifactBuilder, IsolationResult, TransferProgress, Validator, isolate
from .memory import release_memory
from .model_files import Manifest, utc_now
from .model_store import ModelStore
from .settings import Canary, Settings
from .storage import queue_client, storage_errors

if TYPE_CHECKING:
    from .question_answering import QAEngine

log = logging.getLogger(__name__)

_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class RefreshRequest:
    """One queued refresh: an optional revision, whether it may move a pinned pointer, and why."""

    revision: str | None = None
    explicit: bool = False
    reason: str = "schedule"
    requested_at: str = field(default_factory=utc_now)
    repair: bool = False
    build_artifacts: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> RefreshRequest:
        """Parse a queue message; a malformed one is an :class:`InputError` (permanent)."""
        try:
            data = json.loads(raw)
            request = cls(
                revision=data.get("revision"),
                explicit=bool(data.get("explicit", False)),
                reason=str(data.get("reason", "unknown")),
                requested_at=str(data.get("requested_at", "")),
                repair=bool(data.get("repair", False)),
                build_artifacts=bool(data.get("build_artifacts", False)),
            )
        except (ValueError, AttributeError, TypeError) as err:
            raise InputError("the refresh message is not valid JSON") from err
        if request.revision is not None:
            check_hub_revision(request.revision)
        return request

    @classmethod
    def from_request(cls, data: dict[str, Any]) -> RefreshRequest:
        """``POST /api/model/refresh`` body: ``{}`` or ``{"revision"?, "unpin"?, "repair"?, "build_artifacts"?}``.

        Naming a revision (or ``unpin: true``) moves a pinned pointer; a bare refresh respects it.
        ``repair`` re-copies the stored files of the revision whose bytes differ from the source;
        ``build_artifacts`` builds the serving artifacts a complete version lacks.
        """
        unknown = sorted(set(data) - {"revision", "unpin", "repair", "build_artifacts"})
        if unknown:
            raise InputError(f"unknown field {unknown[0]!r}; allowed: revision, unpin, repair, build_artifacts", field=unknown[0])
        revision = data.get("revision")
        if revision is not None:
            if not isinstance(revision, str):
                raise InputError("'revision' must be a string (branch, tag or commit)", field="revision")
            check_hub_revision(revision)
        flags = {}
        for name in ("unpin", "repair", "build_artifacts"):
            value = data.get(name, False)
            if not isinstance(value, bool):
                raise InputError(f"'{name}' must be true or false", field=name)
            flags[name] = value
        return cls(
            revision=revision,
            explicit=revision is not None or flags["unpin"],
            reason="http",
            repair=flags["repair"],
            build_artifacts=flags["build_artifacts"],
        )


def check_hub_revision(revision: str) -> str:
    if not _REVISION_RE.match(revision) or ".." in revision:
        raise InputError(f"{revision!r} is not a valid branch, tag or commit", field="revision")
    return revision


def enqueue(settings: Settings, request: RefreshRequest) -> str:
    """Put ``request`` on ``MODEL_REFRESH_QUEUE`` (created if missing); returns the message id."""
    client = queue_client(settings.require_queue_storage(), settings.refresh_queue)
    with storage_errors("queueing the refresh"):
        ensure_queue(client)
        message = client.send_message(request.to_bytes())
    log.info("Queued a refresh (%s, revision=%s, explicit=%s)", request.reason, request.revision, request.explicit)
    return str(message.id)


def ensure_queue(client: Any) -> None:
    """Create the refresh queue if missing. An identity allowed only to send messages (the deploying
    user: Storage Queue Data Message Sender) gets 403 here on a queue infra/ already created: go on."""
    from azure.core.exceptions import HttpResponseError, ResourceExistsError

    try:
        client.create_queue()
    except ResourceExistsError:
        pass
    except HttpResponseError as err:
        if err.status_code != 403:
            raise
        log.info("Not allowed to create the refresh queue (403); sending to it as it is")


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
    from .model_loader import load_version

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
    from .question_answering import QAItem

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
    from .artifacts import build_artifacts

    def build(store: ModelStore, manifest: Manifest) -> dict[str, str]:
        return build_artifacts(store, manifest, settings, canary=artifact_canary(settings))

    return build


def run_refresh(settings: Settings, request: RefreshRequest, *, progress: TransferProgress | None = None) -> IsolationResult:
    """Refresh the model from the Hub as ``request`` says (the queue worker and the CLI).

    Raises:
        RefreshAlreadyRunningError: another refresh holds the lock.
        QAError: the refresh failed (already recorded in ``last-refresh.json``).
    """
    from .hub import HubSource

    store = ModelStore.from_settings(settings)
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
