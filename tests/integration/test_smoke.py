"""scripts/smoke, the deployment's smoke check, run as a user runs it (its own process, the standard
library only: ``python -I -S``, no site-packages) against the app's HTTP functions served on a
local URL by the test host adapter (function keys checked), with a tiny model in Azurite."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.refresh.isolation import LocalDirSource, isolate
from shared.store.model_store import ModelStore
from tests.conftest import ROOT, registered_functions
from tests.fixtures.functions_host import FunctionsHost, serve

pytestmark = pytest.mark.integration

KEY = "smoke-test-key"
SMOKE = ROOT / "scripts" / "smoke"


def smoke(*args: str) -> list[str]:
    return [sys.executable, "-I", "-S", str(SMOKE), *args]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(smoke(*args), capture_output=True, text=True, check=False, cwd="/")
    print(done.stdout, done.stderr)
    return done


@pytest.fixture
def host(env: dict[str, str], install: Callable[..., Any]) -> Iterator[FunctionsHost]:
    install(env)
    with serve(registered_functions(), keys={KEY}) as served:
        yield served


def publish(store: ModelStore, model_dir: Path) -> None:
    isolate(store, LocalDirSource(model_dir, block_size=store.block_size), explicit=True, keep_versions=3)


def test_smoke_passes_against_the_app_with_an_isolated_model(host: FunctionsHost, store: ModelStore, tiny_bert_dir: Path) -> None:
    publish(store, tiny_bert_dir)
    done = run("--url", host.origin, "--key", KEY, "--wait", "120", "--interval", "0.2")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for step, name in enumerate(("health", "model", "ask", "openapi", "playground"), 1):
        assert any(line.startswith(f"[{step}/5] {name}: ok") for line in lines), f"no ok line for {name}:\n{done.stdout}"
    assert "tests/tiny-bert revision" in done.stdout and lines[-1].startswith("Smoke check passed")
    assert ("POST", "/api/ask", 200) in [(m, p.split("?")[0], s) for m, p, s in host.requests]


def test_smoke_waits_for_the_isolation_with_progress(host: FunctionsHost, store: ModelStore, tiny_bert_dir: Path) -> None:
    """Nothing isolated when the smoke check starts (as right after `azd up`): it polls /api/model,
    prints what it waits for, and passes once the model is isolated."""
    process = subprocess.Popen(
        smoke("--url", host.origin, "--key", KEY, "--wait", "120", "--interval", "0.2"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/",
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    published = threading.Event()
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if not published.is_set() and line.startswith("[2/5] model: waiting"):
            publish(store, tiny_bert_dir)  # the refresh worker's part, done here
            published.set()
    print("\n".join(lines))
    assert process.wait() == 0, "\n".join(lines)
    assert published.is_set(), "the smoke check never waited for the model:\n" + "\n".join(lines)
    waiting = next(line for line in lines if line.startswith("[2/5] model: waiting"))
    assert "nothing isolated yet" in waiting and "s left)" in waiting
    assert lines[-1].startswith("Smoke check passed")


def test_smoke_fails_clearly_when_nothing_is_isolated_in_time(host: FunctionsHost, store: ModelStore) -> None:
    done = run("--url", host.origin, "--key", KEY, "--wait", "1", "--interval", "0.2")
    assert done.returncode == 1
    assert "[1/5] health: ok" in done.stdout
    failed = done.stdout.splitlines()[-1]
    assert failed.startswith("[2/5] model: FAILED, not isolated after 1 s") and "run the smoke check again later" in failed


def test_smoke_fails_at_once_on_a_wrong_key(host: FunctionsHost, store: ModelStore, tiny_bert_dir: Path) -> None:
    publish(store, tiny_bert_dir)
    done = run("--url", host.origin, "--key", "wrong", "--wait", "120", "--interval", "0.2")
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1].startswith("[2/5] model: FAILED, HTTP 401") and "az functionapp keys list" in done.stdout


def test_smoke_fails_when_the_app_cannot_be_reached() -> None:
    done = run("--url", "http://127.0.0.1:9", "--wait", "0.5", "--interval", "0.2", "--timeout", "2")
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1].startswith("[1/5] health: FAILED, http://127.0.0.1:9 cannot be reached")


def test_smoke_usage_errors_exit_2() -> None:
    for args in ((), ("--url", "ftp://x"), ("--url", "https://app.example.net")):
        done = subprocess.run(smoke(*args), capture_output=True, text=True, check=False, cwd="/", env={"PATH": "/nonexistent"})
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr and "error:" in done.stderr
