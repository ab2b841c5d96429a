"""The QA engine (torch fp32 and int8, ONNX fp32 and int8) against the transformers 4.57.6 pipeline,
on a bert-large-shaped model.

    .venv/bin/python bench/engine.py [--repeats-long 3] [--no-reference]

``--no-reference`` leaves the pipeline out (it needs ``.golden-venv``); ratios are then to the torch
fp32 engine. The ONNX artifacts come from ``bench/out/onnx-bert-large/`` (built by
``bench/artifacts.py`` on first use).

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


def engine(model_dir: str, quantize: str, repeats: dict[str, int]) -> dict[str, Any]:
    from shared.engine.question_answering import Limits, QAEngine, QAItem

    qa = QAEngine.from_dir(model_dir, quantize=quantize, limits=Limits(max_windows=64), batch_windows=8)
    return _time(lambda items: qa.answer([QAItem(q, c) for q, c in items]), repeats)


def onnx(model_dir: str, variant: str, repeats: dict[str, int]) -> dict[str, Any]:
    import json

    from bench.artifacts import ARTIFACTS
    from shared.engine.onnx_runner import default_threads, onnx_engine
    from shared.engine.question_answering import Limits, QAItem

    folder = ARTIFACTS / variant
    files = {name: bytearray((folder / name).read_bytes()) for name in ("model.onnx", "weights.bin")}
    tokenizer = {"tokenizer.json": (Path(model_dir) / "tokenizer.json").read_bytes()}
    record = json.loads((folder / "artifact.json").read_text())
    qa = onnx_engine(files, record, tokenizer, limits=Limits(max_windows=64), batch_windows=8, threads=default_threads(None, 1))
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


def main() -> None:
    from bench.artifacts import ensure_artifacts
    from bench.fixtures import bert_large
    from bench.harness import cpu_line

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
    results["onnx fp32"] = measure(__file__, "onnx", model_dir=model_dir, variant="fp32", repeats=repeats)
    results["onnx int8"] = measure(__file__, "onnx", model_dir=model_dir, variant="int8", repeats=repeats)
    ref_name = next(iter(results))
    ref = results[ref_name]
    print(cpu_line())
    print(f"speed = p50 of {ref_name} / p50 of the variant (same run)")
    print(f"{'scenario':<16}{'variant':<30}{'p50 s':>9}{'p90 s':>9}{'speed':>9}{'peak RSS MB':>13}")
    for scenario in repeats:
        for name, row in results.items():
            p50, p90 = row[scenario]["p50"], row[scenario]["p90"]
            print(f"{scenario:<16}{name:<30}{p50:>9.3f}{p90:>9.3f}{ref[scenario]['p50'] / p50:>8.2f}x{row['peak_rss_mb']:>13.0f}")
    torch_fp32 = results["engine fp32 (torch)"]
    for name in ("engine int8 (torch dynamic)", "onnx fp32", "onnx int8"):
        ratios = ", ".join(f"{s} {torch_fp32[s]['p50'] / results[name][s]['p50']:.2f}x" for s in repeats)
        print(f"{name} vs torch fp32: {ratios}")


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    else:
        main()
