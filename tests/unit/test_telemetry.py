"""The operators' events: one ``event=NAME key=value`` line that KQL's ``parse-kv`` splits, the same
fields as custom dimensions, and the export that sends them from every thread, once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

from shared.settings import AppInsights
from shared.telemetry import EVENT_FIELDS, event_fields, event_line, log_event
from shared.telemetry.export import APP_LOGGER, EventExport, pipeline, start_export

ROOT = Path(__file__).resolve().parents[2]
TARGET = AppInsights("InstrumentationKey=00000000-0000-0000-0000-000000000001", identity=True, client_id="abc", role_name="func-x")


def test_event_line_is_parseable() -> None:
    line = event_line("refresh", outcome="failed", revision=None, bytes=0, seconds=1.23456, error_code="source_unavailable", ok=False)
    assert line == "event=refresh outcome=failed revision=- bytes=0 seconds=1.235 error_code=source_unavailable ok=false"
    fields = dict(part.split("=", 1) for part in line.split(" "))
    assert fields["event"] == "refresh" and fields["seconds"] == "1.235"


def test_values_never_break_the_line() -> None:
    line = event_line("model_load", message="two words=and\nmore", empty="")
    assert line == "event=model_load message=two_words_and_more empty=-"
    assert all(part.count("=") == 1 for part in line.split(" "))


def test_log_event_uses_the_logger_and_carries_the_lines_fields(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.telemetry")
    with caplog.at_level(logging.INFO, logger="tests.telemetry"):
        log_event(logger, "ask", items=2, seconds=0.5, error_code=None)
    [record] = caplog.records
    assert record.getMessage() == "event=ask items=2 seconds=0.500 error_code=-"
    # the custom dimensions are the line's own pairs: a query may read either
    assert getattr(record, EVENT_FIELDS) == dict(pair.split("=", 1) for pair in record.getMessage().split(" "))
    assert getattr(record, EVENT_FIELDS) == event_fields("ask", items=2, seconds=0.5, error_code=None)


# --- the export ----------------------------------------------------------------------------------


class HostPath(logging.Handler):
    """Stands for the worker's handler on the root logger: whatever reaches it goes to the host."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def host_path() -> Iterator[HostPath]:
    handler, root = HostPath(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # the worker's root level
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def exported() -> Iterator[tuple[EventExport, InMemoryLogRecordExporter]]:
    memory = InMemoryLogRecordExporter()
    export = start_export(TARGET, exporter=memory)
    yield export, memory
    export.close()


def test_records_of_any_thread_are_exported_once_with_the_events_fields(
    exported: tuple[EventExport, InMemoryLogRecordExporter], host_path: HostPath
) -> None:
    export, memory = exported
    log = logging.getLogger("shared.serving.fallback")
    thread = threading.Thread(target=log_event, args=(log, "model_load"), kwargs={"revision": "abc", "seconds": 1.5, "outcome": "ok"})
    thread.start()
    thread.join()
    log_event(log, "model_load", level=logging.WARNING, revision="abc", outcome="failed", error_code="integrity_error")
    logging.getLogger("shared.serving.holder").debug("not exported: below INFO")
    assert export.flush()
    records = [r.log_record for r in memory.get_finished_logs()]
    assert [r.body for r in records] == [
        "event=model_load revision=abc seconds=1.500 outcome=ok",
        "event=model_load revision=abc outcome=failed error_code=integrity_error",
    ]
    assert [dict(r.attributes or {}) for r in records] == [
        {"event": "model_load", "revision": "abc", "seconds": "1.500", "outcome": "ok"},
        {"event": "model_load", "revision": "abc", "outcome": "failed", "error_code": "integrity_error"},
    ]
    assert [r.severity_text for r in records] == ["INFO", "WARNING"]
    assert {r.instrumentation_scope.name for r in memory.get_finished_logs()} == {"shared.serving.fallback"}
    assert {r.resource.attributes["service.name"] for r in memory.get_finished_logs()} == {"func-x"}  # cloud_RoleName
    assert host_path.records == [], "exported records must not also go through the host (sent twice)"


def test_an_exception_is_exported_with_its_type_and_stack(exported: tuple[EventExport, InMemoryLogRecordExporter]) -> None:
    export, memory = exported
    try:
        raise RuntimeError("the load broke")
    except RuntimeError:
        logging.getLogger("shared.serving.holder").exception("Unexpected failure while loading the model")
    assert export.flush()
    [record] = [r.log_record for r in memory.get_finished_logs()]
    attributes = dict(record.attributes or {})
    assert record.body == "Unexpected failure while loading the model"
    assert attributes["exception.type"] == "RuntimeError" and attributes["exception.message"] == "the load broke"
    assert "raise RuntimeError" in str(attributes["exception.stacktrace"])


def test_closing_the_export_gives_the_records_back_to_the_host(host_path: HostPath) -> None:
    memory = InMemoryLogRecordExporter()
    export = start_export(TARGET, exporter=memory)
    assert logging.getLogger(APP_LOGGER).propagate is False
    export.close()
    assert logging.getLogger(APP_LOGGER).propagate is True
    logging.getLogger("shared.serving.api").info("after close")
    assert [r.getMessage() for r in host_path.records] == ["after close"]
    assert memory.get_finished_logs() == ()


def test_records_logged_while_the_export_starts_are_held_then_sent_in_order(host_path: HostPath) -> None:
    """The export starts in a thread of its own (off the cold start's path): what the app logs
    meanwhile, from any thread, waits for it, then leaves once, in order."""
    memory = InMemoryLogRecordExporter()
    export = EventExport(logging.getLogger(APP_LOGGER), logging.INFO)  # started: records are held
    try:
        log = logging.getLogger("shared.serving.holder")
        threads = [threading.Thread(target=log_event, args=(log, "model_load"), kwargs={"n": n}) for n in range(3)]
        for thread in threads:
            thread.start()
            thread.join()
        assert export.flush(timeout_seconds=0.1) is False  # not running yet
        export.attach(*pipeline(TARGET, exporter=memory, level=logging.INFO))
        log_event(log, "model_load", n=3)
        assert export.flush()
    finally:
        export.close()
    assert [r.log_record.body for r in memory.get_finished_logs()] == [f"event=model_load n={n}" for n in range(4)]
    assert host_path.records == []


def test_an_export_that_cannot_start_gives_the_records_back_to_the_host(
    host_path: HostPath, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared.telemetry import export as module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(module, "pipeline", broken)
    export = start_export(TARGET, background=True)
    assert export.wait(10)
    assert export.problem == "RuntimeError: no exporter here"
    assert "Application Insights export is off" in capsys.readouterr().err
    logging.getLogger("shared.serving.api").info("through the host again")
    assert [r.getMessage() for r in host_path.records] == ["through the host again"]
    with pytest.raises(RuntimeError, match="no exporter here"):  # started in the foreground (tests), it raises
        start_export(TARGET)
    assert logging.getLogger(APP_LOGGER).propagate is True


def _import_app(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys, function_app\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry')\n"
        "print(function_app.events_export is not None, len(loaded))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APPLICATIONINSIGHTS_")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, check=False)


def test_without_a_connection_string_the_app_exports_nothing_and_imports_no_opentelemetry() -> None:
    done = _import_app({})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "0"]


