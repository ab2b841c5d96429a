"""Shared fixtures: a real Azurite per test session, a fresh container per test, tiny models."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.fixtures.tiny_models import build_bert

# No test exports telemetry: function_app starts Application Insights export on import when a
# connection string is set (a developer's shell may have one); the tests that export pass an
# in-memory exporter or a loopback endpoint themselves.
for _name in ("APPLICATIONINSIGHTS_CONNECTION_STRING", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"):
    os.environ.pop(_name, None)

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_connection_string() -> str:
    """The Azurite connection string: ``AZURITE_CONNECTION_STRING`` or the default ports on loopback."""
    found = os.environ.get("AZURITE_CONNECTION_STRING")
    if found:
        return found
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:10000/{AZURITE_ACCOUNT};"
        f"QueueEndpoint=http://127.0.0.1:10001/{AZURITE_ACCOUNT};"
    )


def _blob_endpoint(conn: str) -> tuple[str, int]:
    parts = dict(p.split("=", 1) for p in conn.split(";") if "=" in p)
    url = urlparse(parts.get("BlobEndpoint", "http://127.0.0.1:10000"))
    return url.hostname or "127.0.0.1", url.port or 10000


@pytest.fixture(scope="session")
def azurite() -> str:
    """A reachable Azurite's connection string. Skips when there is none, except under CI."""
    conn = azurite_connection_string()
    host, port = _blob_endpoint(conn)
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Azurite is not listening on {host}:{port}; .ci/run must start it")
        pytest.skip(f"Azurite is not listening on {host}:{port} (start it: npx azurite --skipApiVersionCheck)")
    return conn


@pytest.fixture
def container_name() -> str:
    return f"t{uuid.uuid4().hex[:20]}"


@pytest.fixture
def env(azurite: str, container_name: str) -> dict[str, str]:
    """The app's settings for one test: models in the test's container, a refresh queue of its own,
    a pointer polled every 0.2 s."""
    return {
        "MODEL_STORAGE": azurite,
        "AzureWebJobsStorage": azurite,
        "MODEL_CONTAINER": container_name,
        "MODEL_ID": "tests/tiny-bert",
        "MODEL_POLL_SECONDS": "0.2",
        "QA_DEADLINE_SECONDS": "20",
        "MODEL_REFRESH_QUEUE": f"refresh-{uuid.uuid4().hex[:12]}",
    }


@pytest.fixture
def store(azurite: str, container_name: str) -> Iterator[object]:
    """A :class:`ModelStore` on a fresh container, deleted afterwards."""
    from shared.settings import Settings
    from shared.store.model_store import ModelStore

    settings = Settings.from_env({"MODEL_STORAGE": azurite, "MODEL_CONTAINER": container_name, "MODEL_ID": "tests/tiny-bert"})
    model_store = ModelStore.from_settings(settings)
    model_store.block_size = 64 * 1024  # several blocks even for a tiny model
    model_store.ensure_container()
    yield model_store
    model_store.container.delete_container()


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Put a fresh :class:`~shared.serving.holder.ModelHolder` built from an environment in
    ``function_app.holder`` for one test: ``install(env, **holder_options)`` returns it; every
    holder made is closed afterwards."""
    import function_app
    from shared.serving.holder import ModelHolder
    from shared.settings import Settings

    holders: list[ModelHolder] = []

    from shared.loading.onnx_artifacts import load_artifact

    def make(env: dict[str, str], **options: Any) -> ModelHolder:
        # as function_app.holder: the ONNX artifact first when QA_BACKEND=onnx, then torch
        options.setdefault("artifact_loader", load_artifact)
        holder = ModelHolder(lambda: Settings.from_env(env), backoff_seconds=0.2, **options)
        holders.append(holder)
        monkeypatch.setattr(function_app, "holder", holder)
        return holder

    yield make
    for holder in holders:
        holder.close()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BertForQuestionAnswering with its fast tokenizer, built offline once per session."""
    return build_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(autouse=True)
def _contained_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep caches and temp files of each test under its ``tmp_path``; no Hub access."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield


ROOT = Path(__file__).resolve().parents[1]


