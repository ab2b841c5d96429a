"""The OpenAPI documents: valid in both versions, equal to the registered routes, closed response
schemas, error codes from ``shared/errors.py``, and every documented limit enforced at the limit
and one past it under non-default settings. (Every response of every test is also checked against
the document by the hook in ``tests/conftest.py``.)"""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from shared import errors
from shared.engine.question_answering import Limits, QAItem
from shared.engine.torch_model import engine_from_dir
from shared.serving.holder import ModelHolder
from shared.serving.openapi import CONTENT_SECURITY_POLICY, OPERATIONS, PLAYGROUND_FILES, document, error_codes
from shared.settings import Settings
from shared.store.model_store import ModelStore
from tests.conftest import registered_functions, response_mismatches
from tests.fixtures.function_calls import respond
from tests.fixtures.functions_host import serve
from tests.fixtures.tiny_models import publish

pytestmark = pytest.mark.integration
FUNCTIONS = registered_functions()
CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."
# every error code the API may answer, with its status (shared/errors.py)
CONTRACT_CODES = {
    "bad_request": 400,
    "too_large": 413,
    "not_found": 404,
    "conflict": 409,
    "refresh_running": 409,
    "pointer_changed": 409,
    "unsafe_model": 422,
    "validation_failed": 422,
    "integrity_error": 503,
    "storage_unavailable": 503,
    "source_unavailable": 503,
    "model_not_ready": 503,
    "busy": 503,
    "deadline_exceeded": 503,
    "internal_error": 500,
}
LIMIT_ENV = {
    "QA_MAX_CONTEXT_CHARS": "300",
    "QA_MAX_QUESTION_CHARS": "40",
    "QA_MAX_QUESTION_TOKENS": "12",
    "QA_MAX_ITEMS": "3",
    "QA_MAX_WINDOWS": "4",
}


def status_and_json(response: func.HttpResponse) -> tuple[int, Any]:
    return response.status_code, json.loads(response.get_body())


# --- the documents ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["3.1", "3.0"])
def test_both_versions_pass_the_openapi_validator(version: str) -> None:
    for settings in (Settings(), Settings.from_env(LIMIT_ENV)):
        doc = document(settings, version=version, server="https://example.azurewebsites.net")
        validate(doc)
        assert doc["openapi"] == {"3.1": "3.1.0", "3.0": "3.0.3"}[version]


def test_the_validator_refuses_31_schema_keywords_in_a_30_document() -> None:
    doc = document(Settings(), version="3.0")
    broken = copy.deepcopy(doc)
    broken["components"]["schemas"]["Health"]["properties"]["state"]["type"] = ["string", "null"]
    with pytest.raises(Exception, match="string"):
        validate(broken)
    assert "securitySchemes" not in doc["components"]  # API Management ignores them
    assert all("security" not in op for item in doc["paths"].values() for op in item.values())
    assert '"examples"' not in json.dumps(doc) and '"null"' not in json.dumps(doc)


def test_routes_equal_the_registered_http_functions() -> None:
    registered = set()
    for name, function in FUNCTIONS.items():
        trigger = json.loads(function.get_raw_bindings()[0])
        if trigger["type"] == "httpTrigger":
            for method in trigger["methods"]:
                registered.add((name, method.upper(), "/api/" + trigger["route"], trigger["authLevel"].upper()))
    documented = set()
    for path, item in document(Settings())["paths"].items():
        for method, operation in item.items():
            auth = "FUNCTION" if operation["security"] else "ANONYMOUS"
            documented.add((operation["operationId"], method.upper(), path, auth))
            assert ("401" in operation["responses"]) == (auth == "FUNCTION"), path
    assert documented == registered
    assert {op.name for op in OPERATIONS} == {name for name, *_ in registered}


def _walk(schema: Any, doc: dict[str, Any], seen: set[str]) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name not in seen:
                seen.add(name)
                yield from _walk(doc["components"]["schemas"][name], doc, seen)
            return
        yield schema
        for value in schema.values():
            yield from _walk(value, doc, seen)
    elif isinstance(schema, list):
        for value in schema:
            yield from _walk(value, doc, seen)


