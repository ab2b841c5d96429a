"""The one check of every request, HTTP and command line alike, against the OpenAPI document's own schemas.

The request schemas of :mod:`.openapi` are made from the request shapes (``AskItem`` is
:class:`~shared.engine.question_answering.QAItem`, ``AskBatch``, ``RefreshRequest``,
``RollbackRequest``); ``jsonschema`` (Draft 2020-12, the dialect of the 3.1 document) runs them,
and a body that passes is built into its shape. A failure becomes the message that names the
field: 400 ``bad_request``, or 413 ``too_large`` for a size limit (``maxLength``, ``maxItems``),
naming its setting. :func:`check_ask` is what ``/api/ask``, ``python -m shared ask`` and each line
of ``python -m shared answer`` run: the same verdicts and the same messages. Rules the document
states too:

- request bodies are closed: an unknown field is a 400 that names it;
- an optional field sent as ``null`` is the same as leaving it out;
- a whole number may be written ``2.0`` (JSON Schema's ``integer``);
- query parameters are checked against their ``enum``; an undocumented one is ignored.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from ..engine.question_answering import QAItem, check_text, decode_utf8
from ..errors import InputError, TooLargeError
from ..settings import Limits
from ..wire import from_json
from .openapi import OPERATIONS, REQUEST_SHAPES, request_schemas
from .shapes import AskBatch

_SIZE_KEYWORDS = frozenset({"maxLength", "maxItems"})
_TYPE_WORDS = {
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "object": "a JSON object",
    "array": "a list",
}
_SCHEMA_OF = {shape: name for name, shape in REQUEST_SHAPES.items()}
_Shape = TypeVar("_Shape")


@functools.lru_cache(maxsize=8)
def _validators(limits: Limits) -> dict[str, Draft202012Validator]:
    """A validator per request schema under ``limits``, built once."""
    schemas = request_schemas(limits)
    root = {"components": {"schemas": schemas}}
    registry: Registry[Any] = Registry().with_resource("urn:requests", Resource.from_contents(root, default_specification=DRAFT202012))
    return {name: Draft202012Validator({"$ref": f"urn:requests#/components/schemas/{name}"}, registry=registry) for name in schemas}


def check_body(limits: Limits, shape: type[_Shape], data: Mapping[str, Any]) -> _Shape:
    """``data`` checked against the document's schema of ``shape`` (a request shape), then built
    into it (``null`` optional fields take their defaults, ``2.0`` is ``2``).

    Raises:
        InputError: the first problem, naming the field (TooLargeError for a size limit).
    """
    errors = list(_validators(limits)[_SCHEMA_OF[shape]].iter_errors(data))
    if errors:
        # a wrong field before a size limit, then in the order the schema met them
        first = min(enumerate(errors), key=lambda pair: (pair[1].validator in _SIZE_KEYWORDS, pair[0]))[1]
        raise _friendly(first)
    return from_json(shape, data)


def check_ask(limits: Limits, data: Mapping[str, Any]) -> tuple[list[QAItem], bool]:
    """The items of a question body, one item or ``{"items": [...]}`` (then ``True``), checked
    against the document's ``AskItem`` / ``AskBatch`` (the limits that need no model included),
    then as text the tokenizer can read (no lone surrogate). The engine checks what needs the
    tokenizer (question tokens, windows).

    Raises:
        InputError: the first problem, naming the field (TooLargeError for a size limit).
    """
    batch = "items" in data
    items = list(check_body(limits, AskBatch, data).items) if batch else [check_body(limits, QAItem, data)]
    for index, item in enumerate(items):
        where = f"items[{index}]." if batch else ""
        check_text(item.question, where + "question")
        check_text(item.context, where + "context")
    return items, batch


def parse_json_object(raw: bytes, *, max_bytes: int | None = None, what: str = "the request body", field: str = "body") -> dict[str, Any]:
    """Decode ``raw`` (a request body, a line of input) that must be a JSON object.

    Raises:
        TooLargeError: over ``max_bytes`` (an HTTP body's limit).
        InputError: empty, not UTF-8, not JSON, nested too deeply for the decoder, or not an object.
    """
    if max_bytes is not None and len(raw) > max_bytes:
        raise TooLargeError(f"{what} has {len(raw)} bytes; the limit is {max_bytes}", field=field)
    if not raw.strip():
        raise InputError(f"{what} must be a JSON object", field=field)
    text = decode_utf8(raw, what=what, field=field)
    try:
        data = json.loads(text)
    except ValueError:
        raise InputError(f"{what} is not valid JSON", field=field) from None
    except RecursionError:  # the decoder recurses once per level: thousands of '[' exhaust the stack
        raise InputError(f"{what} is nested too deeply to be read", field=field) from None
    if not isinstance(data, dict):
        raise InputError(f"{what} must be a JSON object", field=field)
    return data


def check_query(operation: str, params: Mapping[str, str]) -> dict[str, str]:
    """The documented query parameters of ``operation`` found in ``params``, each checked against
    its schema; undocumented ones (``code``, the function key) are not the app's and are ignored.

    Raises:
        InputError: a value outside the parameter's schema, naming it.
    """
    [spec] = [op for op in OPERATIONS if op.name == operation]
    found: dict[str, str] = {}
    for parameter in spec.parameters:
        if parameter["in"] != "query" or parameter["name"] not in params:
            continue
        name, value = parameter["name"], params[parameter["name"]]
        for error in Draft202012Validator(parameter["schema"]).iter_errors(value):
            allowed = error.schema.get("enum")
            if allowed is not None:
                raise InputError(f"'{name}' must be one of {', '.join(allowed)}, got {value[:20]!r}", field=name)
            raise InputError(f"'{name}' is not valid: {error.message[:200]}", field=name)
        found[name] = value
    return found


def field_name(path: Iterable[str | int]) -> str:
    """``['items', 0, 'top_k']`` as ``items[0].top_k``; a caller's key is cut to 40 characters and
    escaped where it is not text (a lone surrogate), as it goes back in the message."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part[:40].encode("utf-8", "backslashreplace").decode("utf-8")
            out += f".{name}" if out else name
    return out


def _limit(error: ValidationError) -> str:
    """The limit a size keyword met, with its setting when a setting sets it: ``300 (QA_MAX_CONTEXT_CHARS)``."""
    name = error.schema.get("x-limit")
    setting = Limits.setting(name) if isinstance(name, str) else None
    return f"{error.validator_value} ({setting})" if setting else str(error.validator_value)


def _kinds(schema: Mapping[str, Any]) -> list[str]:
    kinds = schema.get("type", [])
    return [kind for kind in ([kinds] if isinstance(kinds, str) else kinds) if kind != "null"]


def _friendly(error: ValidationError) -> InputError:
    """One jsonschema error as the message a caller reads: what is wrong, naming the field."""
    path = list(error.absolute_path)
    field = field_name(path)
    name = str(path[-1]) if path else ""
    keyword, schema, instance = error.validator, error.schema, error.instance
    if keyword == "required":
        missing = next(key for key in error.validator_value if key not in instance)
        where = field_name([*path, missing])
        return InputError(f"'{where}' is required", field=where)
    if keyword == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        unknown = sorted(key for key in instance if key not in allowed)[0]
        where = field_name([*path, unknown])
        return InputError(f"unknown field '{where}'; the fields are {', '.join(allowed)}", field=where)
    if name == "items" and keyword in ("type", "minItems"):
        return InputError("'items' must be a non-empty list of {question, context} objects", field="items")
    if keyword == "type":
        if "object" in _kinds(schema):
            where = field or "the request body"
            return InputError(f"'{where}' must be a JSON object" if field else f"{where} must be a JSON object", field=field or "body")
        wanted = " or ".join(_TYPE_WORDS.get(kind, kind) for kind in _kinds(schema))
        return InputError(f"'{field}' must be {wanted}", field=field)
    if keyword in ("minimum", "maximum"):
        return InputError(f"'{field}' must be between {schema.get('minimum')} and {schema.get('maximum')}, got {instance}", field=field)
    if keyword == "maxLength":
        return TooLargeError(f"'{field}' has {len(instance)} characters; the limit is {_limit(error)}", field=field)
    if keyword == "maxItems":
        return TooLargeError(f"'{field}' has {len(instance)} entries; the limit is {_limit(error)}", field=field)
    if keyword in ("minLength", "pattern") and name in ("question", "context"):
        if keyword == "minLength" or not str(instance).strip():
            return InputError(f"'{field}' must not be empty", field=field)
        return InputError(f"'{field}' must contain a letter or digit", field=field)
    if keyword == "pattern" and name == "revision":
        return InputError(
            f"'{field}' must name a branch, tag or commit (letters, digits, '.', '_', '/', '-'; no '..'), got {str(instance)[:130]!r}",
            field=field,
        )
    if keyword == "enum":
        return InputError(f"'{field}' must be one of {', '.join(map(str, error.validator_value))}", field=field)
    return InputError(f"'{field or 'body'}' is not valid: {error.message[:200]}", field=field or "body")
