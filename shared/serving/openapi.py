"""The app's OpenAPI documents, built from the shapes the code sends and the validator runs.

:func:`document` gives OpenAPI 3.1 (JSON Schema 2020-12) with the limits of the running settings,
the error codes of ``shared/errors.py`` and the function-key scheme; ``version="3.0"`` converts it
to OpenAPI 3.0.3 for API Management, which imports 3.1 only with restrictions: no security schemes,
no component examples, no inline operation schemas (every body here is a ``$ref``).

Every request and response body is a shape (:mod:`shared.wire`): a frozen dataclass declared next
to the code that makes or reads it; its component schema here is made from it (``REQUEST_SHAPES``,
``RESPONSE_SHAPES``). Schemas use ``required`` and ``additionalProperties: false``; the tests
validate every response the integration tests produce against them. What differs per route (the
success body, its media types and headers, a non-error body on an error status) is data on its
:class:`Operation`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from .. import errors
from ..engine.question_answering import Answer, QAItem
from ..settings import Limits, Settings
from ..store.refresh_queue import RefreshOptions
from ..wire import schema, to_json, wire_field
from .playground import CONTENT_SECURITY_POLICY, PLAYGROUND_FILES
from .shapes import (
    Answers,
    AskAnswer,
    AskAnswers,
    AskBatch,
    AskResults,
    Health,
    HealthState,
    ModelStatus,
    RefreshQueued,
    RollbackBody,
    RollbackResult,
)

VERSIONS = ("3.1", "3.0")
HEALTH_STATES: tuple[HealthState, ...] = get_args(HealthState)
REFRESH_OUTCOMES = ("published", "made_current", "up_to_date", "repaired", "failed")
JSON = "application/json"


@dataclass(frozen=True)
class Operation:
    """One HTTP function as the document shows it; ``name`` is its function name in ``function_app``.

    What differs between routes is data here, read by one builder: the success body's schema and
    media types, extra response headers by status, a status whose body is not the error shape
    (health's 503 is its state), a status's own description.
    """

    name: str
    method: str
    route: str
    auth: str  # "function" or "anonymous", as the trigger's auth level
    summary: str
    description: str
    responses: tuple[int, ...]
    success: str  # component schema of the 2xx body
    request: str | None = None  # component schema of the JSON body
    request_required: bool = False
    parameters: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    tag: str = "api"
    media_types: tuple[str, ...] = (JSON,)  # of the 2xx body
    headers: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)  # response headers by status (503's Retry-After aside)
    bodies: Mapping[int, str] = field(default_factory=dict)  # an error status whose body is this schema, not the error
    descriptions: Mapping[int, str] = field(default_factory=dict)  # by status, where the usual one does not fit


NO_BODY = frozenset({308, 401})  # a redirect; the host's empty 401
_CSP_HEADER = {"Content-Security-Policy": {"required": True, "schema": {"type": "string", "enum": [CONTENT_SECURITY_POLICY]}}}

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "ask",
        "POST",
        "ask",
        "function",
        "Answer questions from a context",
        'One `{question, context}` item, or `{"items": [...]}`. `start`/`end` are offsets in Unicode '
        "code points into the item's context (`end` exclusive). The `Server-Timing` header gives the model's time.",
        (200, 400, 401, 413, 500, 503),
        success="AskResponse",
        request="AskRequest",
        request_required=True,
        headers={
            200: {
                "Server-Timing": {
                    "description": "`model;dur=<ms>`: the model's inference time in milliseconds",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^model;dur=[0-9]+(\\.[0-9]+)?$"},
                }
            }
        },
    ),
    Operation(
        "health",
        "GET",
        "health",
        "anonymous",
        "Whether this instance serves a model",
        "200 when a model is loaded (also when `degraded`), 503 with `Retry-After` otherwise. "
        "Reasons are in the logs and in `GET /api/model`, never here. A `warm` value outside its enum is a 400.",
        (200, 400, 500, 503),
        success="Health",
        parameters=(
            {
                "name": "warm",
                "in": "query",
                "required": False,
                "description": "`1`, `true` or `yes`: start loading the model if none is loaded (answers at once)",
                "schema": {"type": "string", "enum": ["1", "true", "yes", "0", "false", "no"]},
            },
        ),
        bodies={503: "Health"},  # the state, not an error; 500 keeps the error shape
        descriptions={503: "No model loaded on this instance (state loading, empty or error); retry after `Retry-After`"},
    ),
    Operation(
        "model",
        "GET",
        "model",
        "function",
        "Stored versions, pointer, last refresh and what this instance loaded",
        "For operators. 503 `storage_unavailable` when storage cannot be reached.",
        (200, 401, 500, 503),
        success="ModelStatus",
        tag="operators",
    ),
    Operation(
        "model_refresh",
        "POST",
        "model/refresh",
        "function",
        "Queue a refresh of the model",
        "Answers 202 at once; the queue-triggered worker does the copy. `GET /api/model` shows `last_refresh` "
        "when it has run. Naming a `revision` (or `unpin`) moves a pinned pointer. Give operators this function's own key.",
        (202, 400, 401, 413, 500, 503),
        success="RefreshQueued",
        request="RefreshRequest",
        tag="operators",
        headers={202: {"Location": {"description": "where the outcome shows", "required": True, "schema": {"type": "string"}}}},
    ),
    Operation(
        "model_rollback",
        "POST",
        "model/rollback",
        "function",
        "Point the model back at an earlier version and pin it",
        "`to` defaults to the previous version. 404 `not_found` when there is nothing to roll back to.",
        (200, 400, 401, 404, 409, 413, 500, 503),
        success="RollbackResult",
        request="RollbackRequest",
        tag="operators",
    ),
    Operation(
        "openapi",
        "GET",
        "openapi.json",
        "anonymous",
        "This document",
        "OpenAPI 3.1 by default; `?version=3.0` gives OpenAPI 3.0.3 for API Management.",
        (200, 400, 500),
        success="OpenApiDocument",
        parameters=(
            {
                "name": "version",
                "in": "query",
                "required": False,
                "description": "`3.1` (default) or `3.0` (OpenAPI 3.0.3)",
                "schema": {"type": "string", "enum": list(VERSIONS), "default": "3.1"},
            },
        ),
    ),
    Operation(
        "playground",
        "GET",
        "playground",
        "anonymous",
        "A page to try the API in a browser",
        "Served from the app's own files, with a strict Content-Security-Policy; it asks for a function key "
        "and keeps it in the tab's sessionStorage only. `/api/playground/` (with a trailing slash) answers 308 to this URL, "
        "so that the page's relative URLs resolve.",
        (200, 308, 500),
        success="Text",
        media_types=("text/html",),
        headers={
            200: _CSP_HEADER,
            308: {"Location": {"description": "the page without the trailing slash", "required": True, "schema": {"type": "string"}}},
        },
    ),
    Operation(
        "playground_file",
        "GET",
        "playground/{file}",
        "anonymous",
        "The playground's style sheet, script and icon",
        "Only the names listed in the `file` parameter are served; any other is 404 `not_found`.",
        (200, 404, 500),
        success="Text",
        parameters=(
            {
                "name": "file",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": list(PLAYGROUND_FILES)},
            },
        ),
        media_types=tuple(dict.fromkeys(PLAYGROUND_FILES.values())),
        headers={200: _CSP_HEADER},
    ),
)


def http_route(operation: Operation) -> str:
    """The path of an operation as callers see it (the host's route prefix is ``api``)."""
    return "/api/" + operation.route


def error_codes() -> dict[int, list[str]]:
    """Every error code of ``shared/errors.py`` by HTTP status (``internal_error`` included)."""
    found: dict[int, set[str]] = {}
    pending: list[type[errors.QAError]] = [errors.QAError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.status, set()).add(cls.code)
        pending.extend(cls.__subclasses__())
    return {status: sorted(codes) for status, codes in sorted(found.items())}


# --- the document's own shape -------------------------------------------------------------------


@dataclass(frozen=True)
class Info:
    """The document's ``info``, with the limits of the running settings."""

    title: str = wire_field()
    version: str = wire_field()
    description: str = wire_field()
    limits: Limits = wire_field(json_name="x-limits")


@dataclass(frozen=True)
class OpenApiDocument:
    """``GET /api/openapi.json``: this document (its schema checks the top level and ``info``)."""

    openapi: str = wire_field()
    info: Info = wire_field()
    paths: dict[str, Any] = wire_field()
    components: dict[str, Any] = wire_field()
    servers: tuple[dict[str, Any], ...] | None = wire_field(default=None, omit_none=True)
    json_schema_dialect: str | None = wire_field(default=None, omit_none=True, json_name="jsonSchemaDialect")


# --- the component schemas ----------------------------------------------------------------------

# Component name -> shape. A shape nested in another is written as a $ref to its name here.
REQUEST_SHAPES: dict[str, type] = {
    "AskItem": QAItem,
    "AskBatch": AskBatch,
    "RefreshRequest": RefreshOptions,
    "RollbackRequest": RollbackBody,
}
RESPONSE_SHAPES: dict[str, type] = {
    "Answer": Answer,
    "Answers": Answers,
    "AskAnswer": AskAnswer,
    "AskAnswers": AskAnswers,
    "AskResults": AskResults,
    "Health": Health,
    "RefreshQueued": RefreshQueued,
    "RollbackResult": RollbackResult,
    "ModelStatus": ModelStatus,
    "OpenApiDocument": OpenApiDocument,
    "Limits": Limits,
}
_NAMES = {shape: name for name, shape in {**REQUEST_SHAPES, **RESPONSE_SHAPES}.items()}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


# Said once in the document's description and by each request schema (additionalProperties: false).
REQUEST_RULES = (
    "Request bodies are closed: an unknown field is a 400 `bad_request` that names it, on every route. "
    "An optional field sent as `null` is the same as leaving it out. A whole number may be written `2.0` "
    "(JSON Schema's integer). Query parameters are checked against their `enum` (400 naming the parameter); "
    "undocumented ones are ignored. These request schemas are the validator the app itself runs."
)


def request_schemas(limits: Limits) -> dict[str, Any]:
    """The JSON Schemas of the request bodies under ``limits``: the document's components and the
    validator of :mod:`shared.serving.validation`, one definition for both."""
    params = to_json(limits)
    schemas = {name: schema(shape, params=params, refs=_NAMES) for name, shape in REQUEST_SHAPES.items()}
    windows = (
        f"A request may need at most {limits.max_windows} windows of the model's sequence length "
        f"over all its items, and its body at most {limits.max_ask_body_bytes} bytes; over a budget is 413 `too_large`. "
        "A question or context needs a letter or digit (the `pattern`: those of the Basic Multilingual Plane that "
        "the model's tokenizer reads); without one it is a 400 naming the field."
    )
    schemas["AskRequest"] = {"anyOf": [_ref("AskItem"), _ref("AskBatch")], "description": windows}
    return schemas


STRING: dict[str, Any] = {"type": "string"}
TIME: dict[str, Any] = {"type": "string", "description": "ISO 8601 time, UTC"}
COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
SECONDS: dict[str, Any] = {"type": "number", "minimum": 0}


def _obj(properties: Mapping[str, Any], *, optional: tuple[str, ...] = (), description: str | None = None) -> dict[str, Any]:
    """A closed object schema written by hand (``ModelStatus`` only, until it is a shape): every
    property required unless named in ``optional``."""
    out: dict[str, Any] = {"type": "object", "properties": dict(properties), "additionalProperties": False}
    required = [name for name in properties if name not in optional]
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


def components(limits: Limits) -> dict[str, Any]:
    """Every component schema of the document under ``limits``."""
    params = to_json(limits)
    schemas: dict[str, Any] = {
        **request_schemas(limits),
        **{name: schema(shape, params=params, refs=_NAMES) for name, shape in RESPONSE_SHAPES.items()},
        "AskResponse": {"oneOf": [_ref("AskAnswer"), _ref("AskAnswers"), _ref("AskResults")]},
        "Text": {"type": "string"},
    }
    for status, names in error_codes().items():
        if status >= 400:
            description = f"codes of status {status}: {', '.join(names)}"
            schemas[f"Error{status}"] = schema(errors.ErrorBody, params={"codes": names}, description=description)
    return schemas


EXAMPLE_CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."
_SERVED_EXAMPLE = {"model_id": "org/model", "revision": "0" * 40, "backend": "onnx", "variant": "fp32"}

REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "AskRequest": {
        "single": {"summary": "one question", "value": {"question": "Who won the game?", "context": EXAMPLE_CONTEXT}},
        "top_k": {"summary": "three answers", "value": {"question": "Where was it played?", "context": EXAMPLE_CONTEXT, "top_k": 3}},
        "batch": {
            "summary": "several questions",
            "value": {
                "items": [
                    {"question": "Who won?", "context": EXAMPLE_CONTEXT},
                    {"question": "When?", "context": EXAMPLE_CONTEXT, "top_k": 2},
                ]
            },
        },
    },
    "RefreshRequest": {
        "latest": {"summary": "MODEL_REVISION again", "value": {}},
        "named": {"summary": "a named revision", "value": {"revision": "main", "unpin": True}},
    },
    "RollbackRequest": {"previous": {"summary": "the previous version", "value": {}}},
}

RESPONSE_EXAMPLES: dict[str, dict[str, Any]] = {
    "AskResponse": {
        "single": {"value": {"answer": "Denver Broncos", "score": 0.93, "start": 55, "end": 69, **_SERVED_EXAMPLE}},
        "top_k": {
            "value": {
                "answers": [
                    {"answer": "San Francisco", "score": 0.81, "start": 36, "end": 49},
                    {"answer": "2016", "score": 0.07, "start": 28, "end": 32},
                ],
                **_SERVED_EXAMPLE,
            }
        },
    },
    "Health": {
        "ready": {"value": {"state": "ready", "degraded": False, "model_id": "org/model", "revision": "0" * 40, "load_seconds": 4.2}},
        "empty": {"value": {"state": "empty", "degraded": False}},
    },
    "RefreshQueued": {
        "queued": {
            "value": {
                "status": "queued",
                "message_id": "6f1c0f7e-1c2b-4a6f-9a59-2f2b5d9a3c11",
                "queue": "model-refresh",
                "revision": None,
                "moves_pinned_pointer": False,
                "repair": False,
                "build_artifacts": False,
                "result": "GET /api/model shows last_refresh once the worker has run",
            }
        }
    },
    "RollbackResult": {"rolled_back": {"value": {"revision": "1" * 40, "previous": ["0" * 40], "pinned": True}}},
    "Error503": {
        "not_ready": {"value": {"error": {"code": "model_not_ready", "message": "No model is isolated yet: run a refresh"}}},
    },
}

_DESCRIPTIONS = {
    200: "OK",
    202: "Queued",
    308: "Only for `/api/playground/` (trailing slash): `Location` is this page's URL, relative (`../playground`)",
    400: "Bad input: not JSON, a missing or mistyped field, an option out of range; the message names the field",
    401: "No or wrong function key. The Functions host answers with an EMPTY body (not JSON).",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Over a size budget (characters, tokens, items, windows, body bytes); the message names it",
    500: "Unexpected; details are in the logs",
    503: "Not ready, busy, out of time or storage unreachable: retry after `Retry-After` seconds",
}

_RETRY_AFTER = {"description": "seconds to wait before retrying", "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}


def _response(operation: Operation, status: int) -> dict[str, Any]:
    response: dict[str, Any] = {"description": operation.descriptions.get(status, _DESCRIPTIONS[status])}
    headers: dict[str, Any] = {name: copy.deepcopy(dict(header)) for name, header in operation.headers.get(status, {}).items()}
    if status == 503:
        headers["Retry-After"] = _RETRY_AFTER
    if status not in NO_BODY:
        if status < 400:
            name, media_types = operation.success, operation.media_types
        else:
            name, media_types = operation.bodies.get(status, f"Error{status}"), (JSON,)
        content: dict[str, Any] = {media: {"schema": _ref(name)} for media in media_types}
        examples = RESPONSE_EXAMPLES.get(name)
        if examples and JSON in content and (status < 400 or status == 503):
            content[JSON]["examples"] = copy.deepcopy(examples)
        response["content"] = content
    if headers:
        response["headers"] = headers
    return response


def _operation(operation: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": operation.name,
        "summary": operation.summary,
        "description": operation.description,
        "tags": [operation.tag],
    }
    if operation.parameters:
        out["parameters"] = copy.deepcopy(list(operation.parameters))
    if operation.request:
        body: dict[str, Any] = {"schema": _ref(operation.request)}
        if operation.request in REQUEST_EXAMPLES:
            body["examples"] = copy.deepcopy(REQUEST_EXAMPLES[operation.request])
        out["requestBody"] = {"required": operation.request_required, "content": {JSON: body}}
    out["responses"] = {str(status): _response(operation, status) for status in operation.responses}
    out["security"] = [{"functionKeyHeader": []}, {"functionKeyQuery": []}] if operation.auth == "function" else []
    return out


def document(settings: Settings, *, version: str = "3.1", server: str | None = None) -> dict[str, Any]:
    """The OpenAPI document of every HTTP route, with the limits of ``settings``.

    Args:
        settings: the running app's settings (limits, model id).
        version: ``"3.1"`` or ``"3.0"`` (OpenAPI 3.0.3, for API Management).
        server: the origin callers use (``https://APP.azurewebsites.net``); omitted when unknown.

    Raises:
        InputError: an unknown version.
    """
    if version not in VERSIONS:
        raise errors.InputError(f"'version' must be one of {', '.join(VERSIONS)}, got {version[:20]!r}", field="version")
    limits = settings.limits
    paths: dict[str, Any] = {}
    for operation in OPERATIONS:
        paths.setdefault(http_route(operation), {})[operation.method.lower()] = _operation(operation)
    description = (
        f"Extractive question answering with `{settings.model_id}`, served from Blob Storage. "
        "Routes with a function key take it as the `x-functions-key` header or the `code` query parameter; "
        "a missing or wrong key is a 401 with an empty body from the Functions host. "
        'Errors are JSON `{"error": {"code", "message"}}`; every 503 carries `Retry-After`. ' + REQUEST_RULES + " "
        "Limits of this deployment: " + ", ".join(f"{k}={v}" for k, v in to_json(limits).items()) + "."
    )
    doc = to_json(
        OpenApiDocument(
            openapi="3.1.0",
            json_schema_dialect="https://json-schema.org/draft/2020-12/schema",
            info=Info(title="Isolated question answering", version="1.0.0", description=description, limits=limits),
            servers=({"url": server},) if server else None,
            paths=paths,
            components={
                "schemas": components(limits),
                "securitySchemes": {
                    "functionKeyHeader": {"type": "apiKey", "in": "header", "name": "x-functions-key", "description": "a function key"},
                    "functionKeyQuery": {"type": "apiKey", "in": "query", "name": "code", "description": "a function key"},
                },
            },
        )
    )
    return doc if version == "3.1" else to_openapi_30(doc)


def to_openapi_30(doc: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0.3 from the 3.1 document, for API Management: ``nullable`` for type lists,
    ``example`` for ``examples``, and no security schemes (APIM ignores them; set the key as
    the backend's credential instead)."""
    out = copy.deepcopy(dict(doc))
    out["openapi"] = "3.0.3"
    out.pop("jsonSchemaDialect", None)
    out["components"].pop("securitySchemes", None)
    out["components"]["schemas"] = {name: _schema_30(schema) for name, schema in out["components"]["schemas"].items()}
    for item in out["paths"].values():
        for operation in item.values():
            operation.pop("security", None)
            for parameter in operation.get("parameters", []):
                parameter["schema"] = _schema_30(parameter["schema"])
            for media in operation.get("requestBody", {}).get("content", {}).values():
                _media_30(media)
            for response in operation["responses"].values():
                for media in response.get("content", {}).values():
                    _media_30(media)
                for header in response.get("headers", {}).values():
                    header["schema"] = _schema_30(header["schema"])
    return out


def _media_30(media: dict[str, Any]) -> None:
    examples = media.pop("examples", None)
    if examples:
        media["example"] = next(iter(examples.values()))["value"]
    media["schema"] = _schema_30(media["schema"])


def _schema_30(schema: Any) -> Any:
    """One JSON Schema 2020-12 schema as an OpenAPI 3.0 Schema Object."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _schema_30(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _schema_30(value)
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [_schema_30(sub) for sub in value]
        elif key == "type" and isinstance(value, list):
            kinds = [kind for kind in value if kind != "null"]
            out["type"] = kinds[0]
            if "null" in value:
                out["nullable"] = True
        else:
            out[key] = copy.deepcopy(value)
    return out