def test_response_schemas_are_closed_objects() -> None:
    doc = document(Settings())
    checked = 0
    for item in doc["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if status in ("401", "308"):
                    assert "content" not in response  # the host's empty 401, the playground's redirect: no body
                    continue
                for media, content in response["content"].items():
                    for schema in _walk(content["schema"], doc, set()):
                        if "properties" in schema and schema is not doc["components"]["schemas"]["OpenApiDocument"]["properties"]:
                            assert schema.get("additionalProperties") is False, (media, schema)
                            assert "required" in schema, (media, schema)
                            checked += 1
                if status == "503":
                    assert response["headers"]["Retry-After"]["required"] is True
    assert checked > 20


def test_error_codes_are_those_of_errors_py_and_the_contract() -> None:
    doc = document(Settings())
    documented = {
        code: int(name.removeprefix("Error"))
        for name, schema in doc["components"]["schemas"].items()
        if name.startswith("Error")
        for code in schema["properties"]["error"]["properties"]["code"]["enum"]
    }
    for code, status in CONTRACT_CODES.items():
        assert documented[code] == status, code
    assert error_codes()[413] == ["too_large"]
    assert documented[errors.BusyError.code] == errors.BusyError.status


def test_examples_match_their_schemas() -> None:
    doc = document(Settings())
    registry = Registry().with_resource("urn:openapi", Resource.from_contents(doc, default_specification=DRAFT202012))
    count = 0
    for item in doc["paths"].values():
        for operation in item.values():
            bodies = [operation.get("requestBody", {}).get("content", {})]
            bodies += [response.get("content", {}) for response in operation["responses"].values()]
            for content in bodies:
                for media in content.values():
                    for example in media.get("examples", {}).values():
                        validator = Draft202012Validator({"$ref": "urn:openapi" + media["schema"]["$ref"]}, registry=registry)
                        validator.validate(example["value"])
                        count += 1
    assert count >= 8


def test_limits_in_the_document_follow_the_settings(env: dict[str, str], install: Callable[[dict[str, str]], ModelHolder]) -> None:
    install({**env, **LIMIT_ENV})
    status, doc = status_and_json(respond("openapi"))
    assert status == 200 and doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": "https://example.azurewebsites.net"}]
    limits = doc["info"]["x-limits"]
    assert limits["max_context_chars"] == 300 and limits["max_items"] == 3 and limits["max_windows"] == 4
    schemas = doc["components"]["schemas"]
    item = schemas["AskItem"]["properties"]
    assert item["context"]["maxLength"] == limits["max_context_chars"]
    assert item["question"]["maxLength"] == limits["max_question_chars"]
    assert item["top_k"]["maximum"] == limits["max_top_k"] and item["max_answer_len"]["maximum"] == limits["max_answer_len"]
    assert schemas["AskBatch"]["properties"]["items"]["maxItems"] == limits["max_items"]
    assert schemas["AskResults"]["properties"]["results"]["maxItems"] == limits["max_items"]
    status, older = status_and_json(respond("openapi", params={"version": "3.0"}))
    assert status == 200 and older["openapi"] == "3.0.3" and older["info"]["x-limits"] == limits
    status, body = status_and_json(respond("openapi", params={"version": "2.0"}))
    assert status == 400 and body["error"]["code"] == "bad_request"


# --- each documented limit, at the limit and one past it ----------------------------------------


def ask(body: object = None, raw: bytes | None = None) -> tuple[int, Any]:
    return status_and_json(respond("ask", body=body, raw=raw))


def test_each_documented_limit_at_and_one_past(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[[dict[str, str]], ModelHolder]
) -> None:
    publish(store, tiny_bert_dir)
    install({**env, **LIMIT_ENV})
    limits = status_and_json(respond("openapi"))[1]["info"]["x-limits"]
    assert {k: limits[k] for k in ("max_context_chars", "max_question_chars", "max_question_tokens", "max_items")} == {
        "max_context_chars": 300,
        "max_question_chars": 40,
        "max_question_tokens": 12,
        "max_items": 3,
    }

    def context(n: int) -> str:
        return ("Denver won the game. " * 50)[:n]

    n = limits["max_context_chars"]
    assert ask({"question": "Who won?", "context": context(n)})[0] == 200
    status, body = ask({"question": "Who won?", "context": context(n + 1)})
    assert (status, body["error"]["code"]) == (413, "too_large") and "context" in body["error"]["message"]

    n = limits["max_question_chars"]
    assert ask({"question": "Who won?".ljust(n), "context": CONTEXT})[0] == 200
    status, body = ask({"question": "Who won?".ljust(n + 1), "context": CONTEXT})
    assert status == 413 and "characters" in body["error"]["message"]

    n = limits["max_question_tokens"]
    assert ask({"question": " ".join(["a"] * n), "context": CONTEXT})[0] == 200
    status, body = ask({"question": " ".join(["a"] * (n + 1)), "context": CONTEXT})
    assert status == 413 and "tokens" in body["error"]["message"]

    n = limits["max_items"]
    status, body = ask({"items": [{"question": "Who won?", "context": CONTEXT}] * n})
    assert status == 200 and len(body["results"]) == n
    status, body = ask({"items": [{"question": "Who won?", "context": CONTEXT}] * (n + 1)})
    assert status == 413 and "items" in body["error"]["message"]

    n = limits["max_top_k"]
    status, body = ask({"question": "Who won?", "context": CONTEXT, "top_k": n})
    assert status == 200 and 1 < len(body["answers"]) <= n
    assert ask({"question": "Who won?", "context": CONTEXT, "top_k": n + 1})[0] == 400

    n = limits["max_answer_len"]
    assert ask({"question": "Who won?", "context": CONTEXT, "max_answer_len": n})[0] == 200
    assert ask({"question": "Who won?", "context": CONTEXT, "max_answer_len": n + 1})[0] == 400

    n = limits["max_ask_body_bytes"]
    small = json.dumps({"question": "Who won?", "context": CONTEXT}).encode()
    assert ask(raw=small + b" " * (n - len(small)))[0] == 200
    status, body = ask(raw=small + b" " * (n + 1 - len(small)))
    assert status == 413 and "body" in body["error"]["message"]

    n = limits["max_operator_body_bytes"]
    for name, payload, accepted in (("model_refresh", {"revision": "main"}, 202), ("model_rollback", {}, 404)):
        raw = json.dumps(payload).encode()
        status, body = status_and_json(respond(name, raw=raw + b" " * (n - len(raw))))
        assert status == accepted, (name, body)
        status, body = status_and_json(respond(name, raw=raw + b" " * (n + 1 - len(raw))))
        assert (status, body["error"]["code"]) == (413, "too_large"), name


def test_window_limit_at_and_one_past(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[[dict[str, str]], ModelHolder]
) -> None:
    publish(store, tiny_bert_dir)
    windows_env = {**env, "QA_MAX_WINDOWS": "2"}
    install(windows_env)
    limit = status_and_json(respond("openapi"))[1]["info"]["x-limits"]["max_windows"]
    assert limit == 2
    # the fewest words that need one window more than the limit, found with the same engine code
    engine = engine_from_dir(tiny_bert_dir, limits=Limits(max_windows=limit))

    def fits(words: int) -> bool:
        try:
            engine.answer([QAItem("who", "a " * words)])
        except errors.TooLargeError:
            return False
        return True

    low, high = 1, 4000
    assert fits(low) and not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    assert ask({"question": "who", "context": "a " * low})[0] == 200
    status, body = ask({"question": "who", "context": "a " * high})
    assert status == 413 and "windows" in body["error"]["message"]


# --- the host's 401, the playground routes -----------------------------------------------------


def test_missing_key_is_the_hosts_empty_401_and_documented_so(
    env: dict[str, str], store: ModelStore, install: Callable[[dict[str, str]], ModelHolder]
) -> None:
    install(env)
    with serve(FUNCTIONS, keys={"test-key"}) as host:
        for headers in ({}, {"x-functions-key": "wrong"}):
            request = urllib.request.Request(f"{host.origin}/api/model", headers=headers)
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=30)
            assert caught.value.code == 401 and caught.value.read() == b""
        with urllib.request.urlopen(urllib.request.Request(f"{host.origin}/api/model?code=test-key"), timeout=30) as response:
            assert response.status == 200 and json.loads(response.read())["model_id"] == "tests/tiny-bert"
        with urllib.request.urlopen(f"{host.origin}/api/openapi.json", timeout=30) as response:  # anonymous
            doc = json.loads(response.read())
    assert doc["servers"] == [{"url": host.origin}]
    assert doc["paths"]["/api/model"]["get"]["responses"]["401"] == {
        "description": "No or wrong function key. The Functions host answers with an EMPTY body (not JSON)."
    }


