"""Refresh a bert-large-sized model from a Hub into Azurite: the project's streaming way against the seed's.

    .venv/bin/python bench/refresh.py [--artifacts-only]   # needs Azurite on 127.0.0.1:10000

A local fake Hub (``tests/fixtures/fake_hub.py``, the one the tests use) serves the 1.34 GB
random-weights model over HTTP on loopback, redirecting LFS files like the real Hub. Variants run
in fresh processes: the seed's way (``snapshot_download`` to a local folder, then ``upload_blob``
per file), the project's copy alone (``isolate`` from ``HubSource``, no canary) and its full
refresh (with the canary, which loads the staged model once), then the no-op refresh, and the
full refresh with both ONNX artifacts (export, calibration, quantization, each artifact's canary):
its whole-process peak RSS and the peak bytes of its temporary files.
Azurite and the fake Hub share the same 2 cores.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fixtures import bert_large
from bench.harness import azurite_connection, measure, rss_mb, run_variant, table

REPO = "bench/bert-large"
CANARY = json.dumps({"question": "Which team won?", "context": "The Denver Broncos won Super Bowl 50 in 2016."})


def _settings(container: str, endpoint: str, **extra: str) -> Any:
    from shared.settings import Settings

    env = {
        "MODEL_STORAGE": azurite_connection(),
        "MODEL_CONTAINER": container,
        "MODEL_ID": REPO,
        "HF_ENDPOINT": endpoint,
        "MODEL_CANARY": CANARY,
        **extra,
    }
    return Settings.from_env(env)


def seed(container: str, endpoint: str) -> dict[str, Any]:
    from huggingface_hub import snapshot_download

    from shared.store.model_store import ModelStore

    store = ModelStore.from_settings(_settings(container, endpoint))
    folder = Path(tempfile.mkdtemp(prefix="seed-snapshot-"))
    began = time.monotonic()
    try:
        snapshot_download(REPO, local_dir=folder, endpoint=endpoint, token=False)
        moved = 0
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            with path.open("rb") as data:
                store.container.upload_blob(f"seed/{path.name}", data, overwrite=True)
            moved += path.stat().st_size
    finally:
        shutil.rmtree(folder)
    return {"seconds": time.monotonic() - began, "mb": moved / 1e6}


def project(container: str, endpoint: str, canary: bool, artifacts: str = "none", memory_mb: int | None = None) -> dict[str, Any]:
    import dataclasses

    from shared.refresh.worker import run_refresh
    from shared.store.refresh_queue import RefreshRequest

    bounded = {"QA_MEMORY_MB": str(memory_mb)} if memory_mb else {}
    settings = _settings(container, endpoint, MODEL_ARTIFACTS=artifacts, **bounded)
    if not canary:
        settings = dataclasses.replace(settings, canary=None)
    temp = _TempWatch()
    steps = _StepWatch()
    began = time.monotonic()
    with temp, steps:
        result = run_refresh(settings, RefreshRequest(revision="main", explicit=True, reason="bench"))
    return {
        "seconds": time.monotonic() - began,
        "mb": result.bytes_moved / 1e6,
        "outcome": result.outcome,
        "artifacts": result.artifacts,
        "temp_peak_mb": temp.peak / 1e6,
        "peak_step": steps.peak_step(),
    }


class _StepWatch:
    """Which step of the refresh set its peak RSS: RSS sampled every 0.1 s next to the refresh's
    own log lines (each line opens a step)."""

    def __init__(self) -> None:
        import logging
        import threading

        self.samples: list[tuple[float, float]] = []
        self.lines: list[tuple[float, str]] = [(time.monotonic(), "start")]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        watch = self

        class Lines(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                watch.lines.append((time.monotonic(), record.getMessage()[:100]))

        self._handler = Lines(logging.INFO)

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append((time.monotonic(), rss_mb()))
            if len(self.samples) % 50 == 0:  # every 5 s to stderr: what a killed process was doing
                print(f"rss {self.samples[-1][1]:.0f} MiB during: {self.lines[-1][1]}", file=sys.stderr, flush=True)

    def __enter__(self) -> None:
        import logging

        root = logging.getLogger()
        root.setLevel(logging.INFO)
        root.addHandler(self._handler)
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        import logging

        self._stop.set()
        self._thread.join()
        logging.getLogger().removeHandler(self._handler)

    def peak_step(self) -> str:
        if not self.samples:
            return "-"
        at, rss = max(self.samples, key=lambda sample: sample[1])
        step = [text for when, text in self.lines if when <= at][-1]
        return f"{rss:.0f} MiB sampled during: {step}"


class _TempWatch:
    """Peak bytes under the temp folder while a block runs (sampled every 0.2 s), as Flex's 0.8 GB
    of temp disk would see it; the refresh's own temp files are all created there."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._root = Path(tempfile.mkdtemp(prefix="bench-refresh-tmp-"))

    def _size(self) -> int:
        total = 0
        for path in self._root.rglob("*"):
            try:
                total += path.stat().st_size if path.is_file() else 0
            except OSError:
                pass
        return total

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._size())

    def __enter__(self) -> None:
        import os

        tempfile.tempdir = str(self._root)
        os.environ["TMPDIR"] = str(self._root)
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._size())
        shutil.rmtree(self._root, ignore_errors=True)


