"""What each HTTP route does, as plain data in and out (``function_app.py`` only wraps it).

Every error becomes ``{"error": {"code", "message"}}`` with the status of its type (400 bad
input, 404, 409, 413 too large, 503 not ready + Retry-After); anything unexpected is a 500 whose
details stay in the logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..engine.question_answering import QAItem
from ..errors import QAError
from ..loading import onnx_artifacts
from ..store.refresh_queue import RefreshOptions, RefreshRequest, enqueue
from ..telemetry import log_event
from ..wire import to_json
from .holder import ModelHolder
from .openapi import document
from .playground import FileResponse
from .shapes import ModelStatus, RefreshQueued, RollbackBody, RollbackResult, Served, ask_response
from .validation import check_ask, check_body, check_query, parse_json_object

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiResponse:
    """Status, JSON body and extra headers of one response."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_response(err: BaseException) -> ApiResponse:
    """The one place an exception becomes a response."""
    if isinstance(err, QAError):
        if err.status >= 500:
            log.warning("Request failed: %s (%s)", err.code, err.message)
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after and err.status == 503 else {}
        return ApiResponse(err.status, to_json(err.body()), headers)
    log.error("Unexpected error while handling a request", exc_info=err)
    return ApiResponse(500, to_json(QAError("Internal error; see the logs").body()))


_Response = TypeVar("_Response", ApiResponse, FileResponse, ApiResponse | FileResponse)


def guarded(handler: Callable[[], _Response]) -> _Response | ApiResponse:
    """Run a route's work, turning any exception into its error response."""
    try:
        return handler()
    except Exception as err:  # noqa: BLE001 - every failure gets a JSON answer; QAErrors keep their status
        return error_response(err)


@dataclass
class AskTrace:
    """What one ``/api/ask`` request got to, for its ``event=ask`` line, whatever its outcome."""

    items: int = 0
    stats: dict[str, int] = field(default_factory=dict)  # the engine's: ``windows``
    model_ms: float | None = None
    model: dict[str, str] = field(default_factory=dict)  # model_id, revision, backend, variant of the model that was there


def ask_request(holder: ModelHolder, body: bytes) -> ApiResponse:
    """``POST /api/ask`` as the route answers it: :func:`ask`'s response or its error, and ONE
    ``event=ask`` line for every outcome (200, 400, 413, 503 busy or not ready, 500) with its
    status and error code, so that the KQL of docs/operations.md counts every request."""
    started = time.monotonic()
    trace = AskTrace()
    response = guarded(lambda: ask(holder, body, trace=trace))
    error = response.body.get("error") if response.status >= 400 else None
    log_event(
        log, "ask", status=response.status, error_code=error.get("code") if isinstance(error, dict) else None,
        items=trace.items, windows=trace.stats.get("windows", 0), seconds=time.monotonic() - started, model_ms=trace.model_ms,
        model_id=trace.model.get("model_id"), revision=trace.model.get("revision"), backend=trace.model.get("backend"),
        variant=trace.model.get("variant"),
    )  # fmt: skip
    return response


def _item_count(data: Mapping[str, Any]) -> int:
    items = data.get("items")
    return len(items) if isinstance(items, list) else 0 if "items" in data else 1


def ask(holder: ModelHolder, body: bytes, *, trace: AskTrace | None = None) -> ApiResponse:
    """``POST /api/ask``: validate (:func:`~shared.serving.validation.check_ask`), then :func:`answer`;
    ``trace`` receives how far the request got (see :func:`ask_request`, which logs it).

    Raises:
        QAError: bad input (400, 413), no model or no free slot in time (503), the deadline (503).
    """
    trace = trace if trace is not None else AskTrace()
    started = time.monotonic()
    limits = holder.settings.limits
    data = parse_json_object(body, max_bytes=limits.max_ask_body_bytes)
    trace.items = _item_count(data)
    items, batch = check_ask(limits, data)
    return answer(holder, items, batch=batch, deadline=started + holder.settings.deadline_seconds, trace=trace)


