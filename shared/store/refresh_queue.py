"""The refresh queue's message: what a refresh is asked to do, parsed from an HTTP body or a queue
message, and putting one on ``MODEL_REFRESH_QUEUE`` (base64 JSON, as the Functions queue trigger
expects). The serving side enqueues; the worker (``shared.refresh.worker``) consumes.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError, StorageUnavailableError
from ..settings import Settings
from .model_files import utc_now
from .storage import queue_client, storage_errors

log = logging.getLogger(__name__)

REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")  # a Hub branch, tag or commit


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
            unpin=flags["unpin"],
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
