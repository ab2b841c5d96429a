"""Run each benchmark variant in a fresh process and print a side-by-side table with ratios.

A variant is a function in a bench script; ``measure()`` runs it in a subprocess so that its peak
RSS (``VmHWM``) and bytes written to disk (``write_bytes`` of ``/proc/self/io``) are its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AZURITE_CONNECTION = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
)


def azurite_connection() -> str:
    return os.environ.get("AZURITE_CONNECTION_STRING", AZURITE_CONNECTION)


def io_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def rss_mb() -> float:
    """Resident set of this process now (``VmRSS``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    """Peak RSS of this process image. ``VmHWM`` rather than ``ru_maxrss``: the latter survives
    ``execve`` and would report the parent's high-water mark for a child that used less."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variants: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """Child side: ``python bench/x.py --variant NAME JSON_ARGS`` prints one JSON line."""
    name = sys.argv[sys.argv.index("--variant") + 1]
    args = json.loads(sys.argv[sys.argv.index("--variant") + 2])
    sys.path.insert(0, str(ROOT))
    written = io_write_bytes()
    began = time.monotonic()
    result = variants[name](**args)
    result.setdefault("seconds", time.monotonic() - began)
    result["peak_rss_mb"] = peak_rss_mb()
    result["written_mb"] = (io_write_bytes() - written) / 1e6
    print("RESULT " + json.dumps(result))


def measure(script: str, name: str, python: str | None = None, **args: Any) -> dict[str, Any]:
    """Parent side: run one variant in a fresh process and return what it printed."""
    proc = subprocess.run(
        [python or sys.executable, script, "--variant", name, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    raise RuntimeError(f"variant {name} failed:\n{proc.stderr[-3000:]}")


def table(rows: list[tuple[str, dict[str, Any]]], columns: list[tuple[str, str, str]]) -> str:
    """Rows of results as a fixed-width table; columns are (key, header, format)."""
    header = f"{'variant':<34}" + "".join(f"{h:>14}" for _, h, _ in columns)
    lines = [header, "-" * len(header)]
    for label, row in rows:
        cells = "".join(f"{format(row[k], fmt) if k in row else '-':>14}" for k, _, fmt in columns)
        lines.append(f"{label:<34}{cells}")
    return "\n".join(lines)


def cpu_line() -> str:
    """The CPU this run measured on: model, vector flags that decide kernel speed, CPUs usable."""
    sys.path.insert(0, str(ROOT))
    from shared.engine.cpu import cpu_facts
    from shared.engine.onnx_runner import cpu_quota

    facts = cpu_facts()
    return f"CPU: {facts['model']}; flags: {' '.join(facts['flags']) or 'none of note'}; CPUs usable: {cpu_quota()}"
