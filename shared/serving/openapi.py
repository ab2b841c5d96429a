"""The app's OpenAPI documents, built from the code that validates requests and shapes responses.

:func:`document` gives OpenAPI 3.1 (JSON Schema 2020-12) with the limits of the running settings,
the error codes of ``shared/errors.py`` and the function-key scheme; ``version="3.0"`` converts it
to OpenAPI 3.0.3 for API Management, which imports 3.1 only with restrictions: no security schemes,
no component examples, no inline operation schemas (every body here is a ``$ref``).

Response schemas use ``required`` and ``additionalProperties: false``; the tests validate every
response the integration tests produce against them, so the document cannot drift from the code.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import errors
from ..engine.question_answering import MAX_ANSWER_LEN, MAX_TOP_K, MIN_ANSWER_LEN, MIN_TOP_K, QAItem
from ..settings import ARTIFACT_VARIANTS, Settings
from ..store.refresh_queue import REVISION_RE
from .body_size import OPERATOR_BODY_MAX_BYTES, ask_body_max_bytes
from .playground import CONTENT_SECURITY_POLICY, PLAYGROUND_FILES

VERSIONS = ("3.1", "3.0")
BACKENDS = ("onnx", "torch")
HEALTH_STATES = ("ready", "loading", "empty", "error")
REFRESH_OUTCOMES = ("published", "made_current", "up_to_date", "repaired", "failed")


@dataclass(frozen=True)
class Operation:
    """One HTTP function as the document shows it; ``name`` is its function name in ``function_app``."""

    name: str
    method: str
    route: str
    auth: str  # "function" or "anonymous", as the trigger's auth level
    summary: str
    description: str
    responses: tuple[int, ...]
    request: str | None = None  # component schema of the JSON body
    parameters: tuple[dict[str, Any], ...] = field(default_factory=tuple)


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
        request="AskRequest",
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
        parameters=(
            {
                "name": "warm",
                "in": "query",
                "required": False,
                "description": "`1`, `true` or `yes`: start loading the model if none is loaded (answers at once)",
                "schema": {"type": "string", "enum": ["1", "true", "yes", "0", "false", "no"]},
            },
        ),
    ),
    Operation(
        "model",
        "GET",
        "model",
        "function",
        "Stored versions, pointer, last refresh and what this instance loaded",
        "For operators. 503 `storage_unavailable` when storage cannot be reached.",
        (200, 401, 500, 503),
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
        request="RefreshRequest",
    ),
    Operation(
        "model_rollback",
        "POST",
        "model/rollback",
        "function",
        "Point the model back at an earlier version and pin it",
        "`to` defaults to the previous version. 404 `not_found` when there is nothing to roll back to.",
        (200, 400, 401, 404, 409, 413, 500, 503),
        request="RollbackRequest",
    ),
    Operation(
        "openapi",
        "GET",
        "openapi.json",
        "anonymous",
        "This document",
        "OpenAPI 3.1 by default; `?version=3.0` gives OpenAPI 3.0.3 for API Management.",
        (200, 400, 500),
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
    ),
    Operation(
        "playground_file",
        "GET",
        "playground/{file}",
        "anonymous",
        "The playground's style sheet, script and icon",
        "Only the names listed in the `file` parameter are served; any other is 404 `not_found`.",
        (200, 404, 500),
        parameters=(
            {
                "name": "file",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": list(PLAYGROUND_FILES)},
            },
        ),
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


def _obj(properties: Mapping[str, Any], *, optional: tuple[str, ...] = (), description: str | None = None) -> dict[str, Any]:
    """A closed object schema: every property required unless named in ``optional``."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": dict(properties),
        "additionalProperties": False,
    }
    required = [name for name in properties if name not in optional]
    if required:  # OpenAPI 3.0 refuses an empty list
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    out = dict(schema)
    out["type"] = [schema["type"], "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


STRING: dict[str, Any] = {"type": "string"}
TIME: dict[str, Any] = {"type": "string", "description": "ISO 8601 time, UTC"}
COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
SECONDS: dict[str, Any] = {"type": "number", "minimum": 0}


def _optional(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional request field: ``null`` is accepted and means the default (as if left out)."""
    return {**schema, "type": [schema["type"], "null"]}


# A question or context needs a letter or digit that the model's tokenizer reads: text of only
# whitespace, punctuation, control, format, private-use, unassigned or combining characters may have
# no word for it. The letters and digits (Unicode categories L and N) of the Basic Multilingual Plane
# that BERT-uncased's normalizer keeps (the strictest tokenizer served here: it drops control, format
# and unassigned characters and strips accents), in runs of 10 or more; tests/unit/test_word_pattern.py
# checks every one. Explicit ranges, not \w, so that every regex engine (Python's re in the app's
# validator, ECMA-262 in clients and API testers) reads the pattern the same way.
# fmt: off
WORD_RANGES: tuple[tuple[int, int], ...] = (
    (0x0030, 0x0039), (0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x00D6), (0x00D8, 0x00F6), (0x00F8, 0x02C1), (0x02C6, 0x02D1),
    (0x038E, 0x03A1), (0x03A3, 0x03F5), (0x03F7, 0x0481), (0x048A, 0x052F), (0x0531, 0x0556), (0x0560, 0x0588), (0x05D0, 0x05EA),
    (0x0620, 0x064A), (0x0660, 0x0669), (0x0671, 0x06D3), (0x06EE, 0x06FC), (0x0712, 0x072F), (0x074D, 0x07A5), (0x07C0, 0x07EA),
    (0x0800, 0x0815), (0x0840, 0x0858), (0x0860, 0x086A), (0x0870, 0x0887), (0x08A0, 0x08C9), (0x0904, 0x0939), (0x0958, 0x0961),
    (0x0966, 0x096F), (0x0971, 0x0980), (0x0993, 0x09A8), (0x09E6, 0x09F1), (0x0A13, 0x0A28), (0x0A66, 0x0A6F), (0x0A93, 0x0AA8),
    (0x0AE6, 0x0AEF), (0x0B13, 0x0B28), (0x0B66, 0x0B6F), (0x0BAE, 0x0BB9), (0x0BE6, 0x0BF2), (0x0C12, 0x0C28), (0x0C2A, 0x0C39),
    (0x0C66, 0x0C6F), (0x0C92, 0x0CA8), (0x0CAA, 0x0CB3), (0x0CE6, 0x0CEF), (0x0D12, 0x0D3A), (0x0D58, 0x0D61), (0x0D66, 0x0D78),
    (0x0D85, 0x0D96), (0x0D9A, 0x0DB1), (0x0DE6, 0x0DEF), (0x0E01, 0x0E30), (0x0E50, 0x0E59), (0x0E8C, 0x0EA3), (0x0EA7, 0x0EB0),
    (0x0ED0, 0x0ED9), (0x0F20, 0x0F33), (0x0F49, 0x0F6C), (0x1000, 0x102A), (0x103F, 0x1049), (0x1075, 0x1081), (0x1090, 0x1099),
    (0x10A0, 0x10C5), (0x10D0, 0x10FA), (0x10FC, 0x1248), (0x1260, 0x1288), (0x1290, 0x12B0), (0x12C8, 0x12D6), (0x12D8, 0x1310),
    (0x1318, 0x135A), (0x1369, 0x137C), (0x1380, 0x138F), (0x13A0, 0x13F5), (0x1401, 0x166C), (0x166F, 0x167F), (0x1681, 0x169A),
    (0x16A0, 0x16EA), (0x16EE, 0x16F8), (0x1700, 0x1711), (0x171F, 0x1731), (0x1740, 0x1751), (0x1760, 0x176C), (0x1780, 0x17B3),
    (0x17E0, 0x17E9), (0x17F0, 0x17F9), (0x1810, 0x1819), (0x1820, 0x1878), (0x1887, 0x18A8), (0x18B0, 0x18F5), (0x1900, 0x191E),
    (0x1946, 0x196D), (0x1980, 0x19AB), (0x19B0, 0x19C9), (0x19D0, 0x19DA), (0x1A00, 0x1A16), (0x1A20, 0x1A54), (0x1A80, 0x1A89),
    (0x1A90, 0x1A99), (0x1B05, 0x1B33), (0x1B50, 0x1B59), (0x1B83, 0x1BA0), (0x1BAE, 0x1BE5), (0x1C00, 0x1C23), (0x1C40, 0x1C49),
    (0x1C4D, 0x1C7D), (0x1C90, 0x1CBA), (0x1D00, 0x1DBF), (0x1E00, 0x1F15), (0x1F20, 0x1F45), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4),
    (0x1FE0, 0x1FEC), (0x207F, 0x2089), (0x2090, 0x209C), (0x210A, 0x2113), (0x212F, 0x2139), (0x2150, 0x2189), (0x2460, 0x249B),
    (0x24EA, 0x24FF), (0x2776, 0x2793), (0x2C00, 0x2CE4), (0x2D00, 0x2D25), (0x2D30, 0x2D67), (0x2D80, 0x2D96), (0x3041, 0x3096),
    (0x30A1, 0x30FA), (0x3105, 0x312F), (0x3131, 0x318E), (0x31A0, 0x31BF), (0x31F0, 0x31FF), (0x3220, 0x3229), (0x3251, 0x325F),
    (0x3280, 0x3289), (0x32B1, 0x32BF), (0x3400, 0x4DBF), (0x4E00, 0xA48C), (0xA4D0, 0xA4FD), (0xA500, 0xA60C), (0xA610, 0xA62B),
    (0xA640, 0xA66E), (0xA67F, 0xA69D), (0xA6A0, 0xA6EF), (0xA722, 0xA788), (0xA78B, 0xA7CA), (0xA7F2, 0xA801), (0xA80C, 0xA822),
    (0xA840, 0xA873), (0xA882, 0xA8B3), (0xA8D0, 0xA8D9), (0xA900, 0xA925), (0xA930, 0xA946), (0xA960, 0xA97C), (0xA984, 0xA9B2),
    (0xA9CF, 0xA9D9), (0xA9E6, 0xA9FE), (0xAA00, 0xAA28), (0xAA50, 0xAA59), (0xAA60, 0xAA76), (0xAA7E, 0xAAAF), (0xAAE0, 0xAAEA),
    (0xAB30, 0xAB5A), (0xAB5C, 0xAB69), (0xAB70, 0xABE2), (0xABF0, 0xABF9), (0xAC00, 0xD7A3), (0xD7B0, 0xD7C6), (0xD7CB, 0xD7FB),
    (0xF900, 0xFA6D), (0xFA70, 0xFAD9), (0xFB1F, 0xFB28), (0xFB2A, 0xFB36), (0xFB46, 0xFBB1), (0xFBD3, 0xFD3D), (0xFD50, 0xFD8F),
    (0xFD92, 0xFDC7), (0xFDF0, 0xFDFB), (0xFE76, 0xFEFC), (0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0xFF66, 0xFFBE),
)
# fmt: on
WORD = "[" + "".join(f"\\u{low:04x}-\\u{high:04x}" for low, high in WORD_RANGES) + "]"

# A revision a refresh may name: the pattern of check_hub_revision, and no ".." anywhere (it refuses those too).
REFRESH_REVISION_PATTERN = "^(?!.*\\.\\.)" + REVISION_RE.pattern.removeprefix("^")

# Said once in the document's description and by each request schema (additionalProperties: false).
REQUEST_RULES = (
    "Request bodies are closed: an unknown field is a 400 `bad_request` that names it, on every route. "
    "An optional field sent as `null` is the same as leaving it out. A whole number may be written `2.0` "
    "(JSON Schema's integer). Query parameters are checked against their `enum` (400 naming the parameter); "
    "undocumented ones are ignored. These request schemas are the validator the app itself runs."
)


def request_schemas(settings: Settings) -> dict[str, Any]:
    """The JSON Schemas of the request bodies under ``settings``: the document's components and the
    validator of :mod:`shared.serving.validation`, one definition for both."""
    item = _obj(
        {
            "question": {
                "type": "string",
                "minLength": 1,
                "maxLength": settings.max_question_chars,
                "pattern": WORD,
                "description": f"at most {settings.max_question_chars} characters and {settings.max_question_tokens} tokens, "
                "with at least one letter or digit (`pattern`)",
            },
            "context": {
                "type": "string",
                "minLength": 1,
                "maxLength": settings.max_context_chars,
                "pattern": WORD,
                "description": f"at most {settings.max_context_chars} characters, with at least one letter or digit (`pattern`)",
            },
            "top_k": _optional({"type": "integer", "minimum": MIN_TOP_K, "maximum": MAX_TOP_K, "default": QAItem.top_k}),
            "max_answer_len": _optional(
                {
                    "type": "integer",
                    "minimum": MIN_ANSWER_LEN,
                    "maximum": MAX_ANSWER_LEN,
                    "default": QAItem.max_answer_len,
                    "description": "longest answer, in tokens",
                }
            ),
            "handle_impossible_answer": _optional({"type": "boolean", "default": QAItem.handle_impossible_answer}),
        },
        optional=("top_k", "max_answer_len", "handle_impossible_answer"),
    )
    windows = (
        f"A request may need at most {settings.max_windows} windows of the model's sequence length "
        f"over all its items, and its body at most {ask_body_max_bytes(settings)} bytes; over a budget is 413 `too_large`. "
        "A question or context needs a letter or digit (the `pattern`: those of the Basic Multilingual Plane that "
        "the model's tokenizer reads); without one it is a 400 naming the field."
    )
    return {
        "AskItem": item,
        "AskBatch": _obj({"items": {"type": "array", "minItems": 1, "maxItems": settings.max_items, "items": _ref("AskItem")}}),
        "AskRequest": {"anyOf": [_ref("AskItem"), _ref("AskBatch")], "description": windows},
        "RefreshRequest": _obj(
            {
                "revision": _optional({"type": "string", "pattern": REFRESH_REVISION_PATTERN, "description": "branch, tag or commit"}),
                "unpin": _optional({"type": "boolean", "default": False, "description": "move a pinned pointer"}),
                "repair": _optional({"type": "boolean", "default": False, "description": "re-copy stored files whose bytes differ"}),
                "build_artifacts": _optional({"type": "boolean", "default": False, "description": "build missing ONNX artifacts"}),
            },
            optional=("revision", "unpin", "repair", "build_artifacts"),
            description=f"`{{}}` or an empty body refreshes to MODEL_REVISION; at most {OPERATOR_BODY_MAX_BYTES} bytes",
        ),
        "RollbackRequest": _obj(
            {"to": _optional({"type": "string", "description": "a stored revision"})},
            optional=("to",),
            description=f"`{{}}` or an empty body rolls back to the previous version; at most {OPERATOR_BODY_MAX_BYTES} bytes",
        ),
    }


SCORE_DESCRIPTION = (
    "the span's score as the transformers 4.57.6 question-answering pipeline computes it: its probability "
    "(start times end, softmax over the window) in each window that found it, summed over the overlapping "
    "windows of a long context that found the same span, so it can exceed 1. Not a percentage: compare the "
    "scores of one answer list with each other"
)


def _schemas(settings: Settings) -> dict[str, Any]:
    codes = error_codes()
    answer = {
        "answer": {"type": "string", "description": "the span of the context"},
        "score": {"type": "number", "minimum": 0, "description": SCORE_DESCRIPTION},
        "start": {**COUNT, "description": "offset of the first character, in Unicode code points (not UTF-16 units)"},
        "end": {**COUNT, "description": "offset after the last character, in Unicode code points"},
    }
    served: dict[str, Any] = {
        "model_id": {"type": "string"},
        "revision": {"type": "string", "description": "the stored version that answered"},
        "backend": {"type": "string", "enum": list(BACKENDS)},
        "variant": {"type": "string", "enum": list(ARTIFACT_VARIANTS)},
    }
    answers = {"type": "array", "items": _ref("Answer"), "maxItems": MAX_TOP_K, "description": "best first"}
    schemas: dict[str, Any] = {
        **request_schemas(settings),
        "Answer": _obj(answer),
        "AskAnswer": _obj({**answer, **served}, description="one item with top_k 1"),
        "AskAnswers": _obj({"answers": answers, **served}, description="one item with top_k above 1"),
        "AskResults": _obj(
            {
                "results": {
                    "type": "array",
                    "maxItems": settings.max_items,
                    "description": "one per item, in order",
                    "items": {"oneOf": [_ref("Answer"), _ref("Answers")]},
                },
                **served,
            },
            description="a batch (`items`)",
        ),
        "Answers": _obj({"answers": answers}),
        "AskResponse": {"oneOf": [_ref("AskAnswer"), _ref("AskAnswers"), _ref("AskResults")]},
        "Health": _obj(
            {
                "state": {"type": "string", "enum": list(HEALTH_STATES)},
                "degraded": {"type": "boolean", "description": "serving, but not what was asked for (an earlier version, a fallback)"},
                "model_id": STRING,
                "revision": STRING,
                "load_seconds": SECONDS,
                "backend": served["backend"],
                "variant": served["variant"],
            },
            optional=("model_id", "revision", "load_seconds", "backend", "variant"),
        ),
        "ModelStatus": _obj(
            {
                "model_id": STRING,
                "container": STRING,
                "pointer": _nullable(
                    _obj(
                        {
                            "state": {
                                "type": "string",
                                "enum": ["ok", "damaged", "missing", "dangling"],
                                "description": "damaged or missing: current.json cannot be read, and these are its last recorded "
                                "values (the pointer's history); dangling: it points at a version that is gone or damaged",
                            },
                            "revision": _nullable(STRING),
                            "previous": {"type": "array", "items": STRING},
                            "pinned": {"type": "boolean"},
                            "updated_at": _nullable(TIME),
                            "problem": _nullable(STRING),
                            "repair": _nullable({"type": "string", "description": "the command that repairs it"}),
                        },
                        description="null until a first version is isolated",
                    )
                ),
                "versions": {
                    "type": "array",
                    "items": _obj(
                        {
                            "revision": STRING,
                            "state": {
                                "type": "string",
                                "enum": ["complete", "incomplete", "damaged"],
                                "description": "damaged: its manifest.json is damaged (problem, repair); never served or rolled back to",
                            },
                            "complete": {"type": "boolean"},
                            "files": COUNT,
                            "bytes": COUNT,
                            "last_modified": TIME,
                            "isolated_at": _nullable(TIME),
                            "problem": _nullable(STRING),
                            "repair": _nullable(STRING),
                            "artifacts": {
                                "type": "object",
                                "description": "ONNX serving artifacts by variant (fp32, int8); {} when none was built",
                                "additionalProperties": _obj(
                                    {
                                        "state": {
                                            "type": "string",
                                            "enum": ["ok", "unusable", "damaged", "missing"],
                                            "description": "ok; unusable (recorded at build, see reason); damaged (a blob or the record "
                                            "does not match its sha256: reason names it and the repair command); missing (MODEL_ARTIFACTS "
                                            "expects it and it was never built, or its record is gone)",
                                        },
                                        "size": COUNT,
                                        "sha256": {"type": "string", "description": "of artifact.json, which pins each blob's sha256"},
                                        "usable": {"type": "boolean"},
                                        "reason": _nullable(STRING),
                                    }
                                ),
                            },
                        }
                    ),
                },
                "last_refresh": _nullable(
                    _obj(
                        {
                            "outcome": {
                                "type": ["string", "null"],
                                "enum": [*REFRESH_OUTCOMES, None],
                                "description": "null when every refresh so far was skipped (pinned pointer)",
                            },
                            "model_id": STRING,
                            "revision": _nullable(STRING),
                            "previous_revision": _nullable(STRING),
                            "source": _nullable(STRING),
                            "bytes_moved": COUNT,
                            "files_copied": COUNT,
                            "files_reused": COUNT,
                            "deleted_versions": {"type": "array", "items": STRING},
                            "started": TIME,
                            "finished": _nullable(TIME),
                            "seconds": SECONDS,
                            "error": _nullable(STRING),
                            "error_code": _nullable(STRING),
                            "files_repaired": {"type": "array", "items": STRING, "description": "files a repair copied again"},
                            "artifacts": {
                                "type": "object",
                                "description": 'by variant: "built", "skipped" or "unusable: <reason>"',
                                "additionalProperties": STRING,
                            },
                            "last_skipped_at": TIME,
                            "skipped_reason": {"type": ["string", "null"], "enum": ["pinned", None]},
                        },
                        optional=("last_skipped_at",),
                        description="last-refresh.json: null before the first refresh (and while it is damaged: see damage)",
                    )
                ),
                "damage": {
                    "type": "array",
                    "description": "every damaged record of the store, with the command that repairs it",
                    "items": _obj({"record": STRING, "problem": STRING, "repair": STRING}),
                },
                "instance": _obj(
                    {
                        "state": {"type": "string", "enum": list(HEALTH_STATES)},
                        "degraded": {"type": "boolean"},
                        "problems": {
                            "type": "array",
                            "description": "why what is served is not what was asked for (degraded), each with its repair",
                            "items": _obj(
                                {
                                    "cause": {"type": "string", "enum": ["pointer", "version", "artifact"]},
                                    "problem": STRING,
                                    "repair": STRING,
                                }
                            ),
                        },
                        "loaded": _nullable(
                            _obj(
                                {
                                    "model_id": STRING,
                                    "revision": STRING,
                                    "mode": {"type": "string", "enum": ["memory", "disk"]},
                                    "bytes": COUNT,
                                    "load_seconds": SECONDS,
                                    "loaded_at": TIME,
                                    "backend": served["backend"],
                                    "variant": served["variant"],
                                }
                            )
                        ),
                        "loading": _nullable({"type": "string", "description": '"pending" or the revision being loaded'}),
                        "last_error": _nullable(_obj({"code": STRING, "message": STRING, "at": TIME})),
                        "damaged": _nullable(
                            _obj(
                                {
                                    "revision": STRING,
                                    "code": STRING,
                                    "message": STRING,
                                    "repair": STRING,
                                    "at": TIME,
                                    "next_check_at": _nullable(TIME),
                                },
                                description="the current version failed verification and is not served",
                            )
                        ),
                        "fallbacks": {
                            "type": "array",
                            "description": "tried and refused before what is loaded",
                            "items": _obj(
                                {
                                    "revision": STRING,
                                    "backend": served["backend"],
                                    "variant": served["variant"],
                                    "code": STRING,
                                    "message": STRING,
                                }
                            ),
                        },
                        "last_pointer_check": _nullable(TIME),
                        "load_mode": _nullable({"type": "string", "enum": ["memory", "disk"]}),
                        "reload": _nullable({"type": "string", "enum": ["overlap", "replace"]}),
                        "poll_seconds": _nullable(SECONDS),
                        "backend": _nullable(served["backend"]),
                        "quantize": _nullable({"type": "string", "enum": ["none", "int8"]}),
                    },
                    description="this instance (another instance may have loaded something else)",
                ),
            }
        ),
        "RefreshQueued": _obj(
            {
                "status": {"type": "string", "enum": ["queued"]},
                "message_id": STRING,
                "queue": STRING,
                "revision": _nullable(STRING),
                "moves_pinned_pointer": {"type": "boolean"},
                "repair": {"type": "boolean"},
                "build_artifacts": {"type": "boolean"},
                "result": STRING,
            }
        ),
        "RollbackResult": _obj({"revision": STRING, "previous": {"type": "array", "items": STRING}, "pinned": {"type": "boolean"}}),
        "OpenApiDocument": _obj(
            {
                "openapi": STRING,
                "info": {"type": "object"},
                "servers": {"type": "array"},
                "paths": {"type": "object"},
                "components": {"type": "object"},
                "jsonSchemaDialect": STRING,
            },
            optional=("servers", "jsonSchemaDialect"),
        ),
        "Text": {"type": "string"},
    }
    for status, names in codes.items():
        if status >= 400:
            schemas[f"Error{status}"] = _obj(
                {"error": _obj({"code": {"type": "string", "enum": names}, "message": {"type": "string"}})},
                description=f"codes of status {status}: {', '.join(names)}",
            )
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
    response: dict[str, Any] = {"description": _DESCRIPTIONS[status]}
    if status == 401:
        return response  # from the host, empty body: no content, no schema
    if status == 308:
        response["headers"] = {"Location": {"description": "the page without the trailing slash", "required": True, "schema": STRING}}
        return response  # a redirect: no body
    name: str
    media = "application/json"
    headers: dict[str, Any] = {}
    if status >= 400:
        name = f"Error{status}"
        if status == 503:
            headers["Retry-After"] = _RETRY_AFTER
    else:
        name = {
            "ask": "AskResponse",
            "health": "Health",
            "model": "ModelStatus",
            "model_refresh": "RefreshQueued",
            "model_rollback": "RollbackResult",
            "openapi": "OpenApiDocument",
            "playground": "Text",
            "playground_file": "Text",
        }[operation.name]
    if operation.name == "health" and status == 503:
        name = "Health"  # the state, not an error; 500 keeps the error shape
        response["description"] = "No model loaded on this instance (state loading, empty or error); retry after `Retry-After`"
    if operation.name == "ask" and status == 200:
        headers["Server-Timing"] = {
            "description": "`model;dur=<ms>`: the model's inference time in milliseconds",
            "required": True,
            "schema": {"type": "string", "pattern": "^model;dur=[0-9]+(\\.[0-9]+)?$"},
        }
    if operation.name == "model_refresh" and status == 202:
        headers["Location"] = {"description": "where the outcome shows", "required": True, "schema": {"type": "string"}}
    if operation.name.startswith("playground") and status == 200:
        headers["Content-Security-Policy"] = {"required": True, "schema": {"type": "string", "enum": [CONTENT_SECURITY_POLICY]}}
    content: dict[str, Any]
    if operation.name == "playground" and status == 200:
        content = {"text/html": {"schema": _ref(name)}}
    elif operation.name == "playground_file" and status == 200:
        content = {media_type: {"schema": _ref(name)} for media_type in dict.fromkeys(PLAYGROUND_FILES.values())}
    else:
        content = {media: {"schema": _ref(name)}}
        examples = RESPONSE_EXAMPLES.get(name)
        if examples and (status < 400 or status == 503):
            content[media]["examples"] = copy.deepcopy(examples)
    response["content"] = content
    if headers:
        response["headers"] = headers
    return response


def _operation(operation: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": operation.name,
        "summary": operation.summary,
        "description": operation.description,
        "tags": ["operators" if operation.name.startswith("model") else "api"],
    }
    if operation.parameters:
        out["parameters"] = copy.deepcopy(list(operation.parameters))
    if operation.request:
        body: dict[str, Any] = {"schema": _ref(operation.request)}
        if operation.request in REQUEST_EXAMPLES:
            body["examples"] = copy.deepcopy(REQUEST_EXAMPLES[operation.request])
        out["requestBody"] = {"required": operation.name == "ask", "content": {"application/json": body}}
    out["responses"] = {str(status): _response(operation, status) for status in operation.responses}
    out["security"] = [{"functionKeyHeader": []}, {"functionKeyQuery": []}] if operation.auth == "function" else []
    return out


def limits(settings: Settings) -> dict[str, int]:
    """The request budgets the app enforces under ``settings`` (also in the document's ``info``)."""
    return {
        "max_context_chars": settings.max_context_chars,
        "max_question_chars": settings.max_question_chars,
        "max_question_tokens": settings.max_question_tokens,
        "max_items": settings.max_items,
        "max_windows": settings.max_windows,
        "max_top_k": MAX_TOP_K,
        "max_answer_len": MAX_ANSWER_LEN,
        "max_ask_body_bytes": ask_body_max_bytes(settings),
        "max_operator_body_bytes": OPERATOR_BODY_MAX_BYTES,
    }


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
    budget = limits(settings)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "Isolated question answering",
            "version": "1.0.0",
            "description": (
                f"Extractive question answering with `{settings.model_id}`, served from Blob Storage. "
                "Routes with a function key take it as the `x-functions-key` header or the `code` query parameter; "
                "a missing or wrong key is a 401 with an empty body from the Functions host. "
                'Errors are JSON `{"error": {"code", "message"}}`; every 503 carries `Retry-After`. ' + REQUEST_RULES + " "
                "Limits of this deployment: " + ", ".join(f"{k}={v}" for k, v in budget.items()) + "."
            ),
            "x-limits": budget,
        },
        "paths": {},
        "components": {
            "schemas": _schemas(settings),
            "securitySchemes": {
                "functionKeyHeader": {"type": "apiKey", "in": "header", "name": "x-functions-key", "description": "a function key"},
                "functionKeyQuery": {"type": "apiKey", "in": "query", "name": "code", "description": "a function key"},
            },
        },
    }
    if server:
        doc["servers"] = [{"url": server}]
    for operation in OPERATIONS:
        doc["paths"].setdefault(http_route(operation), {})[operation.method.lower()] = _operation(operation)
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
