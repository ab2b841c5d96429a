"""Wire shapes: each JSON body declared once, as a frozen dataclass, and its JSON Schema made from it.

A *shape* is a frozen dataclass whose fields are what goes over the wire. Its type hints give each
property's JSON type, :func:`wire_field` adds a description and JSON Schema keywords, and
:func:`schema` writes the closed object schema (``required`` and ``additionalProperties: false``)
that the OpenAPI document publishes and the request validator runs. :func:`to_json` turns a shape
into the body the code sends; :func:`from_json` builds one from a body that passed its schema. So
the code, the document and the validator cannot drift: there is one definition.

Declaring a shape::

    @dataclass(frozen=True)
    class RollbackResult:
        wire_description: ClassVar[str] = "the pointer after a rollback"

        revision: str = wire_field("the version now current")
        previous: tuple[str, ...] = wire_field("earlier versions, newest first")
        pinned: bool = wire_field("a scheduled refresh leaves it alone")

Types: ``str``, ``int``, ``float``, ``bool``; ``Literal[...]`` (an ``enum``); ``tuple[X, ...]`` and
``list[X]`` (an array); ``dict[str, X]`` (an object of X by name; ``dict[str, Any]``: any object);
another shape (inlined, or a ``$ref`` when the caller names it in ``refs``); ``X | Y`` of shapes
(``oneOf``); ``X | None`` (nullable: ``null`` allowed; the field is still required). Per field:

- ``optional=True``: a request field the caller may leave out or send as ``null`` (the default
  applies; the schema shows it);
- ``omit_none=True``: a response field left out of the body when it is ``None``;
- ``json_name``: the property's name when it is not a Python name (``x-limits``);
- ``schema``: JSON Schema keywords (``minimum``, ``maxLength``, ``pattern``, ...). A
  :class:`Param` value there, or ``{name}`` in a description, is filled in when the schema is made
  (the limits of the running settings): ``schema={"maxLength": Param("max_context_chars")}``. A
  size keyword filled so also gets ``x-limit``, the name of the limit, for messages that name it.

Everything a shape's schema states is in its module, at or below the layer that produces the body
(import-linter's layers): a shape made in ``store/`` is declared in ``store/``, and the document in
``serving/`` imports it. This module imports nothing of the project, so any layer can declare shapes.

Converting a hand-written schema (``ModelStatus`` in ``serving/openapi.py`` is still one):

1. declare the shape next to the code that builds the body (``ModelStore.status``: ``store/``),
   one field per property, with the description the hand schema had; nested objects are shapes
   too (``pointer: PointerInfo | None``: a nullable one is inlined, so leave it out of ``refs``),
   a map by name is ``dict[str, ArtifactListing]``, an enum that may be null is
   ``Literal["published", ...] | None``, a property that may be absent is ``omit_none=True``;
2. build the shape there and return it; the route sends :func:`to_json` of it (a caller that
   still wants the dict calls :func:`to_json` itself);
3. in ``serving/openapi.py``, list it in ``RESPONSE_SHAPES`` (name -> class) and delete the hand
   schema; ``tests/integration/test_openapi.py`` checks the result is closed and that every
   response the tests produce matches it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, Literal, Union, get_args, get_origin

_KEY = "wire"
_SIZE_KEYWORDS = frozenset({"maxLength", "maxItems", "maximum", "minLength", "minItems", "minimum"})


@dataclass(frozen=True)
class Param:
    """A schema value filled in when the schema is made, from the ``params`` given to :func:`schema`."""

    name: str


@dataclass(frozen=True)
class _Spec:
    description: str = ""
    schema: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optional: bool = False
    omit_none: bool = False
    json_name: str | None = None


def wire_field(
    description: str = "",
    *,
    default: Any = MISSING,
    default_factory: Any = MISSING,
    optional: bool = False,
    omit_none: bool = False,
    json_name: str | None = None,
    schema: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    init: bool = True,
) -> Any:
    """A dataclass field of a shape: ``dataclasses.field`` with what the schema says about it.

    Args:
        description: the property's description (``{name}`` filled from the params).
        default, default_factory, init: as for ``dataclasses.field``.
        optional: a request field that may be left out or sent as ``null`` (needs a default).
        omit_none: a response field left out of the body when ``None`` (needs a default).
        json_name: the property's name on the wire, when it differs from the field's.
        schema: JSON Schema keywords for the property; :class:`Param` values are filled in.
        metadata: more field metadata, for the shape's own use.
    """
    if (optional or omit_none) and default is MISSING and default_factory is MISSING:
        raise TypeError("an optional or omit_none field needs a default")
    spec = _Spec(description, dict(schema or {}), optional, omit_none, json_name)
    extra = {**(metadata or {}), _KEY: spec}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=extra, init=init)
    return dataclasses.field(default=default, metadata=extra, init=init)


def _spec(field: dataclasses.Field[Any]) -> _Spec:
    spec = field.metadata.get(_KEY)
    return spec if isinstance(spec, _Spec) else _Spec()


def wire_name(field: dataclasses.Field[Any]) -> str:
    """The property name of ``field`` in JSON."""
    return _spec(field).json_name or field.name


def shape_fields(shape: type | object) -> tuple[dataclasses.Field[Any], ...]:
    """The fields of a shape (class or instance) that go over the wire, in order."""
    return dataclasses.fields(shape)  # type: ignore[arg-type]


# --- schema -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    params: Mapping[str, Any]
    refs: Mapping[type, str]
    ref_prefix: str


def schema(
    shape: type,
    *,
    params: Mapping[str, Any] | None = None,
    refs: Mapping[type, str] | None = None,
    ref_prefix: str = "#/components/schemas/",
    description: str | None = None,
) -> dict[str, Any]:
    """The closed JSON Schema (2020-12) object of ``shape``.

    Args:
        shape: a dataclass.
        params: the values of the :class:`Param` markers and ``{name}`` fields of descriptions.
        refs: shapes written as ``$ref`` to ``ref_prefix + name`` where they are nested (others are inlined).
        description: the object's description, instead of the shape's ``wire_description``.

    Raises:
        TypeError: a field type this generator does not map; KeyError: a param that was not given.
    """
    context = _Context(params or {}, refs or {}, ref_prefix)
    return _object(shape, context, description)


def _object(shape: type, context: _Context, description: str | None = None) -> dict[str, Any]:
    hints = typing.get_type_hints(shape)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in shape_fields(shape):
        spec = _spec(field)
        name = spec.json_name or field.name
        hint = hints[field.name]
        if spec.optional or spec.omit_none:  # None stands for "left out": the JSON type is the other one
            hint = _without_none(hint)
        prop = _type(hint, context)
        if spec.optional:
            prop = nullable(prop)
            if field.default is not MISSING and field.default is not None:
                prop["default"] = _value(field.default)
        for keyword, value in spec.schema.items():
            if isinstance(value, Param):
                prop[keyword] = context.params[value.name]
                if keyword in _SIZE_KEYWORDS:
                    prop["x-limit"] = value.name
            else:
                prop[keyword] = value
        if spec.description:
            prop["description"] = spec.description.format_map(context.params)
        properties[name] = prop
        if not (spec.optional or spec.omit_none):
            required.append(name)
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:  # OpenAPI 3.0 refuses an empty list
        out["required"] = required
    text = description if description is not None else getattr(shape, "wire_description", "")
    if text:
        out["description"] = text.format_map(context.params)
    return out


def _type(hint: Any, context: _Context) -> dict[str, Any]:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return {}
    if origin in (Union, types.UnionType):
        members = [arg for arg in args if arg is not type(None)]
        if len(members) == 1:
            inner = _type(members[0], context)
            return nullable(inner) if len(members) < len(args) else inner
        if len(members) < len(args):
            raise TypeError(f"{hint}: a union of several types cannot also be None")
        return {"oneOf": [_type(member, context) for member in members]}
    if origin is Literal:
        kinds = {_JSON_TYPES[type(value)] for value in args}
        if len(kinds) != 1:
            raise TypeError(f"{hint}: the values of a Literal must have one JSON type")
        return {"type": kinds.pop(), "enum": list(args)}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin in (tuple, list, Sequence):
        if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):
            raise TypeError(f"{hint}: only tuple[X, ...] maps to an array")
        return {"type": "array", "items": _type(args[0], context)}
    if origin in (dict, Mapping):
        if args and args[1] is not Any:
            return {"type": "object", "additionalProperties": _type(args[1], context)}
        return {"type": "object"}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if hint in context.refs:
            return {"$ref": context.ref_prefix + context.refs[hint]}
        return _object(hint, context)
    raise TypeError(f"{hint} has no JSON Schema mapping")


def _without_none(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return hint


_JSON_TYPES: dict[Any, str] = {str: "string", bool: "boolean", int: "integer", float: "number"}


def nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """``prop`` that also allows ``null`` (a type list, as OpenAPI 3.1 writes it)."""
    if "type" not in prop:
        raise TypeError("only a typed schema can be nullable (a referenced shape cannot: inline it)")
    out = dict(prop)
    kinds = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    out["type"] = [*kinds, "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


# --- values -----------------------------------------------------------------------------------


def to_json(shape: object) -> dict[str, Any]:
    """The JSON object of a shape: its fields by wire name, in order, nested shapes and tuples
    converted; ``omit_none`` fields that are ``None`` left out."""
    out: dict[str, Any] = {}
    for field in shape_fields(shape):
        spec = _spec(field)
        value = getattr(shape, field.name)
        if value is None and spec.omit_none:
            continue
        out[spec.json_name or field.name] = _value(value)
    return out


def _value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(value)
    if isinstance(value, (tuple, list)):
        return [_value(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _value(item) for key, item in value.items()}
    return value


_Shape = typing.TypeVar("_Shape")


def from_json(shape: type[_Shape], data: Mapping[str, Any]) -> _Shape:
    """A shape built from a JSON object that passed the shape's schema: ``null`` and absent
    optional fields take their defaults, a whole number written ``2.0`` becomes ``2``, nested
    shapes and arrays are built as declared."""
    hints = typing.get_type_hints(shape)
    values: dict[str, Any] = {}
    for field in shape_fields(shape):
        name = wire_name(field)
        if field.init and data.get(name) is not None:
            values[field.name] = _build(hints[field.name], data[name])
    return shape(**values)


def _build(hint: Any, value: Any) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        members = [arg for arg in args if arg is not type(None)]
        return _build(members[0], value) if len(members) == 1 else value
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if origin in (tuple, list, Sequence) and isinstance(value, list):
        items = [_build(args[0], item) for item in value]
        return items if origin is list else tuple(items)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return from_json(hint, value)
    return value


__all__ = ["Param", "from_json", "nullable", "schema", "shape_fields", "to_json", "wire_field", "wire_name"]
