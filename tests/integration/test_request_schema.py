"""One schema: the request schemas of the OpenAPI document are what validates requests,
so the document's verdict on a body (jsonschema, as any client or tester checks it) and the API's
are the same; failures keep the messages that name the field; the rules for ``null``, ``2.0`` and
unknown fields hold on every route and are stated in the document."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from shared.serving.holder import ModelHolder
from shared.serving.openapi import document
from shared.settings import Settings
from tests.fixtures.function_calls import call

pytestmark = pytest.mark.integration
CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."
Q = {"question": "Who won?", "context": CONTEXT}

# (route, body): valid and invalid bodies near every rule the issue names
BODIES: list[tuple[str, Any]] = [
    ("ask", Q),
    ("ask", {**Q, "top_k": None}),
    ("ask", {**Q, "top_k": 2.0}),
    ("ask", {**Q, "top_k": 2.5}),
    ("ask", {**Q, "top_k": "2"}),
    ("ask", {**Q, "top_k": True}),
    ("ask", {**Q, "top_k": 0}),
    ("ask", {**Q, "top_k": 21}),
    ("ask", {**Q, "max_answer_len": None}),
    ("ask", {**Q, "max_answer_len": 15.0}),
    ("ask", {**Q, "handle_impossible_answer": None}),
    ("ask", {**Q, "handle_impossible_answer": 1}),
    ("ask", {**Q, "tpo_k": 3}),
    ("ask", {**Q, "items": [Q]}),
    ("ask", {"items": [Q], "extra": 1}),
    ("ask", {"items": [{**Q, "top_k": 3.0}, {**Q, "handle_impossible_answer": None}]}),
    ("ask", {"items": [Q, {**Q, "surprise": True}]}),
    ("ask", {"items": []}),
    ("ask", {"items": None}),
    ("ask", {"question": None, "context": CONTEXT}),
    ("ask", {"question": " \t", "context": CONTEXT}),
    ("ask", {"question": "Who won?"}),
    ("model_refresh", {}),
    ("model_refresh", {"revision": None, "unpin": None, "repair": None, "build_artifacts": None}),
    ("model_refresh", {"revision": "main", "unpin": True}),
    ("model_refresh", {"revision": "a..b"}),
    ("model_refresh", {"revision": 3}),
    ("model_refresh", {"unpin": "yes"}),
    ("model_refresh", {"force": True}),
    ("model_rollback", {}),
    ("model_rollback", {"to": None}),
    ("model_rollback", {"to": 3}),
    ("model_rollback", {"to": "main", "pin": False}),
]
SCHEMA_OF = {"ask": "AskRequest", "model_refresh": "RefreshRequest", "model_rollback": "RollbackRequest"}


def documented_verdict(doc: dict[str, Any], route: str, body: Any) -> bool:
    registry = Registry().with_resource("urn:openapi", Resource.from_contents(doc, default_specification=DRAFT202012))
    validator = Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{SCHEMA_OF[route]}"}, registry=registry)
    return validator.is_valid(body)


def test_the_document_and_the_api_agree_on_every_body(env: dict[str, str], install: Callable[..., ModelHolder]) -> None:
    """No model is isolated: a body the document allows gets past validation to 503 (ask) / 202
    (refresh) / 404 (rollback: nothing to roll back to); one it refuses is a 400 naming the field."""
    holder = install(env)
    doc = call("openapi")[1]
    disagreements = []
    for route, body in BODIES:
        status, answer, _ = call(route, body=body)
        valid = documented_verdict(doc, route, body)
        if valid != (status not in (400, 413)):
            disagreements.append((route, json.dumps(body)[:80], "document", valid, "api", status, answer))
    assert disagreements == []
    assert holder.settings.model_id == "tests/tiny-bert"


@pytest.mark.parametrize(
    ("route", "body", "field", "message"),
    [
        ("ask", {**Q, "top_k": 0}, "top_k", "'top_k' must be between 1 and 20, got 0"),
        ("ask", {**Q, "top_k": 2.5}, "top_k", "'top_k' must be a whole number"),
        ("ask", {**Q, "handle_impossible_answer": 1}, "handle_impossible_answer", "'handle_impossible_answer' must be true or false"),
        ("ask", {"question": "Who?"}, "context", "'context' is required"),
        ("ask", {"question": "", "context": CONTEXT}, "question", "'question' must not be empty"),
        ("ask", {**Q, "tpo_k": 3}, "tpo_k", "unknown field 'tpo_k'; the fields are question, context, top_k, max_answer_len, "),
        ("ask", {"items": [Q, {**Q, "top_k": 99}]}, "items[1].top_k", "'items[1].top_k' must be between 1 and 20, got 99"),
        ("ask", {"items": [Q, {**Q, "surprise": 1}]}, "items[1].surprise", "unknown field 'items[1].surprise'"),
        ("ask", {"items": [Q, "text"]}, "items[1]", "'items[1]' must be a JSON object"),
        ("ask", {"items": []}, "items", "'items' must be a non-empty list of {question, context} objects"),
        ("model_refresh", {"force": True}, "force", "unknown field 'force'; the fields are revision, unpin, repair, build_artifacts"),
        ("model_refresh", {"revision": "a..b"}, "revision", "'revision' must name a branch, tag or commit"),
        ("model_rollback", {"to": 3}, "to", "'to' must be a string"),
        ("model_rollback", {"pin": False}, "pin", "unknown field 'pin'; the fields are to"),
    ],
)
def test_refusals_name_the_field(
    env: dict[str, str], install: Callable[..., ModelHolder], route: str, body: Any, field: str, message: str
) -> None:
    install(env)
    status, answer, _ = call(route, body=body)
    assert (status, answer["error"]["code"]) == (400, "bad_request")
    assert answer["error"]["message"].startswith(message), answer
    assert f"'{field}'" in answer["error"]["message"]


def test_size_budgets_stay_413(env: dict[str, str], install: Callable[..., ModelHolder]) -> None:
    install({**env, "QA_MAX_CONTEXT_CHARS": "50", "QA_MAX_ITEMS": "2"})
    status, answer, _ = call("ask", body=Q)
    assert (status, answer["error"]["code"]) == (413, "too_large")
    assert answer["error"]["message"] == f"'context' has {len(CONTEXT)} characters; the limit is 50 (QA_MAX_CONTEXT_CHARS)"
    status, answer, _ = call("ask", body={"items": [{"question": "Who?", "context": "Denver won."}] * 3})
    assert (status, answer["error"]["message"]) == (413, "'items' has 3 entries; the limit is 2 (QA_MAX_ITEMS)")
    # a wrong field is named before a budget
    status, answer, _ = call("ask", body={**Q, "top_k": "3"})
    assert (status, answer["error"]["message"]) == (400, "'top_k' must be a whole number")


@pytest.mark.parametrize(("route", "params"), [("health", {"warm": "AAA"}), ("health", {"warm": ""}), ("openapi", {"version": "2.0"})])
def test_query_parameters_are_checked_against_their_enum(
    env: dict[str, str], install: Callable[..., ModelHolder], route: str, params: dict[str, str]
) -> None:
    holder = install(env)
    [name] = params
    status, answer, _ = call(route, params=params)
    assert (status, answer["error"]["code"]) == (400, "bad_request")
    assert answer["error"]["message"].startswith(f"'{name}' must be one of "), answer
    assert holder.state == "empty"  # ?warm=AAA did not start a load


def test_undocumented_query_parameters_are_ignored(env: dict[str, str], install: Callable[..., ModelHolder]) -> None:
    install(env)
    assert call("health", params={"warm": "0", "code": "a-function-key", "other": "x"})[0] == 503


def test_the_document_states_the_rules() -> None:
    doc = document(Settings())
    schemas = doc["components"]["schemas"]
    for name in ("AskItem", "AskBatch", "RefreshRequest", "RollbackRequest"):
        assert schemas[name]["additionalProperties"] is False, name
    item = schemas["AskItem"]["properties"]
    assert item["top_k"]["type"] == item["max_answer_len"]["type"] == ["integer", "null"]
    assert item["handle_impossible_answer"]["type"] == ["boolean", "null"]
    description = doc["info"]["description"]
    assert "unknown field" in description and "null" in description and "2.0" in description
    older = document(Settings(), version="3.0")["components"]["schemas"]["AskItem"]["properties"]["top_k"]
    assert older["type"] == "integer" and older["nullable"] is True


def test_score_is_described_as_a_sum_that_can_exceed_one() -> None:
    score = document(Settings())["components"]["schemas"]["Answer"]["properties"]["score"]
    assert "maximum" not in score and "probability of the span" not in score["description"]
    assert "summed" in score["description"] and "exceed 1" in score["description"]
