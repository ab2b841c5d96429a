"""What each HTTP route does, as plain data in and out (``function_app.py`` only wraps it).

Every error becomes ``{"error": {"code", "message"}}`` with the status of its type (400 bad
input, 404, 409, 413 too large, 503 not ready + Retry-After); anything unexpected is a 500 whose
details stay in the logs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..engine.question_answering import Answer, QAItem, decode_utf8
from ..errors import InputError, QAError, TooLargeError
from ..loading import onnx_artifacts
from ..settings import Settings
from ..telemetry import log_event
from .body_size import OPERATOR_BODY_MAX_BYTES, ask_body_max_bytes
from .holder import ModelHolder
from .openapi import document
from .playground import FileResponse
from .validation import check_body, check_query

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
        return ApiResponse(err.status, {"error": {"code": err.code, "message": err.message}}, headers)
    log.error("Unexpected error while handling a request", exc_info=err)
    return ApiResponse(500, {"error": {"code": "internal_error", "message": "Internal error; see the logs"}})


_Response = TypeVar("_Response", ApiResponse, FileResponse, ApiResponse | FileResponse)


def guarded(handler: Callable[[], _Response]) -> _Response | ApiResponse:
    """Run a route's work, turning any exception into its error response."""
    try:
        return handler()
    except Exception as err:  # noqa: BLE001 - every failure gets a JSON answer; QAErrors keep their status
        return error_response(err)


def parse_json_object(body: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Decode a request body that must be a JSON object.

    Raises:
        TooLargeError: over ``max_bytes``.
        InputError: empty, not UTF-8, not JSON, nested too deeply for the decoder, or not an object.
    """
    if len(body) > max_bytes:
        raise TooLargeError(f"the request body has {len(body)} bytes; the limit is {max_bytes}", field="body")
    if not body.strip():
        raise InputError("the request body must be a JSON object", field="body")
    text = decode_utf8(body, what="the request body", field="body")
    try:
        data = json.loads(text)
    except ValueError:
        raise InputError("the request body is not valid JSON", field="body") from None
    except RecursionError:  # the decoder recurses once per level: thousands of '[' exhaust the stack
        raise InputError("the request body is nested too deeply to be read", field="body") from None
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON object", field="body")
    return data


def parse_ask(data: dict[str, Any], *, settings: Settings) -> tuple[list[QAItem], bool]:
    """The items of an ``/api/ask`` body: one item, or ``{"items": [...]}`` (then ``True``),
    checked against the document's ``AskItem`` / ``AskBatch`` schema (the budgets that need no
    model included), then as text the tokenizer can read (no lone surrogate)."""
    batch = "items" in data
    checked = check_body(settings, "AskBatch" if batch else "AskItem", data)
    raw = checked["items"] if batch else [checked]
    return [QAItem.from_dict(item, where=f"items[{i}]." if batch else "") for i, item in enumerate(raw)], batch


def _shape(answers: list[Answer], top_k: int) -> dict[str, Any]:
    if top_k == 1 and len(answers) == 1:
        return answers[0].to_dict()
    return {"answers": [a.to_dict() for a in answers]}


def max_body_bytes(holder: ModelHolder) -> int:
    return ask_body_max_bytes(holder.settings)


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
    """``POST /api/ask``: validate, wait for the model within the deadline, answer; ``trace``
    receives how far the request got (see :func:`ask_request`, which logs it).

    Raises:
        QAError: bad input (400, 413), no model or no free slot in time (503), the deadline (503).
    """
    trace = trace if trace is not None else AskTrace()
    started = time.monotonic()
    settings = holder.settings
    deadline = started + settings.deadline_seconds
    data = parse_json_object(body, max_bytes=max_body_bytes(holder))
    trace.items = _item_count(data)
    items, batch = parse_ask(data, settings=settings)
    with holder.model(deadline) as loaded:
        model = {"model_id": loaded.model_id, "revision": loaded.revision, "backend": loaded.backend, "variant": loaded.variant}
        trace.model = model
        with holder.inference_slot(deadline):
            inference_started = time.perf_counter()
            results = loaded.engine.answer(items, deadline=deadline, stats=trace.stats)
            inference_ms = (time.perf_counter() - inference_started) * 1000
            trace.model_ms = inference_ms
    # the model's time alone, so a caller can tell it from queueing, loading and the network
    timing = {"Server-Timing": f"model;dur={inference_ms:.1f}"}
    if batch:
        return ApiResponse(200, {"results": [_shape(r, item.top_k) for r, item in zip(results, items, strict=True)], **model}, timing)
    return ApiResponse(200, {**_shape(results[0], items[0].top_k), **model}, timing)


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
    return ApiResponse(200, {**store_status, "instance": holder.describe()})


def request_refresh(holder: ModelHolder, body: bytes) -> ApiResponse:
    """``POST /api/model/refresh``: queue a refresh (optional revision); 202 + where to look."""
    from ..store.refresh_queue import RefreshRequest, enqueue

    request = RefreshRequest.from_request(check_body(holder.settings, "RefreshRequest", _small_json_body(body)))
    message_id = enqueue(holder.settings, request)
    return ApiResponse(
        202,
        {
            "status": "queued",
            "message_id": message_id,
            "queue": holder.settings.refresh_queue,
            "revision": request.revision,
            "moves_pinned_pointer": request.explicit,
            "repair": request.repair,
            "build_artifacts": request.build_artifacts,
            "result": "GET /api/model shows last_refresh once the worker has run",
        },
        {"Location": "/api/model"},
    )


def rollback(holder: ModelHolder, body: bytes) -> ApiResponse:
    """``POST /api/model/rollback``: point back at ``{"to": revision}`` or the previous version, pinned.
    Uses the serving profile's short timeouts: an HTTP request must not wait minutes on storage."""
    target = check_body(holder.settings, "RollbackRequest", _small_json_body(body)).get("to")
    pointer = holder.store.rollback(target)
    return ApiResponse(200, {"revision": pointer.revision, "previous": list(pointer.previous), "pinned": pointer.pinned})


def _small_json_body(body: bytes) -> dict[str, Any]:
    """The optional JSON object of an operator route (empty body: ``{}``)."""
    return parse_json_object(body, max_bytes=OPERATOR_BODY_MAX_BYTES) if body.strip() else {}


def openapi_document(holder: ModelHolder, *, params: Mapping[str, str], url: str) -> ApiResponse:
    """``GET /api/openapi.json``: the OpenAPI document with the limits of this app's settings;
    ``?version=3.0`` gives OpenAPI 3.0.3 (API Management), ``url`` the request's, for ``servers``."""
    from urllib.parse import urlsplit

    version = check_query("openapi", params).get("version", "3.1")
    parts = urlsplit(url)
    server = f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") and parts.netloc else None
    return ApiResponse(200, document(holder.settings, version=version, server=server), {"Cache-Control": "no-cache"})
