"""Error types of the project, each with the HTTP status and code it maps to.

Every error raised on purpose by ``shared`` derives from :class:`QAError`. Its ``message``
is safe to show to a caller; internal details (SDK exceptions, paths, hashes of other
tenants' data) go to logs through the exception chain (``raise ... from err``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .wire import Param, wire_field


@dataclass(frozen=True)
class ErrorDetail:
    """What went wrong: a fixed code (by HTTP status in the OpenAPI document) and a message safe to show."""

    code: str = wire_field(schema={"enum": Param("codes")})
    message: str = wire_field()


@dataclass(frozen=True)
class ErrorBody:
    """Every error's JSON body, on every route and on the command line (``--json``, ``answer``'s lines)."""

    error: ErrorDetail = wire_field()


class QAError(Exception):
    """Base of every error this project raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    retry_after: int | None = None  # seconds, sent as Retry-After with a 503

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after

    def body(self) -> ErrorBody:
        """This error as the JSON body of a response or an output line."""
        return ErrorBody(ErrorDetail(self.code, self.message))


class SettingsError(QAError, ValueError):
    """A setting (app setting or environment variable) is missing or has a bad value."""

    code = "bad_setting"


class InputError(QAError, ValueError):
    """The caller sent something invalid: bad JSON, wrong type, missing field, out of range."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TooLargeError(InputError):
    """The request is over one of the size budgets (characters, tokens, items, windows)."""

    status = 413
    code = "too_large"


class NotFoundError(QAError, LookupError):
    """A named thing (revision, version, route) does not exist."""

    status = 404
    code = "not_found"


class ConflictError(QAError):
    """The request conflicts with the current state (for example a concurrent writer)."""

    status = 409
    code = "conflict"


class RefreshAlreadyRunningError(ConflictError):
    """Another writer holds the lease on ``refresh.lock``."""

    code = "refresh_running"


class PreconditionFailedError(ConflictError):
    """The pointer changed between read and write (its ETag no longer matches)."""

    code = "pointer_changed"


class UnsafeModelError(QAError, ValueError):
    """A model source offers no safetensors weights, or names files that are not allowed."""

    status = 422
    code = "unsafe_model"


class IntegrityError(QAError):
    """Bytes read or written do not match their recorded sha256 or size."""

    status = 503
    code = "integrity_error"
    retry_after: int | None = 60


class RecordDamagedError(IntegrityError):
    """A JSON record of the store (``current.json``, a manifest, ``last-refresh.json``, an artifact
    record) is empty, does not parse, has the wrong shape or does not match its own checksum.
    ``record`` names it; ``repair`` is the command that brings it back. Waiting does not help."""

    code = "record_damaged"
    retry_after = None

    def __init__(self, message: str, *, record: str, repair: str) -> None:
        super().__init__(message)
        self.record = record
        self.repair = repair


class StorageUnavailableError(QAError, ConnectionError):
    """Blob Storage could not be reached or refused the request. ``service`` is the one that failed
    (``blob``: the models' account; ``queue``: the refresh queue's, ``AzureWebJobsStorage``)."""

    status = 503
    code = "storage_unavailable"
    retry_after = 30

    def __init__(self, message: str, *, retry_after: int | None = None, service: str = "blob") -> None:
        super().__init__(message, retry_after=retry_after)
        self.service = service


class StorageCredentialsError(StorageUnavailableError):
    """Storage answered, and refused the credentials (a wrong key, an identity without a role)."""


class SourceUnavailableError(QAError, ConnectionError):
    """The model source (the Hub) could not be reached or broke off a transfer."""

    status = 503
    code = "source_unavailable"
    retry_after = 60


class ModelNotReadyError(QAError):
    """No model is loaded yet, or the last load failed; the message says what to do."""

    status = 503
    code = "model_not_ready"
    retry_after = 10


class BusyError(QAError):
    """Every inference slot of this instance is taken; try again shortly."""

    status = 503
    code = "busy"
    retry_after = 2


class DeadlineExceededError(QAError):
    """The request ran out of its time budget (``QA_DEADLINE_SECONDS``)."""

    status = 503
    code = "deadline_exceeded"
    retry_after = 5


class ValidationFailedError(QAError):
    """A staged version failed its canary question; it is not published."""

    status = 422
    code = "validation_failed"
