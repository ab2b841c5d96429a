"""The operators' event lines: one ``event=NAME key=value`` line that KQL's ``parse`` can split."""

from __future__ import annotations

import logging

import pytest

from shared.telemetry import event_line, log_event


def test_event_line_is_parseable() -> None:
    line = event_line("refresh", outcome="failed", revision=None, bytes=0, seconds=1.23456, error_code="source_unavailable", ok=False)
    assert line == "event=refresh outcome=failed revision=- bytes=0 seconds=1.235 error_code=source_unavailable ok=false"
    fields = dict(part.split("=", 1) for part in line.split(" "))
    assert fields["event"] == "refresh" and fields["seconds"] == "1.235"


def test_values_never_break_the_line() -> None:
    line = event_line("model_load", message="two words=and\nmore", empty="")
    assert line == "event=model_load message=two_words_and_more empty=-"
    assert all(part.count("=") == 1 for part in line.split(" "))


def test_log_event_uses_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.telemetry")
    with caplog.at_level(logging.INFO, logger="tests.telemetry"):
        log_event(logger, "ask", items=2, seconds=0.5)
    assert [r.getMessage() for r in caplog.records] == ["event=ask items=2 seconds=0.500"]