def test_playground_is_served_from_the_allow_list_with_a_strict_csp() -> None:
    page = respond("playground")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    html = page.get_body().decode()
    assert "http://" not in html and "https://" not in html  # nothing from another host
    for name, media_type in PLAYGROUND_FILES.items():
        asset = respond("playground_file", route_params={"file": name})
        assert asset.status_code == 200 and asset.mimetype == media_type, name
        assert asset.headers["X-Content-Type-Options"] == "nosniff"
        text = asset.get_body().decode()
        assert "://" not in text.replace("http://www.w3.org/2000/svg", ""), name
    for name in ("index.html", "../function_app.py", "..%2Ffunction_app.py", "playground.js.map", ""):
        status, body = status_and_json(respond("playground_file", route_params={"file": name}))
        assert (status, body["error"]["code"]) == (404, "not_found"), name


def test_the_validation_hook_catches_a_drifted_response() -> None:
    doc = document(Settings())
    drifted = func.HttpResponse(
        json.dumps({"state": "ready", "degraded": False, "surprise": 1}), status_code=200, mimetype="application/json"
    )
    assert any("surprise" in p for p in response_mismatches(doc, "health", "GET", drifted))
    missing = func.HttpResponse(json.dumps({"state": "empty", "degraded": False}), status_code=503, mimetype="application/json")
    assert any("Retry-After" in p for p in response_mismatches(doc, "health", "GET", missing))
    undocumented = func.HttpResponse(b"", status_code=418)
    assert response_mismatches(doc, "health", "GET", undocumented)
