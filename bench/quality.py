"""Answer quality on real SQuAD v1.1 questions: the engine (torch fp32, int8; ONNX fp32 and int8
recipes) against the 4.57.6 pipeline.

    .venv/bin/python bench/quality.py [--limit 500] [--shared ../shared] [--no-reference] [--recipes]

``--no-reference`` compares with the torch fp32 engine instead of the pipeline (the golden tests
hold the two equal; the pipeline needs ``.golden-venv``); ``--recipes`` adds every int8 recipe of
``shared.refresh.int8.RECIPES``, each against ONNX fp32 (F1 and EM loss with a paired-bootstrap 95%
interval, share of answers identical).

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

from bench.harness import ROOT, cpu_line, measure, run_variant


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
    from shared.refresh.worker import normalize_answer as normalize  # here: the reference venv has no Azure SDK

    pred, gold = normalize(prediction).split(), normalize(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def scores(predictions: list[dict[str, Any]], questions: list[dict[str, Any]]) -> tuple[float, float]:
    from shared.refresh.worker import normalize_answer as normalize

    em = sum(max(float(normalize(p["answer"]) == normalize(g)) for g in q["answers"]) for p, q in zip(predictions, questions, strict=True))
    f = sum(max(f1(p["answer"], g) for g in q["answers"]) for p, q in zip(predictions, questions, strict=True))
    return 100 * em / len(questions), 100 * f / len(questions)


def engine(model_dir: str, questions_file: str, quantize: str) -> dict[str, Any]:
    from shared.engine.question_answering import Limits
    from shared.engine.torch_model import engine_from_dir

    questions = json.loads(Path(questions_file).read_text())
    qa = engine_from_dir(model_dir, quantize=quantize, limits=Limits(max_items=64, max_windows=256), batch_windows=16)
    return _predict(qa, questions)


def onnx(model_dir: str, questions_file: str, variant: str, recipe: str | None = None) -> dict[str, Any]:
    from shared.engine.onnx_runner import default_threads, onnx_engine
    from shared.engine.question_answering import Limits
    from shared.refresh.int8 import DEFAULT_RECIPE
    from shared.refresh.onnx_export import build_onnx

    questions = json.loads(Path(questions_file).read_text())
    artifact = build_onnx(Path(model_dir), variant, recipe=recipe or DEFAULT_RECIPE)
    tokenizer = {p.name: p.read_bytes() for p in Path(model_dir).iterdir() if p.name.startswith("tokenizer")}
    qa = onnx_engine(
        artifact.files,
        artifact.record,
        tokenizer,
        limits=Limits(max_items=64, max_windows=256),
        batch_windows=16,
        threads=default_threads(None, 1),
    )
    return _predict(qa, questions)


def _predict(qa: Any, questions: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine's best answer (and the gap to the second) to each question, 16 items a call, and the seconds it took."""
    from shared.engine.question_answering import QAItem

    began = time.monotonic()
    predictions = []
    for first in range(0, len(questions), 16):
        chunk = questions[first : first + 16]
        for answers in qa.answer([QAItem(q["question"], q["context"], top_k=2) for q in chunk]):
            predictions.append({"answer": answers[0].answer, "start": answers[0].start, "gap": _gap(answers)})
    return {"seconds": time.monotonic() - began, "predictions": predictions}


def _gap(answers: list[Any]) -> float | None:
    """Score gap between the two best answers (a near-tie flips on rounding noise)."""
    return answers[0].score - answers[1].score if len(answers) > 1 else None


def reference(model_dir: str, questions_file: str) -> dict[str, Any]:
    import transformers
    from transformers import pipeline

    assert transformers.__version__ == "4.57.6"
    questions = json.loads(Path(questions_file).read_text())
    qa = pipeline("question-answering", model=model_dir, tokenizer=model_dir, device=-1)
    began = time.monotonic()
    predictions = []
    for q in questions:
        results = qa(question=q["question"], context=q["context"], top_k=2)
        results = results if isinstance(results, list) else [results]
        gap = results[0]["score"] - results[1]["score"] if len(results) > 1 else None
        predictions.append({"answer": results[0]["answer"], "start": results[0]["start"], "gap": gap})
    return {"seconds": time.monotonic() - began, "predictions": predictions}


VARIANTS = {"engine": engine, "onnx": onnx, "reference": reference}


def per_question_f1(predictions: list[dict[str, Any]], questions: list[dict[str, Any]]) -> list[float]:
    return [max(f1(p["answer"], g) for g in q["answers"]) for p, q in zip(predictions, questions, strict=True)]


def per_question_em(predictions: list[dict[str, Any]], questions: list[dict[str, Any]]) -> list[float]:
    from shared.refresh.worker import normalize_answer as normalize

    return [max(float(normalize(p["answer"]) == normalize(g)) for g in q["answers"]) for p, q in zip(predictions, questions, strict=True)]