def test_a_bad_telemetry_setting_never_stops_the_app() -> None:
    """Export starts on import: a bad value is one line on stderr (the host records the worker's
    stderr), and the app imports and serves with its events on the host's path."""
    bad = {"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=abc", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "Key"}
    done = _import_app(bad)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "False"
    assert "Application Insights export is off" in done.stderr and "APPLICATIONINSIGHTS_AUTHENTICATION_STRING" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_exporter_signs_in_with_the_managed_identity_the_settings_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Application Insights with local auth off accepts only Entra tokens: the exporter gets a
    managed identity credential (the user-assigned one by its client id), never a bare key."""
    import azure.identity
    import azure.monitor.opentelemetry.exporter as exporters

    from shared.telemetry import export

    made: list[dict[str, object]] = []

    class Credential:
        def __init__(self, **kwargs: object) -> None:
            self.kwargs = kwargs

    monkeypatch.setattr(azure.identity, "ManagedIdentityCredential", Credential)
    monkeypatch.setattr(exporters, "AzureMonitorLogExporter", lambda **kwargs: made.append(kwargs) or object())
    export.azure_monitor_exporter(TARGET)
    export.azure_monitor_exporter(AppInsights(TARGET.connection_string, identity=True))
    export.azure_monitor_exporter(AppInsights(TARGET.connection_string))
    credentials = [m["credential"] for m in made]
    assert [getattr(c, "kwargs", None) for c in credentials] == [{"client_id": "abc"}, {}, None]
    assert {m["connection_string"] for m in made} == {TARGET.connection_string}
