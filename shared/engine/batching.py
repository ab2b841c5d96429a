"""How a request's windows are grouped into model runs (``QA_BATCH_WINDOWS``).

A fixed count (an integer) takes the windows, shortest first, that many at a time. ``auto`` (the
default) bounds the tokens of a run instead: the windows, shortest first, join a run while its
rows times its width (the longest member's length: every row is padded to it) stay within
:func:`auto_run_tokens` (and the run within :data:`MAX_AUTO_WINDOWS`), and a window longer than
that runs alone. The windows of one run are
padded only to their longest member, so the short last window of a long context never grows to
384 tokens, and short windows (many questions over one paragraph) still share runs.

Why a token bound (docs/benchmarks.md, "Windows per run"): on 2 cores a bert-large run is bound by its
matrix products, and bigger runs only pay when the rows are few. On an AVX2-only CPU
(a 2-core AMD EPYC, ONNX Runtime fp32, a 2,000-word context) one 384-token window per
run took 24.6 s, two 27.0 s, eight 30.7 s (int8: 17.4, 18.8, 18.7 s); the transformers pipeline
runs one window at a time. The bound is chosen from the CPU's vector width; it never changes an
answer (spans are identical whatever the grouping, and int8 uses static scales).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from .cpu import has_avx512

AUTO: Literal["auto"] = "auto"
BatchWindows = int | Literal["auto"]

# Tokens (rows x width) of one run under ``auto``, and at most MAX_AUTO_WINDOWS windows.
# AVX2: one 384-token window alone, or up to 3 windows of 170 tokens; 2 x 384 per run was 10%
# slower than 1 (the AMD EPYC above). AVX-512 (a 2-core Xeon with VNNI and AMX, onnx fp32):
# alternated in one process, 512 tokens and 8 per run were within the noise of each other; in a
# sequential run 8 per run was 11% faster on the long context (docs/benchmarks.md, "Windows per
# run"). Until a quieter measurement separates them, AVX-512 keeps the former grouping: 8
# windows of 384 tokens.
AVX2_RUN_TOKENS = 512
AVX512_RUN_TOKENS = 8 * 384
MAX_AUTO_WINDOWS = 8


def auto_run_tokens() -> int:
    """The token bound of one run under ``QA_BATCH_WINDOWS=auto`` for this CPU."""
    return AVX512_RUN_TOKENS if has_avx512() else AVX2_RUN_TOKENS


def plan_runs(lengths: Sequence[int], batch_windows: BatchWindows, *, run_tokens: int | None = None) -> list[list[int]]:
    """Group windows (by their token ``lengths``) into runs: lists of window indices, shortest first.

    Args:
        lengths: each window's token count, in the windows' order.
        batch_windows: a fixed number of windows per run (at least 1), or ``"auto"``.
        run_tokens: the bound of an ``auto`` run (default :func:`auto_run_tokens`).

    Raises:
        ValueError: ``batch_windows`` is neither a positive integer nor ``"auto"``.
    """
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    if batch_windows == AUTO:
        bound = run_tokens if run_tokens is not None else auto_run_tokens()
        runs: list[list[int]] = []
        for k in order:
            if runs and len(runs[-1]) < MAX_AUTO_WINDOWS and (len(runs[-1]) + 1) * lengths[k] <= bound:
                runs[-1].append(k)
            else:
                runs.append([k])
        return runs
    if isinstance(batch_windows, bool) or not isinstance(batch_windows, int) or batch_windows < 1:
        raise ValueError(f"batch_windows must be a positive integer or 'auto', got {batch_windows!r}")
    return [order[first : first + batch_windows] for first in range(0, len(order), batch_windows)]