def bootstrap_loss(base: list[float], other: list[float], *, rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``base - other`` (in points) and its paired-bootstrap 95% interval."""
    import numpy as np

    diff = 100 * (np.asarray(base) - np.asarray(other))
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(rounds, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def main() -> int:
    limit = int(sys.argv[sys.argv.index("--limit") + 1]) if "--limit" in sys.argv else 500
    shared = Path(sys.argv[sys.argv.index("--shared") + 1]) if "--shared" in sys.argv else ROOT.parent / "shared"
    model_dir = shared / "models" / "minilm-squad"
    if not (shared / "squad").is_dir() or not model_dir.is_dir():
        print(f"skipped: {shared} has no squad/ data or models/minilm-squad (they ship only with the team's workspace)")
        return 0
    from shared.refresh.int8 import DEFAULT_RECIPE, RECIPES

    questions = load_questions(shared, limit)
    questions_file = ROOT / "bench" / "out" / "quality-questions.json"
    questions_file.parent.mkdir(parents=True, exist_ok=True)
    questions_file.write_text(json.dumps(questions))
    args = {"model_dir": str(model_dir), "questions_file": str(questions_file)}
    rows: dict[str, dict[str, Any]] = {}
    if "--no-reference" not in sys.argv:
        from tests.fixtures.make_golden import reference_python

        rows["reference 4.57.6 pipeline"] = measure(__file__, "reference", python=str(reference_python()), **args)
    rows["engine fp32 (torch)"] = measure(__file__, "engine", quantize="none", **args)
    rows["engine int8 (torch dynamic)"] = measure(__file__, "engine", quantize="int8", **args)
    rows["onnx fp32"] = measure(__file__, "onnx", variant="fp32", **args)
    recipes = sorted(RECIPES, key=lambda r: r != DEFAULT_RECIPE) if "--recipes" in sys.argv else [DEFAULT_RECIPE]
    for recipe in recipes:
        rows[f"onnx int8: {recipe}"] = measure(__file__, "onnx", variant="int8", recipe=recipe, **args)
    (ROOT / "bench" / "out" / "quality-results.json").write_text(json.dumps(rows))  # kept if the report below fails
    ref_name = "reference 4.57.6 pipeline" if "reference 4.57.6 pipeline" in rows else "engine fp32 (torch)"
    ref = rows[ref_name]["predictions"]
    print(cpu_line())
    print(f"{len(questions)} questions of SQuAD v1.1 dev part B, model minilm-squad; 'same' = same text and start as {ref_name}")
    print(f"{'variant':<58}{'EM':>7}{'F1':>7}{'same':>9}{'q/s':>8}{'speed':>8}{'peak MB':>9}")
    for name, row in rows.items():
        em, f = scores(row["predictions"], questions)
        same = sum((p["answer"], p["start"]) == (r["answer"], r["start"]) for p, r in zip(row["predictions"], ref, strict=True)) / len(ref)
        rate = len(questions) / row["seconds"]
        speed = rows[ref_name]["seconds"] / row["seconds"]
        print(f"{name:<58}{em:>7.2f}{f:>7.2f}{100 * same:>8.1f}%{rate:>8.1f}{speed:>7.2f}x{row['peak_rss_mb']:>9.0f}")

    # fp32 against the reference (and the torch engine): identical spans, except near-ties of the reference
    onnx_fp32 = rows["onnx fp32"]["predictions"]
    for name in dict.fromkeys([ref_name, "engine fp32 (torch)"]):
        for other in ("engine fp32 (torch)", "onnx fp32"):
            if other == name:
                continue
            base, mine = rows[name]["predictions"], rows[other]["predictions"]
            differ = [i for i, (a, b) in enumerate(zip(mine, base, strict=True)) if (a["answer"], a["start"]) != (b["answer"], b["start"])]
            ties = [i for i in differ if base[i]["gap"] is not None and base[i]["gap"] <= 1e-5]
            near = sum(1 for p in base if p["gap"] is not None and p["gap"] <= 1e-5)
            print(
                f"{other} vs {name}: {len(differ)} of {len(questions)} spans differ, {len(ties)} of them near-ties "
                f"(best two scores of {name} within 1e-5; {near} near-ties in all)"
            )
    base_f1, base_em = per_question_f1(onnx_fp32, questions), per_question_em(onnx_fp32, questions)
    print(f"{'int8 vs onnx fp32':<58}{'F1 loss [95% CI]':>26}{'EM loss [95% CI]':>26}{'identical':>11}")
    for name, row in rows.items():
        if "int8" not in name:
            continue
        f_loss = bootstrap_loss(base_f1, per_question_f1(row["predictions"], questions))
        e_loss = bootstrap_loss(base_em, per_question_em(row["predictions"], questions))
        same = sum((p["answer"], p["start"]) == (r["answer"], r["start"]) for p, r in zip(row["predictions"], onnx_fp32, strict=True))
        print(
            f"{name:<58}{f_loss[0]:>8.2f} [{f_loss[1]:>6.2f}, {f_loss[2]:>5.2f}]{e_loss[0]:>9.2f} [{e_loss[1]:>6.2f}, {e_loss[2]:>5.2f}]"
            f"{100 * same / len(questions):>10.1f}%"
        )
    return 0


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    else:
        sys.exit(main())