VARIANTS = {"seed": seed, "project": project}


def main() -> None:
    from bench.harness import cpu_line
    from shared.store.model_store import ModelStore
    from tests.fixtures.fake_hub import FakeHubServer

    artifacts_only = "--artifacts-only" in sys.argv

    folder = bert_large()
    with FakeHubServer() as hub:
        hub.hub.publish(REPO, folder)
        rows: dict[str, dict[str, Any]] = {}
        containers = [f"bench{uuid.uuid4().hex[:12]}" for _ in range(4)]
        try:
            for name in containers:
                ModelStore.from_settings(_settings(name, hub.endpoint)).ensure_container()
            if not artifacts_only:
                rows["seed's way (snapshot_download + upload)"] = measure(__file__, "seed", container=containers[0], endpoint=hub.endpoint)
                rows["project, copy only (no canary)"] = measure(
                    __file__, "project", container=containers[1], endpoint=hub.endpoint, canary=False
                )
                rows["project, full refresh (canary)"] = measure(
                    __file__, "project", container=containers[2], endpoint=hub.endpoint, canary=True
                )
                rows["project, no-op refresh"] = measure(__file__, "project", container=containers[2], endpoint=hub.endpoint, canary=True)
            rows["project, refresh + ONNX fp32,int8"] = measure(
                __file__, "project", container=containers[3], endpoint=hub.endpoint, canary=True, artifacts="fp32,int8"
            )
        finally:
            for name in containers:
                ModelStore.from_settings(_settings(name, hub.endpoint)).container.delete_container()
    for row in rows.values():
        row["mb_s"] = row["mb"] / row["seconds"] if row["mb"] else 0.0
    print(cpu_line())
    print(
        table(
            list(rows.items()),
            [
                ("seconds", "seconds", ".1f"),
                ("mb_s", "MB/s", ".0f"),
                ("peak_rss_mb", "peak RSS MB", ".0f"),
                ("written_mb", "disk MB", ".1f"),
                ("temp_peak_mb", "temp peak MB", ".1f"),
            ],
        )
    )
    if not artifacts_only:
        base = rows["seed's way (snapshot_download + upload)"]
        for name, row in rows.items():
            if row is not base:
                print(f"{name}: {base['seconds'] / row['seconds']:.2f}x the seed's speed, {row['written_mb']:.1f} MB written to local disk")
        print(f"no-op outcome: {rows['project, no-op refresh']['outcome']}")
    built = rows["project, refresh + ONNX fp32,int8"]
    peak = built["peak_rss_mb"]
    print(
        f"artifacts: {built['artifacts']}; whole refresh process peak {peak:.0f} MiB = {peak * 2**20 / 1e9:.2f} GB "
        f"(budget 3.5 GB = {3.5e9 / 2**20:.0f} MiB), temp files peak {built['temp_peak_mb']:.1f} MB (budget 500)"
    )
    print(f"peak step: {built['peak_step']}")


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    else:
        main()
