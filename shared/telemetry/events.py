"""Operators' signals: one log record per event, ``event=NAME key=value ...``, with the same fields
attached to the record.

The message is the line people read (console, log stream) and the workbook's KQL ``parse-kv``
splits; it reaches Application Insights by either path (the host's, or this process's exporter,
:mod:`shared.telemetry.export`). The exporter also sends the fields themselves as custom
dimensions (``customDimensions.event``, ``customDimensions.seconds``, ...). Values never contain
spaces or ``=`` (they are replaced), ``-`` stands for none, numbers keep a fixed precision; the
dimensions carry exactly the line's values.
"""

from __future__ import annotations

import logging
import re

EVENT_FIELDS = "event_fields"  # the LogRecord attribute holding an event's fields (see export)

_UNSAFE = re.compile(r"[\s=]+")


def _value(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}"
    return _UNSAFE.sub("_", str(value))


def event_fields(name: str, **fields: object) -> dict[str, str]:
    """The event as name -> value: ``event`` first, then each field in the order given."""
    return {"event": _value(name), **{key: _value(value) for key, value in fields.items()}}


def event_line(name: str, **fields: object) -> str:
    """The message of one event: ``event=NAME`` then each field in the order given."""
    return " ".join(f"{key}={value}" for key, value in event_fields(name, **fields).items())


def log_event(logger: logging.Logger, name: str, *, level: int = logging.INFO, **fields: object) -> None:
    """Log one event (see the module docstring); never pass secrets or user text."""
    if logger.isEnabledFor(level):
        values = event_fields(name, **fields)
        line = " ".join(f"{key}={value}" for key, value in values.items())
        logger.log(level, "%s", line, extra={EVENT_FIELDS: values}, stacklevel=2)  # the caller's file and line
