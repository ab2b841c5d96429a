"""The ONNX engine: export of the tiny BERT, DistilBERT and RoBERTa fixtures, golden parity of fp32,
batch independence of int8, serving without torch, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from shared.engine import onnx_runner
from shared.engine.onnx_graph import external_initializers
from shared.engine.onnx_parts import split_graph
from shared.engine.onnx_runner import default_threads, onnx_engine, staged_engine
from shared.engine.question_answering import Answer, QAEngine, QAItem
from shared.errors import IntegrityError, UnsafeModelError
from shared.refresh.int8 import DEFAULT_RECIPE, RECIPES
from shared.refresh.onnx_export import OnnxArtifact, build_onnx
from shared.refresh.onnx_weights import EXTERNAL_MIN_BYTES, MODEL_FILE, WEIGHTS_FILE, initializer_views

from .test_question_answering_golden import RECORDS, ROOMY, assert_same, item

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "fixtures" / "models"
GOLDEN_MODELS = ["bert", "distilbert", "roberta", "bert-squad2"]
CONTEXT = "The Denver Broncos won Super Bowl 50 in 2016 against the Carolina Panthers in san francisco."

pytestmark = pytest.mark.slow


@cache
def artifact(model: str, variant: str, recipe: str | None = None) -> OnnxArtifact:
    return build_onnx(MODELS / model, variant, **({"recipe": recipe} if recipe else {}))


def tokenizer_files(model: str) -> dict[str, bytearray]:
    return {p.name: bytearray(p.read_bytes()) for p in (MODELS / model).iterdir() if p.name.startswith(("tokenizer", "special_tokens"))}


def engine(model: str, variant: str, *, batch_windows: int = 8, recipe: str | None = None, prepack: bool = True) -> QAEngine:
    built = artifact(model, variant, recipe)
    files = {name: bytearray(data) for name, data in built.files.items()}  # onnx_engine empties (or keeps) what it is given
    return onnx_engine(files, built.record, tokenizer_files(model), limits=ROOMY, batch_windows=batch_windows, threads=1, prepack=prepack)


def records(model: str) -> list[dict[str, object]]:
    return [r for r in RECORDS if r["model"] == model]


# --- the artifact -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_artifact_is_a_graph_over_one_weights_file(variant: str) -> None:
    built = artifact("bert", variant)
    assert set(built.files) == {MODEL_FILE, WEIGHTS_FILE}
    graph = onnx.load_from_string(bytes(built.files[MODEL_FILE]))
    weights = built.files[WEIGHTS_FILE]
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) < EXTERNAL_MIN_BYTES for t in inline)
    end = 0
    for tensor in external:
        entries = {e.key: e.value for e in tensor.external_data}
        assert entries["location"] == WEIGHTS_FILE
        offset, length = int(entries["offset"]), int(entries["length"])
        assert offset % 64 == 0 and offset + length <= len(weights)
        end = max(end, offset + length)
    assert len(weights) - end < 64
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.graph.output] == ["start_logits", "end_logits"]
    json.dumps(built.record)  # JSON-able as stored
    assert built.record["variant"] == variant
    assert (built.record["max_seq_len"], built.record["doc_stride"]) == (384, 128)
    assert built.record["cls_token_id"] == 2 and built.record["pad_token_id"] == 0
    assert {"torch", "onnx", "onnxruntime"} <= set(built.record["versions"])
    assert built.record["cpu"]["model"] and isinstance(built.record["cpu"]["flags"], list)


@pytest.mark.parametrize(
    ("recipe", "int8_matmuls", "quantized_activations", "fp32_matmuls"),
    [
        # the default: 2 layers x (query, key, value, attention output, FFN input, FFN output); the span head stays fp32
        (None, 2 * 6, 2 * 4, 1),
        # FFN output projections kept in fp32 as well
        ("per-channel, FFN output fp32, static", 2 * 5, 2 * 3, 2 * 1 + 1),
    ],
)
def test_int8_artifact_quantizes_the_weights_its_recipe_names(
    recipe: str | None, int8_matmuls: int, quantized_activations: int, fp32_matmuls: int
) -> None:
    built = artifact("bert", "int8", recipe)
    graph = onnx.load_from_string(bytes(built.files[MODEL_FILE]))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulIntegerToFloat") == int8_matmuls
    assert ops.count("QuantizeLinear") == quantized_activations  # one per distinct activation: Q/K/V share theirs
    assert ops.count("MatMul") >= fp32_matmuls
    assert not any(op.startswith("DynamicQuantize") for op in ops)  # static scales only
    assert built.record["recipe"] == (recipe or DEFAULT_RECIPE)
    assert built.record["calibration"]["windows"] > 36


def test_distilbert_and_roberta_take_no_token_type_ids() -> None:
    for model in ("distilbert", "roberta"):
        assert artifact(model, "fp32").record["input_names"] == ["input_ids", "attention_mask"]


# --- fp32: the pipeline's answers ---------------------------------------------------------------


@pytest.mark.parametrize("model", GOLDEN_MODELS)
def test_fp32_one_at_a_time_matches_the_pipeline(model: str) -> None:
    assert artifact(model, "fp32").record["export"].startswith("placeholder weights")  # the refresh's way
    qa = engine(model, "fp32", batch_windows=1)
    for index, record in enumerate(records(model)):
        assert_same(qa.answer([item(record)])[0], record["answers"], f"{model} #{index}: {record['options']}")


@pytest.mark.parametrize("prepack", [True, False], ids=["repacked", "shared"])
@pytest.mark.parametrize("model", GOLDEN_MODELS)
def test_fp32_batched_matches_the_pipeline(model: str, prepack: bool) -> None:
    qa = engine(model, "fp32", batch_windows=8, prepack=prepack)
    chosen = records(model)
    for first in range(0, len(chosen), 16):
        chunk = chosen[first : first + 16]
        for offset, (got, record) in enumerate(zip(qa.answer([item(r) for r in chunk]), chunk, strict=True)):
            assert_same(got, record["answers"], f"{model} #{first + offset}")


# --- weights shared with the download buffer ------------------------------------------------------


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_the_graph_reader_locates_every_external_initializer_as_onnx_does(variant: str) -> None:
    built = artifact("roberta", variant)
    graph = onnx.load_from_string(bytes(built.files[MODEL_FILE]))
    expected = []
    for tensor in graph.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            expected.append((tensor.name, tuple(tensor.dims), dtype, entries["location"], int(entries["offset"]), int(entries["length"])))
    found = external_initializers(built.files[MODEL_FILE])
    assert [(t.name, t.dims, t.dtype, t.location, t.offset, t.length) for t in found] == expected
    everything = np.frombuffer(bytes(built.files[WEIGHTS_FILE]), dtype=np.uint8)
    views = initializer_views(graph, built.files[WEIGHTS_FILE])
    for tensor in found:
        assert np.array_equal(tensor.view(everything), views[tensor.name])
    with pytest.raises(IntegrityError, match="well-formed"):
        external_initializers(bytes(built.files[MODEL_FILE])[:-7])


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_a_shared_session_reads_its_weights_from_the_download_buffer(variant: str) -> None:
    """No copy: the engine keeps the buffer (which can no longer be resized), and a change to its
    bytes after the load changes the answers; the repacked load empties it and is not affected."""
    built = artifact("bert", variant)
    graph = onnx.load_from_string(bytes(built.files[MODEL_FILE]))
    probe = QAItem("who won?", CONTEXT, top_k=3)
    shared_files = {name: bytearray(data) for name, data in built.files.items()}
    shared = onnx_engine(shared_files, built.record, tokenizer_files("bert"), threads=1, prepack=False)
    repacked_files = {name: bytearray(data) for name, data in built.files.items()}
    repacked = onnx_engine(repacked_files, built.record, tokenizer_files("bert"), threads=1, prepack=True)
    assert len(shared_files[WEIGHTS_FILE]) == len(built.files[WEIGHTS_FILE]) and len(repacked_files[WEIGHTS_FILE]) == 0
    before = shared.answer([probe])[0]
    assert [(a.answer, a.start) for a in before] == [(a.answer, a.start) for a in repacked.answer([probe])[0]]
    with pytest.raises(BufferError):
        shared_files[WEIGHTS_FILE].clear()
    external = {t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for name, view in initializer_views(graph, shared_files[WEIGHTS_FILE]).items():
        if name in external and view.dtype == np.float32 and view.ndim == 2:
            view *= -3.0
    del view
    assert [a.score for a in shared.answer([probe])[0]] != [a.score for a in before]


def test_runs_split_to_a_memory_bound_give_the_same_logits() -> None:
    qa = engine("bert", "fp32", prepack=False)
    runner = qa.runner
    assert isinstance(runner, onnx_runner.OnnxRunner)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 90, size=(7, 40)).astype(np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    whole = runner(inputs)
    runner.run_bytes = onnx_runner.run_activation_bytes(3, 40, runner.hidden)  # 3 rows per session run
    assert runner.rows_per_run(40) == 3
    parts = runner(inputs)
    assert all(np.array_equal(a, b) for a, b in zip(whole, parts, strict=True))


def test_the_memory_bound_follows_qa_memory_mb(monkeypatch: pytest.MonkeyPatch) -> None:
    built = artifact("bert", "fp32")
    monkeypatch.setattr(onnx_runner, "resident_bytes", lambda: 1000 << 20)
    files = {name: bytearray(data) for name, data in built.files.items()}
    qa = onnx_engine(files, built.record, tokenizer_files("bert"), threads=1, prepack=False, memory_mb=1500, max_concurrent=2)
    assert qa.runner.run_bytes == ((1500 - 1000 - 192) << 20) // 2  # type: ignore[attr-defined]
    files = {name: bytearray(data) for name, data in built.files.items()}
    assert onnx_engine(files, built.record, tokenizer_files("bert"), threads=1).runner.run_bytes is None  # type: ignore[attr-defined]
    assert onnx_runner.prepack_fits(1_335_000_000, None)
    assert onnx_runner.prepack_fits(1_335_000_000, 3824) and not onnx_runner.prepack_fits(1_335_000_000, 1776)
    assert onnx_runner.prepack_fits(431_000_000, 1776)


# --- repacked part by part as weights.bin streams in ---------------------------------------------


@pytest.mark.parametrize("model", ["bert", "roberta", "distilbert"])
def test_a_graph_built_part_by_part_answers_bit_for_bit_as_the_whole_graph(model: str) -> None:
    built = artifact(model, "fp32")
    graph, weights = bytes(built.files[MODEL_FILE]), bytes(built.files[WEIGHTS_FILE])
    parts = split_graph(graph, part_bytes=len(weights) // 3)
    assert parts is not None and len(parts) >= 2
    ready = [p.ready_at for p in parts if p.tensors]
    assert ready == sorted(ready)  # weights.bin laid out in the order the nodes read it
    fed: list[int] = []

    def stream(sink: Any) -> None:
        for at in range(0, len(weights), 4099):
            sink(memoryview(weights[at : at + 4099]))
            fed.append(len(sink.sessions))

    staged = staged_engine(graph, built.record, tokenizer_files(model), parts=parts, weights_bytes=len(weights), stream=stream,
                           limits=ROOMY, batch_windows=8, threads=1)  # fmt: skip
    assert fed[len(fed) // 2] < len(parts)  # parts were built while the bytes still arrived
    whole = engine(model, "fp32")
    items = [item(r) for r in records(model)][:24]
    for got, want in zip(staged.answer(items), whole.answer(items), strict=True):
        assert [(a.answer, a.start, a.end, a.score) for a in got] == [(a.answer, a.start, a.end, a.score) for a in want]


def test_the_parts_hand_the_download_back_and_the_stream_must_be_whole() -> None:
    built = artifact("bert", "fp32")
    graph, weights = bytes(built.files[MODEL_FILE]), bytes(built.files[WEIGHTS_FILE])
    parts = split_graph(graph, part_bytes=len(weights) // 3)
    assert parts is not None
    load = onnx_runner.StagedLoad(parts, len(weights), lambda: onnx_runner.session_options(threads=1), "test")
    load(memoryview(weights[: parts[0].ready_at]))
    assert len(load.sessions) == 1
    with pytest.raises(IntegrityError, match="ended after"):
        load.finish()
    load.restart()
    assert load.sessions == [] and load.offset == 0
    with pytest.raises(IntegrityError, match="larger than recorded"):
        load(memoryview(weights + b"x" * 64))
    assert split_graph(b"not a graph", part_bytes=1) is None
    assert split_graph(graph, part_bytes=len(weights) * 2) is None  # one part: nothing to cut


def test_a_chain_of_parts_asks_its_shared_arena_to_shrink_once_per_run() -> None:
    """The runner's options (arena shrinkage) go to the last part alone: shrinking after every part
    freed what the next part took again (three times the page faults on bert-large)."""

    class Part:
        def __init__(self, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
            self.inputs, self.outputs = inputs, outputs

    class Session:
        def __init__(self, add: int) -> None:
            self.add = add
            self.options: list[Any] = []

        def run(self, names: list[str], feeds: dict[str, Any], options: Any = None) -> list[Any]:
            self.options.append(options)
            return [sum(feeds.values()) + self.add for _ in names]

    parts = [Part(("x",), ("h1",)), Part(("h1",), ("h2",)), Part(("h2", "x"), ("start_logits", "end_logits"))]
    sessions = [Session(1), Session(10), Session(100)]
    chain = onnx_runner.SessionChain(parts, sessions)  # type: ignore[arg-type]
    assert [a.name for a in chain.get_inputs()] == ["x"]
    shrink = object()
    assert chain.run(["start_logits", "end_logits"], {"x": 1}, shrink) == [113, 113]
    assert [s.options for s in sessions] == [[None], [None], [shrink]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_DONTNEED) as Linux does it")
def test_the_pages_a_staged_load_hands_back_are_freed_not_only_unmapped() -> None:
    """A private mapping's released pages read as zeros (freed). A shared one (mmap's default) keeps
    them (shmem still charged to the cgroup while RSS drops): a staged bert-large load was killed at
    the 2 GB limit that way with 1,484 MiB peak RSS."""
    from shared.memory import release_pages

    load = onnx_runner.StagedLoad([], 1 << 20, lambda: None, "test")
    load.buffer[:] = b"\x01" * (1 << 20)
    assert release_pages(load.buffer, 0, 1 << 20) == 1 << 20
    assert load.buffer[:] == bytes(1 << 20)


# --- int8 ---------------------------------------------------------------------------------------


def _key(answers: list[Answer]) -> list[tuple[str, int, int]]:
    return [(a.answer, a.start, a.end) for a in answers]


@pytest.mark.parametrize("model", ["bert", "roberta"])
def test_int8_answers_do_not_depend_on_the_batch(model: str) -> None:
    alone_engine = engine(model, "int8", batch_windows=1)
    batched_engine = engine(model, "int8", batch_windows=8)
    items = [item(r) for r in records(model)]
    alone = [alone_engine.answer([one])[0] for one in items]
    for size in (3, 16):
        for first in range(0, len(items), size):
            batched = batched_engine.answer(items[first : first + size])
            for offset, got in enumerate(batched):
                want = alone[first + offset]
                assert _key(got) == _key(want), f"{model} #{first + offset} in a batch of {size}"
                for a, b in zip(got, want, strict=True):
                    assert a.score == pytest.approx(b.score, abs=1e-5)


@pytest.mark.parametrize("model", ["bert", "distilbert", "roberta"])
def test_int8_stays_close_to_fp32(model: str) -> None:
    fp32, int8 = engine(model, "fp32"), engine(model, "int8")
    items = [item(r) for r in records(model)]
    got, want = int8.answer(items), fp32.answer(items)
    same = sum(_key(g[:1]) == _key(w[:1]) for g, w in zip(got, want, strict=True))
    assert same >= 0.9 * len(items), f"{same} of {len(items)} top answers unchanged"
    drift = max(abs(g[0].score - w[0].score) for g, w in zip(got, want, strict=True) if g and w)
    assert drift < 0.02
    assert int8.quantize == "int8" and fp32.quantize == "none"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_builds_and_answers(recipe: str) -> None:
    qa = engine("bert", "int8", recipe=recipe)
    (best,) = qa.answer([QAItem("who won?", CONTEXT)])[0]
    assert CONTEXT[best.start : best.end] == best.answer


# ONNX Runtime's AVX2 u8 x s8 kernel (vpmaddubsw, CPUs without VNNI) adds two products in int16 and
# saturates past 32,767: uint8 activations times weights within +-63 fit (2 x 255 x 63 = 32,130),
# weights reaching +-127 do not (2 x 255 x 127 = 64,770)
INT16_MAX = 32767


def _largest_pair_sum(built: OnnxArtifact) -> int:
    """The largest |sum of two u8 x s8 products| any MatMulIntegerToFloat of ``built`` can form."""
    graph = onnx.load_from_string(bytes(built.files[MODEL_FILE]))
    views = initializer_views(graph, built.files[WEIGHTS_FILE])
    largest = 0
    for node in (n for n in graph.graph.node if n.op_type == "MatMulIntegerToFloat"):
        activation_zero, weight, weight_zero = views[node.input[4]], views[node.input[1]], views[node.input[5]]
        # the kernel the bound is about: uint8 activations, int8 weights, symmetric (zero point 0)
        assert activation_zero.dtype == np.uint8 and weight.dtype == np.int8 and not weight_zero.any()
        largest = max(largest, 2 * 255 * int(np.abs(weight.astype(np.int32)).max()))
    assert largest > 0
    return largest


def test_the_default_int8_recipe_cannot_saturate_avx2_pair_sums() -> None:
    """The default recipe's answers are the same on AVX-512/VNNI and AVX2-only CPUs: no pair of
    products of any quantized MatMul can leave int16, whatever the activations are."""
    built = artifact("bert", "int8")
    assert built.record["recipe"] == DEFAULT_RECIPE and built.record["recipe_details"]["reduce_range"]
    assert _largest_pair_sum(built) <= INT16_MAX


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_only_reduce_range_recipes_keep_pair_sums_within_int16(recipe: str) -> None:
    assert (_largest_pair_sum(artifact("bert", "int8", recipe)) <= INT16_MAX) is RECIPES[recipe].reduce_range


# --- serving without torch ----------------------------------------------------------------------

_NO_TORCH_CHILD = """
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
from shared.engine.onnx_runner import onnx_engine
from shared.engine.question_answering import QAItem
files = {name: bytearray((folder / name).read_bytes()) for name in ("model.onnx", "weights.bin")}
tokenizer = {"tokenizer.json": (folder / "tokenizer.json").read_bytes()}
record = json.loads((folder / "artifact.json").read_text())
engine = onnx_engine(files, record, tokenizer, threads=1, prepack=sys.argv[4] == "repacked")
answers = engine.answer([QAItem(sys.argv[2], sys.argv[3], top_k=2)])[0]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript"))
print(json.dumps({"answers": [a.to_dict() for a in answers], "heavy": heavy, "cleared": [len(v) for v in files.values()]}))
"""


@pytest.mark.parametrize("way", ["repacked", "shared"])
@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_serving_imports_neither_torch_nor_transformers(variant: str, way: str, tmp_path: Path) -> None:
    built = artifact("roberta", variant)
    for name, data in built.files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "artifact.json").write_text(json.dumps(built.record))
    (tmp_path / "tokenizer.json").write_bytes((MODELS / "roberta" / "tokenizer.json").read_bytes())
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_CHILD, str(tmp_path), "who won?", CONTEXT, way],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    child = json.loads(proc.stdout.splitlines()[-1])
    assert child["heavy"] == []
    if way == "repacked":
        assert child["cleared"] == [0, 0]  # the download buffers were released after the load
    else:
        assert child["cleared"][1] == len(built.files[WEIGHTS_FILE])  # weights.bin is the session's weights
    here = engine("roberta", variant).answer([QAItem("who won?", CONTEXT, top_k=2)])[0]
    assert [(a["answer"], a["start"]) for a in child["answers"]] == [(a.answer, a.start) for a in here]
    assert [a["score"] for a in child["answers"]] == pytest.approx([a.score for a in here], abs=1e-6)


# --- refusals -----------------------------------------------------------------------------------


def test_a_folder_without_safetensors_or_tokenizer_json_is_refused(tmp_path: Path) -> None:
    source = MODELS / "bert"
    for name in ("config.json", "tokenizer_config.json", "vocab.txt"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeModelError, match="safetensors"):
        build_onnx(tmp_path, "fp32")
    (tmp_path / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    with pytest.raises(UnsafeModelError, match=r"tokenizer\.json"):
        build_onnx(tmp_path, "fp32")


def test_damaged_graph_or_record_is_refused() -> None:
    built = artifact("bert", "fp32")
    tokenizer = tokenizer_files("bert")
    damaged = bytearray(built.files[MODEL_FILE])
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = b"\xff" * 64
    with pytest.raises(IntegrityError):
        onnx_engine({MODEL_FILE: damaged, WEIGHTS_FILE: bytearray(built.files[WEIGHTS_FILE])}, built.record, tokenizer)
    with pytest.raises(IntegrityError, match="lacks weights.bin"):
        onnx_engine({MODEL_FILE: bytearray(built.files[MODEL_FILE])}, built.record, tokenizer)
    with pytest.raises(IntegrityError):
        onnx_engine({MODEL_FILE: bytearray(built.files[MODEL_FILE]), WEIGHTS_FILE: bytearray(16)}, built.record, tokenizer)
    wrong_inputs = {**built.record, "input_names": ["input_ids", "attention_mask"]}
    with pytest.raises(IntegrityError, match="inputs"):
        onnx_engine({k: bytearray(v) for k, v in built.files.items()}, wrong_inputs, tokenizer)
    incomplete = {k: v for k, v in built.record.items() if k != "max_seq_len"}
    with pytest.raises(IntegrityError, match="record"):
        onnx_engine({k: bytearray(v) for k, v in built.files.items()}, incomplete, tokenizer)
    with pytest.raises(UnsafeModelError, match="format"):
        onnx_engine({k: bytearray(v) for k, v in built.files.items()}, {**built.record, "format": 99}, tokenizer)
    with pytest.raises(UnsafeModelError, match=r"tokenizer\.json"):
        onnx_engine({k: bytearray(v) for k, v in built.files.items()}, built.record, {"vocab.txt": bytearray(b"x")})


def test_the_engine_reads_its_weights_from_weights_bin() -> None:
    """Scaled weights give other scores: the weights come from weights.bin, not from the graph (the
    store's sha256 check, not the engine, is what refuses damaged bytes)."""
    built = artifact("bert", "fp32")
    weights = bytearray(built.files[WEIGHTS_FILE])
    graph = onnx.load_from_string(bytes(built.files[MODEL_FILE]))
    external = {t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for name, view in initializer_views(graph, weights).items():
        if name in external and view.dtype == np.float32:
            view *= -3.0
    del view
    flipped = onnx_engine({MODEL_FILE: bytearray(built.files[MODEL_FILE]), WEIGHTS_FILE: weights}, built.record, tokenizer_files("bert"))
    item_ = QAItem("who won?", CONTEXT, top_k=3)
    assert [a.score for a in flipped.answer([item_])[0]] != [a.score for a in engine("bert", "fp32").answer([item_])[0]]


# --- threads ------------------------------------------------------------------------------------


def test_threads_come_from_the_setting_or_the_cpu_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(onnx_runner, "_CGROUP_CPU_MAX", cpu_max)
    assert default_threads(3, 2) == 3
    cpu_max.write_text("400000 100000\n")
    assert default_threads(None, 2) == 2
    assert default_threads(None, 1) == 4
    assert default_threads(None, 8) == 1
    cpu_max.write_text("150000 100000\n")
    assert onnx_runner.cpu_quota() == 1
    cpu_max.write_text("max 100000\n")
    assert onnx_runner.cpu_quota() == len(__import__("os").sched_getaffinity(0))
    cpu_max.unlink()
    assert onnx_runner.cpu_quota() >= 1
