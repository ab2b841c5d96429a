"""The app's log records to Application Insights from whatever thread logs them.

The Functions host keeps a worker's log record only while the invocation that logged it runs: the
Python worker tags a record with the invocation id of the current thread (or asyncio task), and
the host drops a record whose invocation is not executing. Every record of the model-load thread,
the pointer poller and the damage check (``event=model_load`` lines, a load's exception) would
never arrive. So, when ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set, the ``shared`` logger's
records (INFO and up) go to Application Insights through OpenTelemetry's Azure Monitor log
exporter in this process, batched in its own thread, from every thread, signed in with the
managed identity when ``APPLICATIONINSIGHTS_AUTHENTICATION_STRING`` says so; and they no longer
go through the host (``propagate`` off), so each is sent once. An event's fields arrive as custom
dimensions (:mod:`.events`), an exception as an ``exceptions`` row. Without a connection string
(local runs, tests) nothing is imported, nothing changes, nothing leaves the machine.

Starting takes a few tenths of a second (importing OpenTelemetry's SDK and the exporter, making
the exporter): off the cold start's path, it runs in a thread of its own while the app goes on,
and the records logged meanwhile are held, then sent (bench/telemetry.py measures both ways).
OpenTelemetry is imported here only, when export starts; the rest of the app never imports it.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from ..errors import QAError
from .events import EVENT_FIELDS

if TYPE_CHECKING:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import LogRecordExporter

APP_LOGGER = "shared"  # every module of the app logs under it (logging.getLogger(__name__))
EXPORTER_LOGGER = "azure.monitor.opentelemetry.exporter"  # the exporter's own complaints (a refused token, say)


class ExportTarget(Protocol):
    """Where to export (:class:`shared.settings.AppInsights` is one)."""

    @property
    def connection_string(self) -> str: ...
    @property
    def identity(self) -> bool: ...
    @property
    def client_id(self) -> str | None: ...
    @property
    def role_name(self) -> str | None: ...


class EventExport:
    """The export of one logger's records: from creation on they no longer go through the host;
    they are held until :meth:`attach` gives the exporting handler (or :meth:`give_up` gives them
    back). :meth:`flush` sends what is queued, :meth:`close` stops and gives the records back."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self.logger = logger
        self.provider: LoggerProvider | None = None
        self.problem: str | None = None
        self._level_before = logger.level
        self._ready = threading.Event()
        self._handler = _Holding(level)
        logger.setLevel(level)  # the export decides what leaves, whatever the root logger's level
        logger.addHandler(self._handler)
        logger.propagate = False  # sent once: not also through the host (which drops a background thread's)

    def attach(self, provider: LoggerProvider, handler: logging.Handler) -> None:
        """The pipeline is ready: send the held records, then every record, through ``handler``."""
        self.provider = provider
        self._handler.release_to(handler)
        self._ready.set()

    def give_up(self, problem: str, *, report: bool = True) -> None:
        """The pipeline could not start: the records go through the host again; the ones held meanwhile are lost."""
        self.problem = problem
        lost = self._restore()
        if report:
            sys.stderr.write(f"Application Insights export is off, the app's events go through the host ({lost} held lost): {problem}\n")
        self._ready.set()

    def wait(self, timeout_seconds: float | None = None) -> bool:
        """Wait until the export runs (or gave up); ``False`` on a timeout."""
        return self._ready.wait(timeout_seconds)

    def flush(self, timeout_seconds: float = 10.0) -> bool:
        """Export every record logged so far now; ``False`` when not done within the timeout."""
        if not self.wait(timeout_seconds) or self.provider is None:
            return False
        return bool(self.provider.force_flush(int(timeout_seconds * 1000)))

    def close(self, timeout_seconds: float = 30.0) -> None:
        """Flush and stop; the logger's records go through the host again."""
        self.wait(timeout_seconds)
        if self.problem is None:
            self._restore()
        if self.provider is not None:
            self.provider.shutdown()

    def _restore(self) -> int:
        self.logger.removeHandler(self._handler)
        self.logger.setLevel(self._level_before)
        self.logger.propagate = True
        return self._handler.drop()


class _Holding(logging.Handler):
    """Holds the records logged while the export starts (at most ``limit``), then passes them, and
    every later record, to the exporting handler. Standard library only: it is there before
    OpenTelemetry is imported."""

    def __init__(self, level: int, limit: int = 10_000) -> None:
        super().__init__(level)
        self._target: logging.Handler | None = None
        self._held: list[logging.LogRecord] = []
        self._limit = limit
        self._overflow = 0

    def emit(self, record: logging.LogRecord) -> None:  # called holding self.lock
        if self._target is not None:
            self._target.handle(record)
        elif len(self._held) < self._limit:
            self._held.append(record)
        else:
            self._overflow += 1

    def release_to(self, target: logging.Handler) -> None:
        self.acquire()  # the lock emit runs under: no record is lost or sent twice on the way
        try:
            for record in self._held:
                target.handle(record)
            self._held.clear()
            self._target = target
        finally:
            self.release()

    def drop(self) -> int:
        self.acquire()
        try:
            dropped = len(self._held) + self._overflow
            self._held.clear()
            self._overflow = 0
            return dropped
        finally:
            self.release()


