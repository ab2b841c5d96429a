"""The QA engine (fp32 and int8) against the transformers 4.57.6 pipeline, on a bert-large-shaped model.

    .venv/bin/python bench/engine.py [--repeats-long 3]

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
    from shared.question_answering import Limits, QAEngine, QAItem

    qa = QAEngine.from_dir(model_dir, quantize=quantize, limits=Limits(max_windows=64), batch_windows=8)
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


VARIANTS = {"engine": engine, "reference": reference}


def main() -> None:
    from bench.fixtures import bert_large
    from tests.fixtures.make_golden import reference_python

    long_repeats = int(sys.argv[sys.argv.index("--repeats-long") + 1]) if "--repeats-long" in sys.argv else 3
    repeats = {"a_short": 10, "b_2000_words": long_repeats, "c_16_questions": long_repeats}
    model_dir = str(bert_large())
    results = {
        "reference 4.57.6 pipeline": measure(__file__, "reference", python=str(reference_python()), model_dir=model_dir, repeats=repeats),
        "engine fp32": measure(__file__, "engine", model_dir=model_dir, quantize="none", repeats=repeats),
        "engine int8": measure(__file__, "engine", model_dir=model_dir, quantize="int8", repeats=repeats),
    }
    ref = results["reference 4.57.6 pipeline"]
    print(f"{'scenario':<16}{'variant':<28}{'p50 s':>9}{'p90 s':>9}{'speed vs ref':>14}{'peak RSS MB':>13}")
    for scenario in repeats:
        for name, row in results.items():
            p50, p90 = row[scenario]["p50"], row[scenario]["p90"]
            print(f"{scenario:<16}{name:<28}{p50:>9.3f}{p90:>9.3f}{ref[scenario]['p50'] / p50:>13.2f}x{row['peak_rss_mb']:>13.0f}")
    fp32, int8 = results["engine fp32"], results["engine int8"]
    print(f"int8 vs fp32 on b_2000_words: {fp32['b_2000_words']['p50'] / int8['b_2000_words']['p50']:.2f}x")


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    else:
        main()
