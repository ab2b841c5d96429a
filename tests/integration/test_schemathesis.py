"""An outside API tester against the app itself: Schemathesis (pinned in requirements-dev.txt) runs
its CLI, every check and every phase, against the app's HTTP functions served on loopback by the
test host adapter (function keys checked, the host's empty-body 401), with a tiny model loaded
from Azurite, once per OpenAPI document (3.1 and 3.0.3). A fixed seed and a bounded number of
examples per operation keep it reproducible and short; zero failures is the bar.

Every response is also checked against the document by the hook in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import registered_functions
from tests.fixtures.functions_host import FunctionsHost, serve
from tests.fixtures.tiny_models import publish

pytestmark = pytest.mark.integration

KEY = "schemathesis-key"
CONFIG = Path(__file__).with_name("schemathesis.toml")  # a deviation from Schemathesis' defaults, explained
SEED = 18
# test cases per operation in the fuzzing phase (the examples and coverage phases add theirs): about
# 400 requests per document, a minute or so for both on 2 cores; raise it locally to dig deeper
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "20"))
# Limits under which every body the document allows fits the model's budgets that a schema cannot
# state (tokens, windows): at most 3 items of 300 characters are 3 windows of the tiny model, a
# question of 60 characters at most 60 tokens. The defaults allow 32 contexts of 25,000 characters,
# which may need more than QA_MAX_WINDOWS windows: a documented 413 that a generator cannot foresee.
LIMIT_ENV = {"QA_MAX_CONTEXT_CHARS": "300", "QA_MAX_QUESTION_CHARS": "60", "QA_MAX_ITEMS": "3"}


@pytest.fixture
def served(env: dict[str, str], store: Any, tiny_bert_dir: Path, install: Callable[..., Any]) -> Iterator[FunctionsHost]:
    """The app's HTTP functions on loopback, serving a tiny model already loaded (so /api/ask answers 200)."""
    publish(store, tiny_bert_dir)
    holder = install({**env, **LIMIT_ENV})
    holder.warm()
    with serve(registered_functions(), keys={KEY}) as host:
        yield host


def run_schemathesis(origin: str, version: str, report: Path) -> dict[str, Any]:
    """One CLI run against the document of ``version``; its JSON report."""
    # the document as the app serves it, from a file: Schemathesis leaves out the operation that served
    # a schema it loads by URL, and GET /api/openapi.json must be tested too
    query = "" if version == "3.1" else "?version=3.0"
    with urllib.request.urlopen(f"{origin}/api/openapi.json{query}", timeout=60) as response:
        document = report.with_name(f"openapi-{version}.json")
        document.write_bytes(response.read())
    command = [
        sys.executable,
        "-c",
        "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
        "--config-file",
        str(CONFIG),
        "run",
        str(document),
        "--url",
        origin,
        "--checks",
        "all",
        # a method that no function registers never reaches the app: the Functions host answers it
        # with an empty 404, not 405 (azure-functions-host#10098), and so does the adapter
        "--exclude-checks",
        "unsupported_method",
        "--mode",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "1",
        "--no-shrink",
        "--header",
        f"x-functions-key: {KEY}",
        "--request-timeout",
        "60",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--output-truncate",
        "false",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=report.parent, check=False)
    if not report.exists():
        raise AssertionError(f"schemathesis wrote no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    result["output"] = done.stdout + done.stderr
    return result


@pytest.mark.parametrize("version", ["3.1", "3.0"])
def test_schemathesis_finds_no_failure(served: FunctionsHost, version: str, tmp_path: Path) -> None:
    result = run_schemathesis(served.origin, version, tmp_path / "schemathesis.json")
    generated = result["test_cases"]["generated"]
    print(f"schemathesis {version}: {generated} test cases, {len(served.requests)} requests, failures {result['failures']}")
    assert result["failures"] == [] and result["errors"] == [], result["output"][-20000:]
    assert result["exit_code"] == 0 and result["complete"], result["output"][-20000:]
    assert result["operations"]["tested"] == result["operations"]["total"]
    # every route of the document was really called, each with many requests
    paths = [path.split("?")[0] for method, path, _ in served.requests]
    for route in ("ask", "health", "model", "model/refresh", "model/rollback", "openapi.json", "playground"):  # and below
        assert paths.count(f"/api/{route}") >= 10, route
    assert sum(path.startswith("/api/playground/") for path in paths) >= 3
    assert generated >= 200