class _ExportHandler(logging.Handler):
    """One OpenTelemetry log record per logging record: the message as the body, an event's fields
    (and nothing else the record carries) as attributes, the exception (if any) as exception.*."""

    def __init__(self, provider: LoggerProvider, level: int) -> None:
        super().__init__(level)
        from opentelemetry._logs import SeverityNumber

        self._provider = provider
        self._severity = [
            (logging.CRITICAL, SeverityNumber.FATAL),
            (logging.ERROR, SeverityNumber.ERROR),
            (logging.WARNING, SeverityNumber.WARN),
            (logging.INFO, SeverityNumber.INFO),
            (logging.NOTSET, SeverityNumber.DEBUG),
        ]
        self._loggers: dict[str, Any] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = self._loggers.get(record.name)
            if logger is None:
                logger = self._loggers[record.name] = self._provider.get_logger(record.name)
            fields = getattr(record, EVENT_FIELDS, None)
            logger.emit(
                timestamp=int(record.created * 1e9),
                severity_number=next(number for level, number in self._severity if record.levelno >= level),
                severity_text=record.levelname,
                body=record.getMessage(),
                attributes=dict(fields) if isinstance(fields, dict) else None,
                exception=record.exc_info[1] if record.exc_info else None,
            )
        except Exception:  # noqa: BLE001 - a broken record must not break the caller (logging's own rule)
            self.handleError(record)


def azure_monitor_exporter(target: ExportTarget) -> LogRecordExporter:
    """Azure Monitor's log exporter for ``target``, with a managed identity credential when the
    target says ``Authorization=AAD`` (Application Insights with local authentication off)."""
    from azure.monitor.opentelemetry.exporter import AzureMonitorLogExporter

    credential = None
    if target.identity:
        from azure.identity import ManagedIdentityCredential

        credential = ManagedIdentityCredential(client_id=target.client_id) if target.client_id else ManagedIdentityCredential()
    exporter: LogRecordExporter = AzureMonitorLogExporter(connection_string=target.connection_string, credential=credential)
    return exporter


def pipeline(target: ExportTarget, *, exporter: LogRecordExporter | None, level: int) -> tuple[LoggerProvider, logging.Handler]:
    """OpenTelemetry's log pipeline to ``exporter`` (default: Azure Monitor's, for ``target``): a
    provider whose batch processor exports from its own thread, and the logging handler feeding it."""
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": target.role_name} if target.role_name else {})
    provider = LoggerProvider(resource=resource)
    if exporter is None:
        exporter = azure_monitor_exporter(target)
        _report_to_console(EXPORTER_LOGGER)
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
    return provider, _ExportHandler(provider, level)


def start_export(
    target: ExportTarget,
    *,
    exporter: LogRecordExporter | None = None,
    logger_name: str = APP_LOGGER,
    level: int = logging.INFO,
    background: bool = False,
) -> EventExport:
    """Send ``logger_name``'s records to ``exporter`` (default: Azure Monitor's, for ``target``)
    instead of the host; the exporter's own warnings go to stderr, which the host records.

    Args:
        target: the connection string and identity (:func:`shared.settings.app_insights_from_env`).
        exporter: where the records go; tests pass an in-memory exporter.
        logger_name: the logger whose records are exported (its children's included).
        level: the lowest level exported (the host's default is Information too).
        background: start in a thread of its own, holding the records meanwhile; a failure then
            gives the records back to the host and is written to stderr instead of raised.
    """
    export = EventExport(logging.getLogger(logger_name), level)

    def start() -> None:
        try:
            provider, handler = pipeline(target, exporter=exporter, level=level)
        except Exception as err:
            export.give_up(f"{type(err).__name__}: {err}", report=background)
            if not background:
                raise
        else:
            export.attach(provider, handler)

    if background:
        threading.Thread(target=start, name="telemetry-start", daemon=True).start()
    else:
        start()
    return export


class _ConsoleHandler(logging.StreamHandler[TextIO]):
    """Warnings and errors to stderr, one line each."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))


def _report_to_console(logger_name: str) -> None:
    """Warnings of ``logger_name`` also to stderr: the exporter logs from its own thread, so the
    host would drop them, but it records what the worker writes to stderr (``Host.Function.Console``)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(handler, _ConsoleHandler) for handler in logger.handlers):
        logger.addHandler(_ConsoleHandler())


def export_app_logs(read_target: Callable[[], ExportTarget | None]) -> EventExport | None:
    """Start the export in the background when ``read_target`` names a target; ``None`` (nothing
    exported) when it does not or names a bad one. Never raises: it runs when the app is imported,
    and a telemetry problem must not stop the app; a problem is written to stderr (the host records it)."""
    try:
        target = read_target()
    except QAError as err:
        sys.stderr.write(f"Application Insights export is off, the app's events go through the host only: {err.message}\n")
        return None
    return None if target is None else start_export(target, background=True)