class PrivateAzurite:
    """An Azurite of the test's own, on free ports, that the test may stop and start again;
    ``account`` (name, base64 key) gives it that account instead of the well-known one."""

    def __init__(self, location: Path, *, account: tuple[str, str] | None = None) -> None:
        self.location = location
        self.blob_port = _free_port()
        self.queue_port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.account, self.key = account or (AZURITE_ACCOUNT, AZURITE_KEY)

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};"
            f"BlobEndpoint=http://127.0.0.1:{self.blob_port}/{self.account};"
            f"QueueEndpoint=http://127.0.0.1:{self.queue_port}/{self.account};"
        )

    def start(self) -> None:
        binary = ROOT / "node_modules" / ".bin" / "azurite"
        self.process = subprocess.Popen(
            [
                str(binary),
                "--silent",
                "--skipApiVersionCheck",
                "--disableTelemetry",
                "--loose",
                "--location",
                str(self.location),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.blob_port),
                "--queueHost",
                "127.0.0.1",
                "--queuePort",
                str(self.queue_port),
                "--tableHost",
                "127.0.0.1",
                "--tablePort",
                str(_free_port()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "AZURITE_ACCOUNTS": f"{self.account}:{self.key}"} if self.account != AZURITE_ACCOUNT else None,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.blob_port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("private Azurite did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _started_azurite(location: Path, account: tuple[str, str] | None = None) -> PrivateAzurite:
    if not (ROOT / "node_modules" / ".bin" / "azurite").exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("node_modules/.bin/azurite is missing; .ci/run must npm ci")
        pytest.skip("Azurite is not installed in node_modules (run: npm ci)")
    server = PrivateAzurite(location, account=account)
    server.location.mkdir()
    server.start()
    return server


@pytest.fixture
def private_azurite(azurite: str, tmp_path: Path) -> Iterator[PrivateAzurite]:
    """A separate Azurite for tests that stop storage; needs the npm install of scripts/test."""
    server = _started_azurite(tmp_path / "azurite")
    yield server
    server.stop()


SECOND_ACCOUNT = ("oldscripts", "b2xkIHNjcmlwdHMnIGFjY291bnQga2V5IGZvciB0ZXN0cyBvbmx5IQ==")


@pytest.fixture
def second_account(azurite: str, tmp_path: Path) -> Iterator[PrivateAzurite]:
    """Another storage account, named ``oldscripts`` with a key of its own, on an Azurite of its own."""
    server = _started_azurite(tmp_path / "second-account", SECOND_ACCOUNT)
    yield server
    server.stop()


@functools.cache
def registered_functions() -> dict[str, Any]:
    """The app's functions by name. ``app.get_functions()`` may run once per process only
    (azure-functions 1.26 rejects the second call as duplicate names), so it is cached here.

    HTTP functions come back wrapped: every response they give in a test is checked against the
    OpenAPI document (see :class:`ValidatedFunction`)."""
    import function_app

    functions = {}
    for function in function_app.app.get_functions():
        trigger = json.loads(function.get_raw_bindings()[0])
        functions[function.get_function_name()] = ValidatedFunction(function, trigger) if trigger["type"] == "httpTrigger" else function
    return functions


# --- every HTTP response of every test is checked against the OpenAPI document ----------------

SCHEMA_MISMATCHES: list[str] = []  # filled by ValidatedFunction, emptied and checked around each test


@functools.lru_cache(maxsize=16)
def _validation_document(settings: Any) -> dict[str, Any]:
    from shared.serving.openapi import document

    return document(settings)


def response_mismatches(doc: dict[str, Any], route: str, method: str, response: Any) -> list[str]:
    """What in ``response`` (a ``func.HttpResponse`` of ``method /api/route``) the document does not allow."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    where = f"{method} /api/{route} -> {response.status_code}"
    operation = doc["paths"].get(f"/api/{route}", {}).get(method.lower())
    if operation is None:
        return [f"{where}: the route is not in the OpenAPI document"]
    documented = operation["responses"].get(str(response.status_code))
    if documented is None:
        return [f"{where}: status not documented (documented: {', '.join(operation['responses'])})"]
    headers = {name.lower(): value for name, value in response.headers.items()}
    body = response.get_body() or b""
    problems = []
    content = documented.get("content")
    if not content:
        return [f"{where}: documented without a body, got {len(body)} bytes"] if body else []
    media = (headers.get("content-type") or response.mimetype).split(";")[0].strip().lower()
    if media not in content:
        return [f"{where}: media type {media} not documented ({', '.join(content)})"]
    registry = Registry().with_resource("urn:openapi", Resource.from_contents(doc, default_specification=DRAFT202012))
    for name, header in documented.get("headers", {}).items():
        value = headers.get(name.lower())
        if value is None:
            if header.get("required"):
                problems.append(f"{where}: required header {name} is missing")
            continue
        for error in Draft202012Validator(header["schema"], registry=registry).iter_errors(value):
            problems.append(f"{where}: header {name}: {error.message}")
    if media == "application/json":
        try:
            data = json.loads(body)
        except ValueError:
            return [*problems, f"{where}: the body is not JSON"]
        schema = {"$ref": "urn:openapi" + content[media]["schema"]["$ref"]}
        for error in Draft202012Validator(schema, registry=registry).iter_errors(data):
            path = "/".join(str(p) for p in error.absolute_path) or "(body)"
            problems.append(f"{where}: {path}: {error.message}")
    return problems


class ValidatedFunction:
    """A registered HTTP function whose user function checks each response against the document
    built from the serving holder's settings (``function_app.holder``), as ``/api/openapi.json``
    serves it. Mismatches fail the test (see ``pytest_runtest_call``)."""

    def __init__(self, function: Any, trigger: dict[str, Any]) -> None:
        self._function = function
        self._route = trigger["route"]
        self._user = function.get_user_function()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._function, name)

    def get_user_function(self) -> Any:
        def checked(req: Any) -> Any:
            response = self._user(req)
            SCHEMA_MISMATCHES.extend(response_mismatches(_validation_document(_serving_settings()), self._route, req.method, response))
            return response

        return checked


def _serving_settings() -> Any:
    import function_app
    from shared.settings import Settings

    try:
        return function_app.holder.settings
    except Exception:  # noqa: BLE001 - bad settings give a 500 the document also describes
        return Settings()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail a test whose HTTP responses do not match the OpenAPI document."""
    SCHEMA_MISMATCHES.clear()
    result = yield
    found = list(SCHEMA_MISMATCHES)
    SCHEMA_MISMATCHES.clear()
    if found:
        raise AssertionError("responses do not match the OpenAPI document:\n" + "\n".join(dict.fromkeys(found)))
    return result
