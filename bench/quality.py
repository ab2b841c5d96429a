"""Answer quality on real SQuAD v1.1 questions: the engine (fp32, int8) against the 4.57.6 pipeline.

    .venv/bin/python bench/quality.py [--limit 500] [--shared ../shared]

Uses ``../shared/squad/squad-v1.1-dev-part-B.json`` (CC BY-SA 4.0) and the small real model
``../shared/models/minilm-squad`` (fine-tuned on part A, so part B is unseen). Prints EM and F1
(official SQuAD v1.1 rules), the share of answers identical to the reference (text and start),
and throughput. Skips with a message when ``../shared`` is absent (users' machines).
"""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, measure, run_variant


def load_questions(shared: Path, limit: int) -> list[dict[str, Any]]:
    data = json.loads((shared / "squad" / "squad-v1.1-dev-part-B.json").read_text(encoding="utf-8"))
    out = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                out.append({"question": qa["question"], "context": paragraph["context"], "answers": [a["text"] for a in qa["answers"]]})
                if len(out) == limit:
                    return out
    return out


def f1(prediction: str, truth: str) -> float:
    from shared.refresh import normalize_answer as normalize  # here: the reference venv has no Azure SDK

    pred, gold = normalize(prediction).split(), normalize(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def scores(predictions: list[dict[str, Any]], questions: list[dict[str, Any]]) -> tuple[float, float]:
    from shared.refresh import normalize_answer as normalize

    em = sum(max(float(normalize(p["answer"]) == normalize(g)) for g in q["answers"]) for p, q in zip(predictions, questions, strict=True))
    f = sum(max(f1(p["answer"], g) for g in q["answers"]) for p, q in zip(predictions, questions, strict=True))
    return 100 * em / len(questions), 100 * f / len(questions)


def engine(model_dir: str, questions_file: str, quantize: str) -> dict[str, Any]:
    from shared.question_answering import Limits, QAEngine, QAItem

    questions = json.loads(Path(questions_file).read_text())
    qa = QAEngine.from_dir(model_dir, quantize=quantize, limits=Limits(max_items=64, max_windows=256), batch_windows=16)
    began = time.monotonic()
    predictions = []
    for first in range(0, len(questions), 16):
        chunk = questions[first : first + 16]
        for answers in qa.answer([QAItem(q["question"], q["context"]) for q in chunk]):
            predictions.append({"answer": answers[0].answer, "start": answers[0].start})
    return {"seconds": time.monotonic() - began, "predictions": predictions}


def reference(model_dir: str, questions_file: str) -> dict[str, Any]:
    import transformers
    from transformers import pipeline

    assert transformers.__version__ == "4.57.6"
    questions = json.loads(Path(questions_file).read_text())
    qa = pipeline("question-answering", model=model_dir, tokenizer=model_dir, device=-1)
    began = time.monotonic()
    predictions = []
    for q in questions:
        result = qa(question=q["question"], context=q["context"])
        predictions.append({"answer": result["answer"], "start": result["start"]})
    return {"seconds": time.monotonic() - began, "predictions": predictions}


VARIANTS = {"engine": engine, "reference": reference}


def main() -> int:
    limit = int(sys.argv[sys.argv.index("--limit") + 1]) if "--limit" in sys.argv else 500
    shared = Path(sys.argv[sys.argv.index("--shared") + 1]) if "--shared" in sys.argv else ROOT.parent / "shared"
    model_dir = shared / "models" / "minilm-squad"
    if not (shared / "squad").is_dir() or not model_dir.is_dir():
        print(f"skipped: {shared} has no squad/ data or models/minilm-squad (they ship only with the team's workspace)")
        return 0
    from tests.fixtures.make_golden import reference_python

    questions = load_questions(shared, limit)
    questions_file = ROOT / "bench" / "out" / "quality-questions.json"
    questions_file.parent.mkdir(parents=True, exist_ok=True)
    questions_file.write_text(json.dumps(questions))
    args = {"model_dir": str(model_dir), "questions_file": str(questions_file)}
    rows = {
        "reference 4.57.6 pipeline": measure(__file__, "reference", python=str(reference_python()), **args),
        "engine fp32": measure(__file__, "engine", quantize="none", **args),
        "engine int8": measure(__file__, "engine", quantize="int8", **args),
    }
    ref = rows["reference 4.57.6 pipeline"]["predictions"]
    print(f"{len(questions)} questions of SQuAD v1.1 dev part B, model minilm-squad")
    print(f"{'variant':<28}{'EM':>7}{'F1':>7}{'same as ref':>13}{'questions/s':>13}{'speed vs ref':>14}")
    for name, row in rows.items():
        em, f = scores(row["predictions"], questions)
        same = sum(p == r for p, r in zip(row["predictions"], ref, strict=True)) / len(ref)
        rate = len(questions) / row["seconds"]
        speed = rows["reference 4.57.6 pipeline"]["seconds"] / row["seconds"]
        print(f"{name:<28}{em:>7.1f}{f:>7.1f}{100 * same:>12.1f}%{rate:>13.1f}{speed:>13.2f}x")
    return 0


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    else:
        sys.exit(main())
