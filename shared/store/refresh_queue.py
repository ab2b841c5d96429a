"""The refresh queue's message: what a refresh is asked to do, parsed from an HTTP body or a queue
message, and putting one on ``MODEL_REFRESH_QUEUE`` (base64 JSON, as the Functions queue trigger
expects). The serving side enqueues; the worker (``shared.refresh.worker``) consumes.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..errors import InputError, StorageUnavailableError
from ..settings import Settings
from ..wire import wire_field
from .model_files import utc_now
from .storage import queue_client, storage_errors

log = logging.getLogger(__name__)

REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")  # a Hub branch, tag or commit
# A revision a refresh may name: the pattern of check_hub_revision, and no ".." anywhere (it refuses those too).
REFRESH_REVISION_PATTERN = "^(?!.*\\.\\.)" + REVISION_RE.pattern.removeprefix("^")


@dataclass(frozen=True)
class RefreshOptions:
    """The body of ``POST /api/model/refresh`` (the document's ``RefreshRequest``): what the caller may ask."""

    wire_description: ClassVar[str] = "`{{}}` or an empty body refreshes to MODEL_REVISION; at most {max_operator_body_bytes} bytes"

    revision: str | None = wire_field("branch, tag or commit", default=None, optional=True, schema={"pattern": REFRESH_REVISION_PATTERN})
    unpin: bool = wire_field("move a pinned pointer", default=False, optional=True)
    repair: bool = wire_field("re-copy stored files whose bytes differ", default=False, optional=True)
    build_artifacts: bool = wire_field("build missing ONNX artifacts", default=False, optional=True)


@dataclass(frozen=True)
class RefreshRequest:
    """One queued refresh: an optional revision, whether it may move a pinned pointer, and why."""

    revision: str | None = None
    explicit: bool = False
    reason: str = "schedule"
    requested_at: str = field(default_factory=utc_now)
    repair: bool = False
    build_artifacts: bool = False
    unpin: bool = False  # also lift the pin of a pointer already at the revision (``explicit`` moves it elsewhere)

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
                unpin=bool(data.get("unpin", False)),
            )
        except (ValueError, AttributeError, TypeError) as err:
            raise InputError("the refresh message is not valid JSON") from err
        if request.revision is not None:
            check_hub_revision(request.revision)
        return request

    @classmethod
    def from_options(cls, options: RefreshOptions) -> RefreshRequest:
        """The queued refresh of a ``POST /api/model/refresh`` body (checked against its schema).

        Naming a revision (or ``unpin: true``) moves a pinned pointer; a bare refresh respects it.
        ``repair`` re-copies the stored files of the revision whose bytes differ from the source;
        ``build_artifacts`` builds the serving artifacts a complete version lacks.
        """
        return cls(
            revision=options.revision,
            explicit=options.revision is not None or options.unpin,
            reason="http",
            repair=options.repair,
            build_artifacts=options.build_artifacts,
            unpin=options.unpin,
        )


def check_hub_revision(revision: str) -> str:
    if not REVISION_RE.match(revision) or ".." in revision:
        raise InputError(f"{revision!r} is not a valid branch, tag or commit", field="revision")
    return revision


def enqueue(settings: Settings, request: RefreshRequest) -> str:
    """Put ``request`` on ``MODEL_REFRESH_QUEUE`` (created if missing); returns the message id.

    Raises:
        StorageUnavailableError: the queue's account (``AzureWebJobsStorage``, not the models') failed;
            its ``service`` is ``queue``, so that a terminal can name that endpoint (HTTP callers get
            no internal details).
    """
    conn = settings.require_queue_storage()
    client = queue_client(conn, settings.refresh_queue)
    try:
        with storage_errors(f"queueing the refresh on {settings.refresh_queue}"):
            ensure_queue(client)
            message = client.send_message(request.to_bytes())
    except StorageUnavailableError as err:
        raise type(err)(err.message, service="queue") from err.__cause__
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
