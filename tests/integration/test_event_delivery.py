"""The operators' events reach Application Insights whatever thread logs them.

The host drops a worker's log record that no executing invocation tagged (tests/fixtures/host_logs.py
applies its rule), and the model's load runs in a thread of its own: on the host's path alone every
``event=model_load`` line, and a failed load's exception, were lost. With the export on
(``shared.telemetry.export``), each record leaves the process exactly once, from any thread, and
Azure Monitor's exporter sends it as the workbook's queries read it (a trace whose message is the
event line, the fields as custom dimensions; an exception as an exception)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

from shared.errors import IntegrityError
from shared.loading.versions import LoadedModel, load_version
from shared.serving.holder import ModelHolder
from shared.settings import AppInsights, Settings
from shared.store.model_store import ModelStore
from shared.telemetry import log_event
from shared.telemetry.export import start_export
from tests.fixtures.function_calls import call
from tests.fixtures.host_logs import HostLogs
from tests.fixtures.ingestion import QUIET, Ingestion
from tests.fixtures.tiny_models import publish

pytestmark = pytest.mark.integration
CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."
TARGET = AppInsights("InstrumentationKey=00000000-0000-0000-0000-000000000001", role_name="func-test")


@pytest.fixture
def host_logs() -> Iterator[HostLogs]:
    handler, root = HostLogs(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # as the worker sets it
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


def serve_until_ready(holder: ModelHolder, host_logs: HostLogs, timeout: float = 120.0) -> None:
    """What the first requests do: /api/health?warm=1, each in an invocation, until a model serves."""
    deadline = time.monotonic() + timeout
    while holder.state != "ready":
        assert time.monotonic() < deadline, holder.describe()
        with host_logs.invocation():
            call("health", params={"warm": "1"})
        time.sleep(0.3)


def ask(host_logs: HostLogs) -> None:
    with host_logs.invocation():
        status, _, _ = call("ask", body={"question": "Who won?", "context": CONTEXT})
    assert status == 200


def test_on_the_hosts_path_alone_the_load_events_are_dropped(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[..., ModelHolder], host_logs: HostLogs
) -> None:
    """Why the export exists: the same requests without it lose every model_load line."""
    publish(store, tiny_bert_dir)
    holder = install({**env, "QA_BACKEND": "torch"})
    serve_until_ready(holder, host_logs)
    ask(host_logs)
    assert HostLogs.events(host_logs.kept, "ask"), "an invocation's own event is kept"
    assert HostLogs.events(host_logs.kept, "model_load") == []
    assert [line.split(" outcome=")[1] for line in HostLogs.events(host_logs.dropped, "model_load")] == ["ok error_code=-"]


def test_with_the_export_every_load_event_and_exception_arrives_once(
    env: dict[str, str], store: ModelStore, tiny_bert_dir: Path, install: Callable[..., ModelHolder], host_logs: HostLogs
) -> None:
    revision = publish(store, tiny_bert_dir)
    failures: list[Exception] = [RuntimeError("the load broke"), IntegrityError("model.safetensors does not match its manifest hash")]

    def loader(model_store: ModelStore, rev: str, settings: Settings) -> LoadedModel:
        if failures:
            raise failures.pop(0)  # an unexpected failure, then a version refused by verification
        return load_version(model_store, rev, settings)

    memory = InMemoryLogRecordExporter()
    host_logs.kept.clear()
    host_logs.dropped.clear()
    export = start_export(TARGET, exporter=memory)
    try:
        holder = install({**env, "QA_BACKEND": "torch"}, loader=loader)
        serve_until_ready(holder, host_logs)
        ask(host_logs)
        assert export.flush()
    finally:
        export.close()
    exported = [r.log_record for r in memory.get_finished_logs()]
    bodies = [str(r.body) for r in exported]

    loads = [b for b in bodies if b.startswith("event=model_load ")]
    assert [b.split(" outcome=")[1] for b in loads] == ["failed error_code=integrity_error", "ok error_code=-"], loads
    assert all(f"revision={revision} " in b for b in loads)
    [exception] = [r for r in exported if (r.attributes or {}).get("exception.type") == "RuntimeError"]
    assert exception.body == "Unexpected failure while loading the model"
    assert "the load broke" in str((exception.attributes or {})["exception.stacktrace"])
    assert len([b for b in bodies if b.startswith("event=ask ")]) == 1
    for record in exported:
        if str(record.body).startswith("event="):
            pairs = dict(pair.split("=", 1) for pair in str(record.body).split(" "))
            assert dict(record.attributes or {}) == pairs, "the custom dimensions are the line's fields"
    # once: nothing of the app's also went through the host
    assert [r for r in host_logs.kept + host_logs.dropped if r.name.startswith("shared")] == []


# --- what Azure Monitor's exporter puts on the wire ---------------------------------------------


@pytest.fixture
def ingestion(monkeypatch: pytest.MonkeyPatch) -> Iterator[Ingestion]:
    for name, value in QUIET.items():  # loopback only: none of the exporter's own calls home
        monkeypatch.setenv(name, value)
    server = Ingestion().start()
    yield server
    server.stop()


def test_azure_monitors_exporter_sends_events_as_traces_with_their_fields_and_exceptions_as_exceptions(ingestion: Ingestion) -> None:
    export = start_export(AppInsights(ingestion.connection_string, role_name="func-test"))
    try:
        log = logging.getLogger("shared.serving.fallback")
        thread = threading.Thread(
            target=log_event,
            args=(log, "model_load"),
            kwargs={"revision": "abc", "backend": "onnx", "seconds": 2.25, "outcome": "failed", "error_code": "integrity_error"},
            name="model-load",
        )
        thread.start()
        thread.join()
        try:
            raise RuntimeError("the load broke")
        except RuntimeError:
            logging.getLogger("shared.serving.holder").exception("Unexpected failure while loading the model")
        assert export.flush()
    finally:
        export.close()
    assert ingestion.paths and all(path.endswith("/track") for path in ingestion.paths)
    by_type = {item["data"]["baseType"]: item for item in ingestion.items}
    assert set(by_type) == {"MessageData", "ExceptionData"}, [i["data"]["baseType"] for i in ingestion.items]

    trace = by_type["MessageData"]
    line = "event=model_load revision=abc backend=onnx seconds=2.250 outcome=failed error_code=integrity_error"
    assert trace["data"]["baseData"]["message"] == line
    dimensions = trace["data"]["baseData"]["properties"]
    assert {k: v for k, v in dimensions.items() if k != "logger_name"} == dict(pair.split("=", 1) for pair in line.split(" "))
    assert dimensions["logger_name"] == "shared.serving.fallback"
    assert trace["data"]["baseData"]["severityLevel"] == 1  # Information
    assert trace["tags"]["ai.cloud.role"] == "func-test"

    exception = by_type["ExceptionData"]["data"]["baseData"]
    assert exception["exceptions"][0]["typeName"] == "RuntimeError"
    assert "the load broke" in exception["exceptions"][0]["stack"]
    assert exception["severityLevel"] == 3  # Error
