"""The schema generator of the wire shapes: each JSON body's schema comes from its dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pytest
from jsonschema import Draft202012Validator

from shared.wire import Param, from_json, schema, to_json, wire_field


@dataclass(frozen=True)
class Span:
    text: str = wire_field("the span", schema={"maxLength": Param("max_chars")})
    start: int = wire_field(schema={"minimum": 0})


@dataclass(frozen=True)
class Spans:
    spans: tuple[Span, ...] = wire_field("best first")


@dataclass(frozen=True)
class Request:
    wire_description: ClassVar[str] = "at most {max_chars} characters; `{{}}` is fine"

    question: str = wire_field()
    top_k: int = wire_field(default=1, optional=True, schema={"minimum": 1})
    spans: tuple[Span, ...] = wire_field(default=(), optional=True)


@dataclass(frozen=True)
class Response:
    state: Literal["ready", "empty"] = wire_field()
    outcome: Literal["ok", "failed"] | None = wire_field("null before the first")
    first: Span | Spans = wire_field()
    by_name: dict[str, Span] = wire_field()
    anything: dict[str, Any] = wire_field()
    limit: int = wire_field(json_name="x-limit")
    loaded: Span | None = wire_field()
    revision: str | None = wire_field(default=None, omit_none=True)


PARAMS = {"max_chars": 10}


def test_a_shape_is_a_closed_object_with_its_fields_required() -> None:
    made = schema(Span, params=PARAMS)
    assert made == {
        "type": "object",
        "properties": {
            "text": {"type": "string", "maxLength": 10, "x-limit": "max_chars", "description": "the span"},
            "start": {"type": "integer", "minimum": 0},
        },
        "additionalProperties": False,
        "required": ["text", "start"],
    }


def test_optional_request_fields_take_null_and_show_their_default() -> None:
    made = schema(Request, params=PARAMS, refs={Span: "Span"})
    assert made["required"] == ["question"]
    assert made["properties"]["top_k"] == {"type": ["integer", "null"], "default": 1, "minimum": 1}
    assert made["properties"]["spans"] == {"type": ["array", "null"], "items": {"$ref": "#/components/schemas/Span"}, "default": []}
    assert made["description"] == "at most 10 characters; `{}` is fine"


def test_response_types_unions_maps_and_names() -> None:
    made = schema(Response, params=PARAMS, refs={Spans: "Spans"})
    properties = made["properties"]
    assert properties["state"] == {"type": "string", "enum": ["ready", "empty"]}
    assert properties["outcome"] == {"type": ["string", "null"], "enum": ["ok", "failed", None], "description": "null before the first"}
    assert properties["first"] == {"oneOf": [schema(Span, params=PARAMS), {"$ref": "#/components/schemas/Spans"}]}
    assert properties["by_name"] == {"type": "object", "additionalProperties": schema(Span, params=PARAMS)}
    assert properties["anything"] == {"type": "object"}
    assert properties["revision"] == {"type": "string"}  # left out when None: never null
    assert "x-limit" in properties and "revision" not in made["required"]
    with pytest.raises(TypeError, match="inline"):
        schema(Response, params=PARAMS, refs={Span: "Span"})  # a nullable shape cannot be a $ref
    inline = properties["loaded"]
    assert inline["type"] == ["object", "null"] and inline["additionalProperties"] is False


def test_to_json_and_from_json_round_trip_through_the_schema() -> None:
    response = Response("ready", None, Spans((Span("a", 0),)), {"x": Span("b", 1)}, {"k": [1]}, 3, Span("c", 2))
    body = to_json(response)
    assert body == {
        "state": "ready",
        "outcome": None,
        "first": {"spans": [{"text": "a", "start": 0}]},
        "by_name": {"x": {"text": "b", "start": 1}},
        "anything": {"k": [1]},
        "x-limit": 3,
        "loaded": {"text": "c", "start": 2},
    }
    components = {"Spans": schema(Spans, params=PARAMS)}
    root = {"$defs": components, **schema(Response, params=PARAMS, refs={Spans: "Spans"}, ref_prefix="#/$defs/")}
    assert list(Draft202012Validator(root).iter_errors(body)) == []
    assert list(Draft202012Validator(root).iter_errors({**body, "surprise": 1}))
    data = {"question": "q", "top_k": 2.0, "spans": [{"text": "a", "start": 0}]}
    assert from_json(Request, data) == Request("q", 2, (Span("a", 0),))
    assert from_json(Request, {"question": "q", "top_k": None, "spans": None}) == Request("q")


def test_what_has_no_mapping_is_refused() -> None:
    @dataclass(frozen=True)
    class Odd:
        pair: tuple[int, str] = wire_field()

    with pytest.raises(TypeError, match=r"tuple\[X, \.\.\.\]"):
        schema(Odd)
    with pytest.raises(TypeError, match="default"):
        wire_field(optional=True)
    with pytest.raises(KeyError):
        schema(Span)  # its Param was not given
