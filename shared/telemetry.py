"""Operators' signals: one log line per event in ``key=value`` form that a KQL ``parse`` reads.

The Functions Python worker drops logging ``extra`` from Application Insights' custom dimensions,
so the fields travel in the message itself: ``event=NAME key=value key=value ...``. Values never
contain spaces or ``=`` (they are replaced), ``-`` stands for none, numbers keep a fixed precision.
"""

from __future__ import annotations

import logging
import re

_UNSAFE = re.compile(r"[\s=]+")


def _value(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}"
    return _UNSAFE.sub("_", str(value))


def event_line(name: str, **fields: object) -> str:
    """The message of one event: ``event=NAME`` then each field in the order given."""
    return " ".join([f"event={_value(name)}", *(f"{key}={_value(value)}" for key, value in fields.items())])


def log_event(logger: logging.Logger, name: str, *, level: int = logging.INFO, **fields: object) -> None:
    """Log one event line (see the module docstring); never pass secrets or user text."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", event_line(name, **fields))
