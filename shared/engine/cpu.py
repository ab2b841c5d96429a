"""What this CPU offers the model's kernels: its name and the vector-instruction flags that decide
fp32 and int8 speed (recorded with each artifact, printed by the benchmarks, and read by the
rule that chooses how many windows go through the model at once)."""

from __future__ import annotations

import contextlib
import platform
from functools import cache
from pathlib import Path
from typing import Any

CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
_CPUINFO = Path("/proc/cpuinfo")


def cpu_facts() -> dict[str, Any]:
    """The CPU model and those of :data:`CPU_FLAGS` it has (none where ``/proc/cpuinfo`` is absent)."""
    return {"model": _cpu_model_and_flags()[0], "flags": [f for f in CPU_FLAGS if f in _cpu_model_and_flags()[1]]}


@cache
def _cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    with contextlib.suppress(OSError):
        for line in _CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
                break
    return model, flags


def has_avx512() -> bool:
    """Whether ONNX Runtime's and torch's AVX-512 kernels run here (``avx512f`` with ``avx512bw``)."""
    flags = _cpu_model_and_flags()[1]
    return {"avx512f", "avx512bw"} <= flags
