"""Operators' signals: event records (:mod:`.events`) and their way to Application Insights
from every thread (:mod:`.export`, loaded only when a connection string is set)."""

from __future__ import annotations

from .events import EVENT_FIELDS, event_fields, event_line, log_event

__all__ = ["EVENT_FIELDS", "event_fields", "event_line", "log_event"]