def answer(holder: ModelHolder, items: list[QAItem], *, batch: bool, deadline: float, trace: AskTrace | None = None) -> ApiResponse:
    """Checked items answered by the current model within ``deadline`` (``time.monotonic()``): the
    200 of ``/api/ask``, also what ``python -m shared ask`` prints.

    Raises:
        QAError: no model or no free slot in time (503), the deadline (503), a limit of the engine (413).
    """
    trace = trace if trace is not None else AskTrace()
    with holder.model(deadline) as loaded:
        served = Served(model_id=loaded.model_id, revision=loaded.revision, backend=loaded.backend, variant=loaded.variant)
        trace.model = to_json(served)
        with holder.inference_slot(deadline):
            inference_started = time.perf_counter()
            results = loaded.engine.answer(items, deadline=deadline, stats=trace.stats)
            inference_ms = (time.perf_counter() - inference_started) * 1000
            trace.model_ms = inference_ms
    # the model's time alone, so a caller can tell it from queueing, loading and the network
    timing = {"Server-Timing": f"model;dur={inference_ms:.1f}"}
    return ApiResponse(200, to_json(ask_response(results, items, served, batch=batch)), timing)


def health(holder: ModelHolder, *, params: Mapping[str, str]) -> ApiResponse:
    """``GET /api/health``: 200 when a model is loaded, 503 with a fixed state code otherwise;
    ``?warm=1`` (``true``, ``yes``) starts a load, a value outside the documented enum is a 400."""
    if check_query("health", params).get("warm") in ("1", "true", "yes"):
        try:
            holder.warm()
        except QAError:
            pass  # the state below says "empty"; reasons are for /api/model and the logs
    body = holder.health()
    if body["state"] == "ready":
        return ApiResponse(200, body)
    return ApiResponse(503, body, {"Retry-After": "10"})


def model_status(holder: ModelHolder) -> ApiResponse:
    """``GET /api/model``: pointer, versions, last refresh, and what this instance loaded."""
    store_status = onnx_artifacts.status(holder.store, expected=holder.settings.artifacts)
    return ApiResponse(200, to_json(ModelStatus.of(store_status, holder.instance())))


def request_refresh(holder: ModelHolder, body: bytes) -> ApiResponse:
    """``POST /api/model/refresh``: queue a refresh (optional revision); 202 + where to look."""
    options = check_body(holder.settings.limits, RefreshOptions, _small_json_body(holder, body))
    request = RefreshRequest.from_options(options)
    message_id = enqueue(holder.settings, request)
    queued = RefreshQueued(
        status="queued",
        message_id=message_id,
        queue=holder.settings.refresh_queue,
        revision=request.revision,
        moves_pinned_pointer=request.explicit,
        repair=request.repair,
        build_artifacts=request.build_artifacts,
        result="GET /api/model shows last_refresh once the worker has run",
    )
    return ApiResponse(202, to_json(queued), {"Location": "/api/model"})


def rollback(holder: ModelHolder, body: bytes) -> ApiResponse:
    """``POST /api/model/rollback``: point back at ``{"to": revision}`` or the previous version, pinned.
    Uses the serving profile's short timeouts: an HTTP request must not wait minutes on storage."""
    target = check_body(holder.settings.limits, RollbackBody, _small_json_body(holder, body)).to
    return ApiResponse(200, to_json(RollbackResult.of(holder.store.rollback(target))))


def _small_json_body(holder: ModelHolder, body: bytes) -> dict[str, Any]:
    """The optional JSON object of an operator route (empty body: ``{}``)."""
    return parse_json_object(body, max_bytes=holder.settings.limits.max_operator_body_bytes) if body.strip() else {}


def openapi_document(holder: ModelHolder, *, params: Mapping[str, str], url: str) -> ApiResponse:
    """``GET /api/openapi.json``: the OpenAPI document with the limits of this app's settings;
    ``?version=3.0`` gives OpenAPI 3.0.3 (API Management), ``url`` the request's, for ``servers``."""
    from urllib.parse import urlsplit

    version = check_query("openapi", params).get("version", "3.1")
    parts = urlsplit(url)
    server = f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") and parts.netloc else None
    return ApiResponse(200, document(holder.settings, version=version, server=server), {"Cache-Control": "no-cache"})
