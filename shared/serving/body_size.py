"""Body limits of the HTTP routes: the handlers enforce them and the OpenAPI document states them."""

from __future__ import annotations

from ..settings import Settings

OPERATOR_BODY_MAX_BYTES = 4096  # bytes of a refresh or rollback body


def ask_body_max_bytes(settings: Settings) -> int:
    """The most bytes an ``/api/ask`` body may have under ``settings`` (the OpenAPI document says it too)."""
    # a JSON string may spend 6 bytes on one character (\\uXXXX)
    return settings.max_items * (settings.max_context_chars + settings.max_question_chars) * 6 + 64 * 1024
