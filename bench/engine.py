"""The QA engine (torch fp32 and int8, ONNX fp32 and int8) against the transformers 4.57.6 pipeline,
on a bert-large-shaped model.

    .venv/bin/python bench/engine.py [--repeats-long 3] [--no-reference] [--no-before]

``--no-reference`` leaves the pipeline out (it needs ``.golden-venv``); ratios are then to the torch
fp32 engine. The ONNX artifacts come from ``bench/out/onnx-bert-large/`` (built by
``bench/onnx_build_load.py`` on first use). Every engine runs with ``QA_BATCH_WINDOWS=auto`` (the
default); the ONNX rows are also run with the former fixed 8 windows per run ("before"), unless
``--no-before``.

At the end it prints the CPU's flags and the speed goals, each met or not: on an AVX2-only
CPU onnx fp32 at least 1.3x and onnx int8 at least 2.5x the pipeline on every scenario; on an
AVX-512 CPU no scenario slower than before. ONNX Runtime picks its kernels from the CPU (it cannot
be told to use AVX2 only), so the AVX2 goals are only judged on an AVX2-only CPU.

Scenarios: (a) one short question and context, (b) a 2,000-word context, (c) 16 questions over
one context. Each variant runs in its own process (the reference in ``.golden-venv`` with
transformers 4.57.6, created on first use); p50/p90 latency and ratios to the reference.
Random weights: the answers are meaningless, the work is the real model's.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import measure, run_variant

SHORT_Q = "Which team won Super Bowl 50?"
SHORT_C = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football League "
    "for the 2015 season. The Denver Broncos defeated the Carolina Panthers 24 to 10 to earn their third title."
)


def scenarios() -> dict[str, list[tuple[str, str]]]:
    from tests.fixtures.tiny_models import WORDS

    words = [WORDS[(i * 7 + 3) % len(WORDS)] for i in range(2000)]
    long_context = " ".join(" ".join(words[i : i + 15]).capitalize() + "." for i in range(0, 2000, 15))
    para = " ".join([SHORT_C] * 3)
    starts = ("Who won", "Which team", "What year", "Where was")
    questions = [f"{q} {w}?" for q in starts for w in ("the game", "it", "the title", "the season")]
    return {
        "a_short": [(SHORT_Q, SHORT_C)],
        "b_2000_words": [(SHORT_Q, long_context)],
        "c_16_questions": [(q, para) for q in questions],
    }


def _time(run: Any, repeats: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, items in scenarios().items():
        run(items)  # warm-up
        times = []
        for _ in range(repeats[name]):
            began = time.perf_counter()
            run(items)
            times.append(time.perf_counter() - began)
        times.sort()
        out[name] = {"p50": statistics.median(times), "p90": times[min(len(times) - 1, int(0.9 * len(times)))], "n": len(times)}
    return out


def engine(model_dir: str, quantize: str, repeats: dict[str, int], batch_windows: int | str = "auto") -> dict[str, Any]:
    from shared.engine.question_answering import Limits, QAItem
    from shared.engine.torch_model import engine_from_dir

    qa = engine_from_dir(model_dir, quantize=quantize, limits=Limits(max_windows=64), batch_windows=batch_windows)
    return _time(lambda items: qa.answer([QAItem(q, c) for q, c in items]), repeats)


def onnx(model_dir: str, variant: str, repeats: dict[str, int], batch_windows: int | str = "auto") -> dict[str, Any]:
    import json

    from bench.onnx_build_load import ARTIFACTS
    from shared.engine.onnx_runner import default_threads, onnx_engine
    from shared.engine.question_answering import Limits, QAItem

    folder = ARTIFACTS / variant
    files = {name: bytearray((folder / name).read_bytes()) for name in ("model.onnx", "weights.bin")}
    tokenizer = {"tokenizer.json": (Path(model_dir) / "tokenizer.json").read_bytes()}
    record = json.loads((folder / "artifact.json").read_text())
    qa = onnx_engine(files, record, tokenizer, limits=Limits(max_windows=64), batch_windows=batch_windows, threads=default_threads(None, 1))
    return _time(lambda items: qa.answer([QAItem(q, c) for q, c in items]), repeats)


def reference(model_dir: str, repeats: dict[str, int]) -> dict[str, Any]:
    import transformers
    from transformers import pipeline

    assert transformers.__version__ == "4.57.6"
    qa = pipeline("question-answering", model=model_dir, tokenizer=model_dir, device=-1)

    def run(items: list[tuple[str, str]]) -> Any:
        if len(items) == 1:
            return qa(question=items[0][0], context=items[0][1])
        return qa(question=[q for q, _ in items], context=items[0][1])

    return _time(run, repeats)


VARIANTS = {"engine": engine, "onnx": onnx, "reference": reference}


FP32_GOAL, INT8_GOAL = 1.3, 2.5  # the goals on an AVX2-only CPU: times the pipeline's speed, every scenario
BEFORE = 8  # the former fixed QA_BATCH_WINDOWS


def main() -> None:
    from bench.fixtures import bert_large
    from bench.harness import cpu_line
    from bench.onnx_build_load import ensure_artifacts

    long_repeats = int(sys.argv[sys.argv.index("--repeats-long") + 1]) if "--repeats-long" in sys.argv else 3
    repeats = {"a_short": 10, "b_2000_words": long_repeats, "c_16_questions": long_repeats}
    model_dir = str(bert_large())
    ensure_artifacts()
    results = {}
    if "--no-reference" not in sys.argv:
        from tests.fixtures.make_golden import reference_python

        python = str(reference_python())
        results["reference 4.57.6 pipeline"] = measure(__file__, "reference", python=python, model_dir=model_dir, repeats=repeats)
    results["engine fp32 (torch)"] = measure(__file__, "engine", model_dir=model_dir, quantize="none", repeats=repeats)
    results["engine int8 (torch dynamic)"] = measure(__file__, "engine", model_dir=model_dir, quantize="int8", repeats=repeats)
    for variant in ("fp32", "int8"):
        results[f"onnx {variant}"] = measure(__file__, "onnx", model_dir=model_dir, variant=variant, repeats=repeats)
        if "--no-before" not in sys.argv:
            results[f"onnx {variant}, {BEFORE}/run (before)"] = measure(
                __file__, "onnx", model_dir=model_dir, variant=variant, repeats=repeats, batch_windows=BEFORE
            )
    ref_name = next(iter(results))
    ref = results[ref_name]
    print(cpu_line())
    print(f"speed = p50 of {ref_name} / p50 of the variant (same run); QA_BATCH_WINDOWS=auto unless the row says otherwise")
    print(f"{'scenario':<16}{'variant':<34}{'p50 s':>9}{'p90 s':>9}{'speed':>9}{'peak RSS MB':>13}")
    for scenario in repeats:
        for name, row in results.items():
            p50, p90 = row[scenario]["p50"], row[scenario]["p90"]
            print(f"{scenario:<16}{name:<34}{p50:>9.3f}{p90:>9.3f}{ref[scenario]['p50'] / p50:>8.2f}x{row['peak_rss_mb']:>13.0f}")
    torch_fp32 = results["engine fp32 (torch)"]
    for name in ("engine int8 (torch dynamic)", "onnx fp32", "onnx int8"):
        ratios = ", ".join(f"{s} {torch_fp32[s]['p50'] / results[name][s]['p50']:.2f}x" for s in repeats)
        print(f"{name} vs torch fp32: {ratios}")
    print("\n".join(goals(results, list(repeats), reference="reference 4.57.6 pipeline" in results)))


def goals(results: dict[str, dict[str, Any]], scenarios: list[str], *, reference: bool) -> list[str]:
    """The speed goals, each with the figures that decide it and whether it is met on this CPU."""
    from shared.engine.cpu import has_avx512

    avx512 = has_avx512()
    lines = [f"speed goals; this CPU: {'AVX-512' if avx512 else 'AVX2-only (no AVX-512)'}"]
    if reference:
        ref = results["reference 4.57.6 pipeline"]
        for variant, goal in (("fp32", FP32_GOAL), ("int8", INT8_GOAL)):
            speeds = {s: ref[s]["p50"] / results[f"onnx {variant}"][s]["p50"] for s in scenarios}
            met = all(v >= goal for v in speeds.values())
            figures = ", ".join(f"{s} {v:.2f}x" for s, v in speeds.items())
            verdict = "met" if met else "NOT met"
            if avx512:
                verdict = f"{'would be met' if met else 'would not be met'} here; an AVX2-only goal, not judged on this CPU"
            lines.append(f"  onnx {variant} >= {goal}x the pipeline on every scenario (AVX2-only CPUs): {figures}: {verdict}")
    else:
        lines.append("  the AVX2 goals need the pipeline (run without --no-reference)")
    for variant in ("fp32", "int8"):
        before = results.get(f"onnx {variant}, {BEFORE}/run (before)")
        if before is None:
            lines.append(f"  onnx {variant} no slower than {BEFORE} windows per run: not measured (--no-before)")
            continue
        now = results[f"onnx {variant}"]
        speeds = {s: before[s]["p50"] / now[s]["p50"] for s in scenarios}
        met = all(v >= 1.0 for v in speeds.values())
        figures = ", ".join(f"{s} {v:.2f}x" for s, v in speeds.items())
        spread = max((now[s]["p90"] - now[s]["p50"]) / now[s]["p50"] for s in scenarios)
        kind = "the AVX-512 goal" if avx512 else "not an AVX2 goal, shown for the rule"
        lines.append(
            f"  onnx {variant} auto no slower than {BEFORE}/run on every scenario ({kind}): {figures}: "
            f"{'met' if met else 'NOT met'} (largest p90 over p50 spread {100 * spread:.0f}%)"
        )
        rss = now["peak_rss_mb"] <= before["peak_rss_mb"]
        lines.append(
            f"  onnx {variant} peak RSS auto {now['peak_rss_mb']:.0f} MB vs {BEFORE}/run {before['peak_rss_mb']:.0f} MB: "
            f"{'not above' if rss else 'ABOVE'} (load peak and steady RSS: bench/onnx_build_load.py --load-only)"
        )
    return lines


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    else:
        main()
