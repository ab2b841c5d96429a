"""Windows per run (``QA_BATCH_WINDOWS``): the ``auto`` rule, a fixed count, and what the model
is handed under each (shapes only: no timing)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from shared.engine import batching, cpu
from shared.engine.batching import AUTO, auto_run_tokens, plan_runs
from shared.engine.question_answering import QAEngine, QAItem, TokenizerSpec

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"


def test_auto_runs_stay_within_the_token_bound_shortest_first() -> None:
    lengths = [384, 120, 384, 90, 384, 200, 100]
    runs = plan_runs(lengths, AUTO, run_tokens=512)
    assert sorted(k for run in runs for k in run) == list(range(len(lengths)))
    assert [[lengths[k] for k in run] for run in runs] == [[90, 100, 120], [200], [384], [384], [384]]
    for run in runs:
        assert len(run) * max(lengths[k] for k in run) <= 512


def test_auto_never_pads_the_short_last_window_of_a_long_context() -> None:
    lengths = [384] * 10 + [171]  # a 2,000-word context: ten full windows and a short last one
    runs = plan_runs(lengths, AUTO, run_tokens=512)
    assert runs[0] == [10]  # alone, at its own width
    assert all(len(run) == 1 for run in runs)


def test_a_window_over_the_bound_runs_alone() -> None:
    assert plan_runs([600, 700], AUTO, run_tokens=512) == [[0], [1]]


def test_auto_runs_hold_at_most_max_auto_windows() -> None:
    runs = plan_runs([10] * 20, AUTO, run_tokens=10_000)
    assert [len(run) for run in runs] == [batching.MAX_AUTO_WINDOWS] * 2 + [20 - 2 * batching.MAX_AUTO_WINDOWS]


def test_a_fixed_count_takes_that_many_shortest_first() -> None:
    lengths = [384, 120, 384, 90, 384]
    assert plan_runs(lengths, 2) == [[3, 1], [0, 2], [4]]
    assert plan_runs(lengths, 8) == [[3, 1, 0, 2, 4]]
    assert plan_runs([], 8) == [] and plan_runs([], AUTO) == []


@pytest.mark.parametrize("bad", [0, -1, "8", "sometimes", 2.0, True])
def test_anything_but_a_positive_count_or_auto_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="batch_windows"):
        plan_runs([10], bad)  # type: ignore[arg-type]


def test_the_bound_follows_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu, "_CPUINFO", cpuinfo)
    monkeypatch.setattr(batching, "AVX512_RUN_TOKENS", 4096)  # tell the two kinds apart whatever the values
    seen = {}
    for kind, flags in (("avx2", "fpu sse2 avx avx2 fma f16c"), ("avx512", "fpu avx avx2 fma avx512f avx512bw avx512_vnni")):
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
        cpu._cpu_model_and_flags.cache_clear()
        seen[kind] = (auto_run_tokens(), cpu.cpu_facts())
    cpu._cpu_model_and_flags.cache_clear()
    assert seen["avx2"][0] == batching.AVX2_RUN_TOKENS and seen["avx512"][0] == 4096
    assert seen["avx2"][1] == {"model": "Test CPU", "flags": ["avx", "avx2", "fma", "f16c"]}
    assert "avx512_vnni" in seen["avx512"][1]["flags"]


class ShapeRecorder:
    """A runner that records the (rows, width) of every run; its logits depend on the token
    position alone, as a real model's do on padding it cannot see."""

    input_names = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        ids = inputs["input_ids"]
        self.shapes.append(ids.shape)
        position = np.arange(ids.shape[1], dtype=np.float32)
        return np.tile(np.sin(position), (ids.shape[0], 1)), np.tile(np.cos(position), (ids.shape[0], 1))


def _engine(batch_windows: int | str, recorder: ShapeRecorder) -> QAEngine:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MODELS / "bert"))
    return QAEngine(recorder, TokenizerSpec.from_transformers(tokenizer), batch_windows=batch_windows, max_seq_len=64, doc_stride=16)  # type: ignore[arg-type]


def test_the_engine_hands_the_model_runs_of_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "auto_run_tokens", lambda: 130)
    recorder = ShapeRecorder()
    qa = _engine(AUTO, recorder)
    long_item = QAItem("who won?", " ".join(f"team{i % 7} won game {i}." for i in range(40)))
    short_items = [QAItem(f"who won {w}?", "The Broncos won the game.") for w in ("it", "this", "that")]
    stats: dict[str, int] = {}
    answers = qa.answer([long_item, *short_items], stats=stats)
    assert len(answers) == 4 and all(a for a in answers)
    assert sum(rows for rows, _ in recorder.shapes) == stats["windows"] > 4
    assert all(rows * width <= 130 or rows == 1 for rows, width in recorder.shapes)
    assert recorder.shapes[0][0] == 3  # the three short windows share one run at their own width
    assert max(width for _, width in recorder.shapes) == 64

    fixed = ShapeRecorder()
    assert _engine(8, fixed).answer([long_item, *short_items]) == answers  # grouping never changes an answer
    assert [rows for rows, _ in fixed.shapes] == [8] * (stats["windows"] // 8) + ([stats["windows"] % 8] if stats["windows"] % 8 else [])


@pytest.mark.parametrize("bad", [0, "eight"])
def test_the_engine_refuses_a_bad_count_when_built(bad: object) -> None:
    with pytest.raises(ValueError, match="batch_windows"):
        _engine(bad, ShapeRecorder())  # type: ignore[arg-type]
