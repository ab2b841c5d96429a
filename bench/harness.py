"""Run each benchmark variant in a fresh process and print a side-by-side table with ratios.

A variant is a function in a bench script; ``measure()`` runs it in a subprocess so that its peak
RSS (``VmHWM``) and bytes written to disk (``write_bytes`` of ``/proc/self/io``) are its own.
``measure(..., limit=MemoryLimit(1776, tmpfs_mb=800))`` runs it as a Flex Consumption instance
would hold it: in a memory cgroup of that many MiB (the kernel kills the process past it, as the
platform would) with ``TMPDIR`` on a tmpfs of that size (its files count as memory too). That
needs root and a cgroup memory controller (v1 or v2); without them the variant is not run.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class MemoryLimit:
    """A memory cgroup limit (MiB) for a variant's process, and optionally its ``TMPDIR`` on a tmpfs
    of ``tmpfs_mb`` MiB (charged to the same cgroup). Flex Consumption: 2,048 MB instances keep
    about 1,776 for the app once the platform's 272 MB are counted, as this project's figures do."""

    limit_mb: int
    tmpfs_mb: int | None = None
    taskset: str | None = None  # e.g. "0": one CPU, an indication of a 1-vCPU instance (not its speed)

    def describe(self) -> str:
        tmp = f", TMPDIR on a {self.tmpfs_mb} MiB tmpfs" if self.tmpfs_mb else ""
        cpus = f", CPUs {self.taskset} only" if self.taskset else ""
        return f"memory cgroup limit {self.limit_mb} MiB{tmp}{cpus}"


_CGROUP_ROOT = Path("/sys/fs/cgroup")


def limits_available() -> str | None:
    """Why a :class:`MemoryLimit` cannot be applied here, or ``None`` when it can."""
    if os.geteuid() != 0:
        return "not root: cannot create a memory cgroup"
    if (_CGROUP_ROOT / "memory" / "memory.limit_in_bytes").exists() or (_CGROUP_ROOT / "cgroup.controllers").exists():
        return None
    return "no memory cgroup controller under /sys/fs/cgroup"


@contextlib.contextmanager
def _limited(limit: MemoryLimit) -> Iterator[tuple[Path, Path | None, bool]]:
    """A fresh memory cgroup (v1 or v2) with ``limit``, and the tmpfs, removed afterwards."""
    v1 = (_CGROUP_ROOT / "memory" / "memory.limit_in_bytes").exists()
    group = (_CGROUP_ROOT / "memory" if v1 else _CGROUP_ROOT) / f"bench-{uuid.uuid4().hex[:10]}"
    group.mkdir()
    tmp: Path | None = None
    try:
        (group / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit.limit_mb << 20))
        if not v1 and (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        if limit.tmpfs_mb:
            tmp = Path(f"/tmp/{group.name}-tmpfs")
            tmp.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit.tmpfs_mb}m", "tmpfs", str(tmp)], check=True)
        yield group, tmp, v1
    finally:
        if tmp is not None:
            subprocess.run(["umount", str(tmp)], check=False)
            tmp.rmdir()
        for _ in range(50):  # the cgroup can be removed once its last process is gone
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def measure(script: str, name: str, python: str | None = None, limit: MemoryLimit | None = None, **args: Any) -> dict[str, Any]:
    """Parent side: run one variant in a fresh process and return what it printed.

    With ``limit`` the process runs in a memory cgroup (and ``TMPDIR`` on a tmpfs): the result
    gains ``limit_mb``, ``cgroup_peak_mb`` (everything charged: RSS, page cache, tmpfs files),
    ``oom_killed`` and ``verdict``; a process the kernel killed returns those alone, not an error.
    """
    command = [python or sys.executable, script, "--variant", name, json.dumps(args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if limit is None:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
        return _result(name, proc)
    why = limits_available()
    if why is not None:
        raise RuntimeError(f"cannot run {name} under a memory limit: {why}")
    if limit.taskset:
        command = ["taskset", "-c", limit.taskset, *command]
    with _limited(limit) as (group, tmp, v1):
        if tmp is not None:
            env["TMPDIR"] = str(tmp)
        procs = group / "cgroup.procs"
        proc = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, env=env,
            preexec_fn=lambda: procs.write_text(str(os.getpid())),  # before exec: every byte is charged
        )  # fmt: skip
        peak = _read_int(group / ("memory.max_usage_in_bytes" if v1 else "memory.peak"))
        killed = _events(group / ("memory.oom_control" if v1 else "memory.events")).get("oom_kill", 0) > 0
    killed = killed or proc.returncode == -signal.SIGKILL
    facts = {"limit_mb": limit.limit_mb, "cgroup_peak_mb": peak / 2**20, "oom_killed": killed}
    if killed:
        last = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        return {**facts, "verdict": f"killed: over the {limit.limit_mb} MiB limit", "last_lines": last}
    result = {**_result(name, proc), **facts}
    fits = result.get("peak_rss_mb", 0) <= limit.limit_mb
    result["verdict"] = f"fits: peak RSS {result.get('peak_rss_mb', 0):.0f} of {limit.limit_mb} MiB" if fits else "over the limit"
    return result


def _events(path: Path) -> dict[str, int]:
    """``key value`` lines (cgroup v1 ``memory.oom_control``, v2 ``memory.events``)."""
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


def _result(name: str, proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
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
