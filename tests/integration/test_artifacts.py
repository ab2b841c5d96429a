"""ONNX serving artifacts in the store: built by the refresh before the pointer moves, loaded first
by the holder, refused when a byte of them changes (with the fallback taken), listed in status."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.engine.question_answering import QAEngine, QAItem
from shared.engine.torch_model import engine_from_dir
from shared.errors import IntegrityError, NotFoundError, ValidationFailedError
from shared.loading.onnx_artifacts import (
    ARTIFACT_RECORD,
    ArtifactRecord,
    artifact_blob,
    list_artifacts,
    load_artifact,
    read_record,
    recorded_variants,
)
from shared.loading.onnx_artifacts import status as artifacts_status
from shared.refresh.artifact_builds import build_artifacts
from shared.refresh.isolation import LocalDirSource, isolate
from shared.refresh.worker import artifact_builder
from shared.serving import api
from shared.serving.holder import ModelHolder
from shared.settings import Settings
from shared.store.model_store import ModelStore
from tests.conftest import ROOT
from tests.fixtures.cli_runs import run_cli

pytestmark = pytest.mark.integration
CONTEXT = "Super Bowl 50 was played in 2016 in San Francisco. The Denver Broncos won the game against Carolina."
QUESTIONS = [QAItem("Who won the game?", CONTEXT), QAItem("Where was it played?", CONTEXT, top_k=3), QAItem("When?", CONTEXT * 20)]
CANARY = {"question": "Who won the game?", "context": CONTEXT}


@pytest.fixture
def env(azurite: str, container_name: str) -> dict[str, str]:
    return {
        "MODEL_STORAGE": azurite,
        "MODEL_CONTAINER": container_name,
        "MODEL_ID": "tests/tiny-bert",
        "MODEL_CANARY": json.dumps(CANARY),
        "MODEL_BLOCK_SIZE_MB": "1",
        "QA_DEADLINE_SECONDS": "30",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def store(settings: Settings) -> Iterator[ModelStore]:
    model_store = ModelStore.from_settings(settings)
    model_store.ensure_container()
    yield model_store
    model_store.container.delete_container()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, azurite: str) -> Iterator[tuple[ModelStore, str, dict[str, str]]]:
    """One tiny BERT isolated with both artifacts, shared by the read-only tests of this module."""
    from tests.fixtures.tiny_models import build_bert

    folder = build_bert(tmp_path_factory.mktemp("artifact-bert"))
    env = {
        "MODEL_STORAGE": azurite,
        "MODEL_CONTAINER": f"artifacts-{uuid.uuid4().hex[:12]}",
        "MODEL_ID": "tests/tiny-bert",
        "MODEL_CANARY": json.dumps(CANARY),
    }
    settings = Settings.from_env(env)
    store = ModelStore.from_settings(settings)
    store.ensure_container()
    result = isolate(store, LocalDirSource(folder), explicit=True, keep_versions=3, build=artifact_builder(settings))
    assert result.revision is not None
    yield store, result.revision, {**result.artifacts, "folder": str(folder)}
    store.container.delete_container()


def spans(answers: list[list[Any]]) -> list[list[tuple[str, int, int]]]:
    return [[(a.answer, a.start, a.end) for a in item] for item in answers]


def test_the_refresh_builds_both_artifacts_apart_from_the_files(built: tuple[ModelStore, str, dict[str, str]]) -> None:
    store, revision, outcomes = built
    assert (outcomes["fp32"], outcomes["int8"]) == ("built", "built")
    manifest = store.require_manifest(revision)
    [version] = store.list_versions()
    assert version.files == len(manifest.files) and version.bytes == manifest.total_bytes  # artifacts not counted as files
    assert recorded_variants(version) == ("fp32", "int8")
    listed = list_artifacts(store, manifest)
    assert set(listed) == {"fp32", "int8"} and all(a.usable and a.state == "ok" and a.size > 0 for a in listed.values())
    assert listed["int8"].size < listed["fp32"].size
    status = artifacts_status(store)
    assert status.versions[0].artifacts == listed
    record, _ = read_record(store, manifest, "int8") or (None, None)
    assert record is not None and record.source_files == {f.name: f.sha256 for f in manifest.files}
    assert record.engine["variant"] == "int8" and record.engine["max_seq_len"] == 384
    # building again is a no-op per variant
    assert build_artifacts(store, manifest, Settings.from_env({"MODEL_ARTIFACTS": "fp32,int8"})) == {"fp32": "exists", "int8": "exists"}


def test_fp32_artifact_answers_as_the_torch_engine(built: tuple[ModelStore, str, dict[str, str]]) -> None:
    store, revision, outcomes = built
    manifest = store.require_manifest(revision)
    loaded = load_artifact(store, manifest, "fp32", Settings.from_env({}))
    assert (loaded.backend, loaded.variant, loaded.revision) == ("onnx", "fp32", revision)
    reference = engine_from_dir(outcomes["folder"])
    got, want = loaded.engine.answer(QUESTIONS), reference.answer(QUESTIONS)
    assert spans(got) == spans(want)
    for g, w in zip(got, want, strict=True):
        assert [a.score for a in g] == pytest.approx([a.score for a in w], abs=1e-5)
    int8 = load_artifact(store, manifest, "int8", Settings.from_env({}))
    assert int8.variant == "int8" and all(a for a in int8.engine.answer(QUESTIONS))


def _staged_when_bounded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A tiny model's weights always fit twice: make QA_MEMORY_MB choose the load part by part
    (three parts) as it does for bert-large on a 2 GB instance; the list gets each load's part count."""
    from shared.engine import onnx_runner
    from shared.engine.onnx_parts import split_graph

    counts: list[int] = []

    def three_parts(graph: bytes, weights_bytes: int, memory_mb: int | None) -> Any:
        parts = split_graph(graph, part_bytes=weights_bytes // 3) if memory_mb is not None else None
        counts.append(len(parts or ()))
        return parts

    monkeypatch.setattr(onnx_runner, "prepack_fits", lambda _weights, memory_mb: memory_mb is None)
    monkeypatch.setattr(onnx_runner, "staged_parts", three_parts)
    return counts


def test_fp32_artifact_loaded_part_by_part_answers_as_the_whole(
    built: tuple[ModelStore, str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, revision, _ = built
    manifest = store.require_manifest(revision)
    whole = load_artifact(store, manifest, "fp32", Settings.from_env({}))
    counts = _staged_when_bounded(monkeypatch)
    staged = load_artifact(store, manifest, "fp32", Settings.from_env({"QA_MEMORY_MB": "1776"}))
    assert counts and counts[-1] >= 2
    got, want = staged.engine.answer(QUESTIONS), whole.engine.answer(QUESTIONS)
    assert [[(a.answer, a.start, a.end, a.score) for a in g] for g in got] == [
        [(a.answer, a.start, a.end, a.score) for a in w] for w in want
    ]


def test_a_flipped_byte_of_weights_bin_is_refused_by_the_load_part_by_part(
    store: ModelStore, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_fp32 = Settings.from_env({"MODEL_ARTIFACTS": "fp32", "MODEL_CANARY": json.dumps(CANARY)})
    result = isolate(store, LocalDirSource(tiny_bert_dir), explicit=True, keep_versions=3, build=artifact_builder(only_fp32))
    assert result.artifacts == {"fp32": "built"} and result.revision is not None
    flip_byte(store, result.revision, "fp32", "weights.bin", at=-20)
    counts = _staged_when_bounded(monkeypatch)
    with pytest.raises(IntegrityError, match="weights.bin"):
        load_artifact(store, store.require_manifest(result.revision), "fp32", Settings.from_env({"QA_MEMORY_MB": "1776"}))
    assert counts and counts[-1] >= 2  # the parts were being built when the sha256 refused the bytes
    assert list_artifacts(store, store.require_manifest(result.revision))["fp32"].usable is False


def test_a_build_bounded_by_qa_memory_mb_streams_the_fp32_weights_and_makes_the_same_artifacts(
    built: tuple[ModelStore, str, dict[str, str]], store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where QA_MEMORY_MB leaves no room for the fp32 weights twice (a 2 GB instance), the fp32
    canary runs part by part as the weights stream in, the int8 calibration too, and quantization
    reads them as they stream: never the whole file in memory. The artifacts are byte for byte
    those of a build with memory to spare, and weights.bin, staged tensor by tensor in the order
    the checkpoint streams them, is the one a build in memory writes."""
    from shared.engine import onnx_runner
    from shared.refresh import int8
    from shared.refresh.onnx_export import build_onnx

    reference_store, revision, outcomes = built
    monkeypatch.setattr(onnx_runner, "prepack_fits", lambda _weights, memory_mb: memory_mb is None)
    monkeypatch.setattr(onnx_runner, "_MIN_PART_BYTES", 1024)  # a tiny model's eighths
    runs: list[int] = []
    finish_run, finish_stream = onnx_runner.PartwiseRun.finish_run, int8.StreamedWeights.finish
    monkeypatch.setattr(onnx_runner.PartwiseRun, "finish_run", lambda self: runs.append(len(self.parts)) or finish_run(self))
    streamed: list[int] = []
    monkeypatch.setattr(int8.StreamedWeights, "finish", lambda self: streamed.append(self.size) or finish_stream(self))
    bounded = Settings.from_env({"MODEL_CANARY": json.dumps(CANARY), "QA_MEMORY_MB": "1776"})
    result = isolate(store, LocalDirSource(Path(outcomes["folder"])), explicit=True, keep_versions=3, build=artifact_builder(bounded))
    assert result.revision == revision and result.artifacts == {"fp32": "built", "int8": "built"}
    assert len(runs) >= 2 and min(runs) >= 3  # the fp32 canary and the calibration, each in parts
    assert len(streamed) == 1  # the quantization read the fp32 weights as they streamed
    for variant in ("fp32", "int8"):
        mine, _ = read_record(store, store.require_manifest(revision), variant) or (None, None)
        theirs, _ = read_record(reference_store, reference_store.require_manifest(revision), variant) or (None, None)
        assert mine is not None and theirs is not None and mine.usable
        assert [(f.name, f.size, f.sha256) for f in mine.files] == [(f.name, f.size, f.sha256) for f in theirs.files]
    in_memory = build_onnx(Path(outcomes["folder"]), "fp32")
    fp32, _ = read_record(store, store.require_manifest(revision), "fp32") or (None, None)
    assert fp32 is not None
    stored = {f.name: f.sha256 for f in fp32.files}
    assert stored["weights.bin"] == hashlib.sha256(in_memory.files["weights.bin"]).hexdigest()


def test_a_bounded_int8_build_over_damaged_fp32_weights_exports_them_again(
    built: tuple[ModelStore, str, dict[str, str]], store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flipped byte of the stored fp32 weights.bin is found at the end of the streamed read: the
    int8 build uses nothing it computed from them and builds from a new fp32 export instead."""
    from shared.engine import onnx_runner

    reference_store, revision, outcomes = built
    monkeypatch.setattr(onnx_runner, "prepack_fits", lambda _weights, memory_mb: memory_mb is None)
    monkeypatch.setattr(onnx_runner, "_MIN_PART_BYTES", 1024)
    only_fp32 = Settings.from_env({"MODEL_ARTIFACTS": "fp32", "MODEL_CANARY": json.dumps(CANARY), "QA_MEMORY_MB": "1776"})
    result = isolate(store, LocalDirSource(Path(outcomes["folder"])), explicit=True, keep_versions=3, build=artifact_builder(only_fp32))
    assert result.artifacts == {"fp32": "built"}
    flip_byte(store, revision, "fp32", "weights.bin", at=-20)
    both = Settings.from_env({"MODEL_ARTIFACTS": "fp32,int8", "QA_MEMORY_MB": "1776"})
    assert build_artifacts(store, store.require_manifest(revision), both) == {"fp32": "exists", "int8": "built"}
    mine, _ = read_record(store, store.require_manifest(revision), "int8") or (None, None)
    theirs, _ = read_record(reference_store, reference_store.require_manifest(revision), "int8") or (None, None)
    assert mine is not None and theirs is not None
    assert [(f.name, f.sha256) for f in mine.files] == [(f.name, f.sha256) for f in theirs.files]


def test_serving_loads_onnx_first_and_torch_on_request(built: tuple[ModelStore, str, dict[str, str]], azurite: str) -> None:
    store, revision, _ = built
    base = {"MODEL_STORAGE": azurite, "MODEL_CONTAINER": store.container.container_name, "MODEL_ID": "tests/tiny-bert"}
    for extra, expected in [
        ({}, ("onnx", "fp32")),
        ({"QA_QUANTIZE": "int8"}, ("onnx", "int8")),
        ({"QA_BACKEND": "torch"}, ("torch", "fp32")),
    ]:
        holder = ModelHolder(lambda extra=extra: Settings.from_env({**base, **extra}), artifact_loader=load_artifact)
        try:
            response = api.ask(holder, json.dumps({"question": "Who won the game?", "context": CONTEXT}).encode())
            assert response.status == 200
            assert (response.body["backend"], response.body["variant"], response.body["revision"]) == (*expected, revision)
            described = holder.describe()
            assert described["fallbacks"] == [] and described["degraded"] is False
            assert holder.health()["backend"] == expected[0]
        finally:
            holder.close()


def flip_byte(store: ModelStore, revision: str, variant: str, name: str, at: int) -> None:
    """Change one byte of an artifact blob, keeping its metadata (the sha256 written with it)."""
    blob = artifact_blob(store, revision, variant, name)
    props = blob.get_blob_properties()
    data = bytearray(blob.download_blob().readall())
    data[at % len(data)] ^= 0x01
    blob.upload_blob(bytes(data), overwrite=True, metadata=props.metadata)


@pytest.mark.parametrize("name", ["weights.bin", "model.onnx", ARTIFACT_RECORD])
def test_a_flipped_byte_is_refused_and_serving_falls_back(store: ModelStore, settings: Settings, tiny_bert_dir: Path, name: str) -> None:
    only_fp32 = Settings.from_env({"MODEL_ARTIFACTS": "fp32", "MODEL_CANARY": json.dumps(CANARY)})
    result = isolate(store, LocalDirSource(tiny_bert_dir), explicit=True, keep_versions=3, build=artifact_builder(only_fp32))
    assert result.artifacts == {"fp32": "built"} and result.revision is not None
    revision = result.revision
    flip_byte(store, revision, "fp32", name, at=-20 if name != ARTIFACT_RECORD else 40)
    with pytest.raises(IntegrityError):
        load_artifact(store, store.require_manifest(revision), "fp32", settings)
    assert list_artifacts(store, store.require_manifest(revision))["fp32"].usable is False or name != ARTIFACT_RECORD
    holder = ModelHolder(lambda: settings, artifact_loader=load_artifact)
    try:
        response = api.ask(holder, json.dumps({"question": "Who won the game?", "context": CONTEXT}).encode())
        assert response.status == 200 and (response.body["backend"], response.body["revision"]) == ("torch", revision)
        described = holder.describe()
        [fallback] = described["fallbacks"]
        assert (fallback["backend"], fallback["revision"], fallback["code"]) == ("onnx", revision, "integrity_error")
        assert described["degraded"] is True and holder.health()["degraded"] is True
    finally:
        holder.close()


def test_a_version_without_an_expected_artifact_is_served_by_torch_and_degraded(
    store: ModelStore, env: dict[str, str], tiny_bert_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    result = isolate(store, LocalDirSource(tiny_bert_dir), explicit=True, keep_versions=3)  # no builder: an older version
    assert result.artifacts == {}
    expects = Settings.from_env(env)  # MODEL_ARTIFACTS defaults to fp32,int8: an fp32 artifact is expected
    holder = ModelHolder(lambda: expects, artifact_loader=load_artifact)
    try:
        response = api.ask(holder, json.dumps({"question": "Who won the game?", "context": CONTEXT}).encode())
        assert response.status == 200 and response.body["backend"] == "torch"
        [fallback] = holder.describe()["fallbacks"]
        assert fallback["code"] == "not_found" and "build-artifacts" in fallback["message"]
        assert holder.health()["degraded"] is True
        [problem] = holder.describe()["problems"]
        assert problem["cause"] == "artifact" and "missing" in problem["problem"]
        assert problem["repair"] == f"python -m shared build-artifacts --revision {result.revision}"
    finally:
        holder.close()
    assert any("event=model_load" in r.getMessage() and "outcome=failed" in r.getMessage() for r in caplog.records)


def test_an_artifact_no_setting_asks_for_is_neither_a_problem_nor_a_failed_load(
    store: ModelStore, env: dict[str, str], tiny_bert_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shared")
    isolate(store, LocalDirSource(tiny_bert_dir), explicit=True, keep_versions=3)
    none = Settings.from_env({**env, "MODEL_ARTIFACTS": "none"})
    holder = ModelHolder(lambda: none, artifact_loader=load_artifact)
    try:
        response = api.ask(holder, json.dumps({"question": "Who won the game?", "context": CONTEXT}).encode())
        assert response.status == 200 and response.body["backend"] == "torch"
        assert holder.health()["degraded"] is False and holder.describe()["problems"] == []
    finally:
        holder.close()
    loads = [r.getMessage() for r in caplog.records if "event=model_load" in r.getMessage()]
    assert loads and all("outcome=ok" in line for line in loads), loads


def test_artifacts_exist_before_the_pointer_moves(store: ModelStore, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    only_int8 = Settings.from_env({"MODEL_ARTIFACTS": "int8", "MODEL_CANARY": json.dumps(CANARY)})
    seen: list[dict[str, Any]] = []
    publish = ModelStore.publish

    def checking_publish(self: ModelStore, manifest: Any, *, pinned: bool) -> Any:
        seen.append(list_artifacts(self, manifest))
        return publish(self, manifest, pinned=pinned)

    monkeypatch.setattr(ModelStore, "publish", checking_publish)
    result = isolate(store, LocalDirSource(tiny_bert_dir), explicit=True, keep_versions=3, build=artifact_builder(only_int8))
    assert result.outcome == "published" and result.artifacts == {"int8": "built"}
    assert [set(s) for s in seen] == [{"int8"}] and seen[0]["int8"].usable


def test_a_failed_canary_marks_the_artifact_unusable_not_the_version(store: ModelStore, tiny_bert_dir: Path) -> None:
    calls: list[str] = []

    def refuse(engine: QAEngine, manifest: Any) -> None:
        calls.append(engine.answer([QAItem(CANARY["question"], CANARY["context"])])[0][0].answer)
        raise ValidationFailedError("answered the canary with nonsense")

    result = isolate(store, LocalDirSource(tiny_bert_dir), explicit=True, keep_versions=3)
    assert result.revision is not None
    manifest = store.require_manifest(result.revision)
    outcomes = build_artifacts(store, manifest, Settings.from_env({"MODEL_ARTIFACTS": "fp32"}), canary=refuse)
    assert outcomes["fp32"].startswith("unusable: the canary failed") and len(calls) == 1
    assert list_artifacts(store, manifest)["fp32"].usable is False and list_artifacts(store, manifest)["fp32"].state == "unusable"
    with pytest.raises(NotFoundError, match="unusable"):
        load_artifact(store, manifest, "fp32", Settings.from_env({}))
    # recorded: the next build does not retry it (a new model version, or --rebuild, is the fix) and says so
    again = build_artifacts(store, manifest, Settings.from_env({"MODEL_ARTIFACTS": "fp32"}), canary=refuse)
    assert again["fp32"].startswith("unusable: the canary failed") and "--rebuild" in again["fp32"]
    assert len(calls) == 1


def test_a_record_for_other_files_is_refused(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    from tests.fixtures.tiny_models import build_bert

    first = isolate(store, LocalDirSource(tiny_bert_dir), explicit=True, keep_versions=3, build=artifact_builder(
        Settings.from_env({"MODEL_ARTIFACTS": "fp32", "MODEL_CANARY": json.dumps(CANARY)})))  # fmt: skip
    second = isolate(store, LocalDirSource(build_bert(tmp_path / "other", seed=7)), explicit=True, keep_versions=3)
    assert first.revision and second.revision
    for name in ("model.onnx", "weights.bin", ARTIFACT_RECORD):  # copy the first version's artifact under the second
        source = artifact_blob(store, first.revision, "fp32", name)
        props = source.get_blob_properties()
        artifact_blob(store, second.revision, "fp32", name).upload_blob(source.download_blob().readall(), metadata=props.metadata)
    with pytest.raises(IntegrityError, match="other files"):
        load_artifact(store, store.require_manifest(second.revision), "fp32", Settings.from_env({}))


def test_build_artifacts_command_for_an_existing_version(store: ModelStore, env: dict[str, str], tiny_bert_dir: Path) -> None:
    result = isolate(store, LocalDirSource(tiny_bert_dir), explicit=True, keep_versions=3)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shared", *args], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip

    done = cli("build-artifacts", "--variant", "int8", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"revision": result.revision, "artifacts": {"int8": "built"}}
    status = cli("status")
    assert "onnx int8:" in status.stdout and "usable" in status.stdout
    again = cli("build-artifacts", "--variant", "int8")
    assert again.returncode == 0 and "int8: exists" in again.stdout
    wrong = cli("build-artifacts", "--revision", "0" * 40)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr and "not a complete version" in wrong.stderr
    bad = cli("build-artifacts", "--variant", "fp16")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_record_round_trip_and_refusals() -> None:
    from shared.store.model_files import FileEntry

    record = ArtifactRecord(
        variant="fp32", model_id="m", revision="r", usable=True,
        files=(FileEntry("model.onnx", 3, "a" * 64), FileEntry("weights.bin", 5, "b" * 64)),
        source_files={"config.json": "c" * 64}, engine={"opset": 18}, built_at="2026-11-28T00:00:00+00:00",
    )  # fmt: skip
    assert ArtifactRecord.from_json(record.to_json(), where="x") == record
    for broken in (
        b"{",
        b"[]",
        json.dumps({**json.loads(record.to_json()), "format": 2}).encode(),
        record.to_json().replace(b"weights.bin", b"other.bin"),
    ):
        with pytest.raises(IntegrityError):
            ArtifactRecord.from_json(broken, where="x")


# --- damaged artifacts: found, reported, rebuilt (issue "Every edge a new user hit") ------------


def cli(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    return run_cli(env, *args, inherit_env=False, timeout=600)


@pytest.fixture
def int8_env(env: dict[str, str]) -> dict[str, str]:
    """The settings the int8-only version was isolated with: only an int8 artifact is expected."""
    return {**env, "MODEL_ARTIFACTS": "int8"}


@pytest.fixture
def int8_version(store: ModelStore, tiny_bert_dir: Path) -> str:
    """A version of the tiny BERT with its int8 artifact only (one export per test)."""
    only_int8 = Settings.from_env({"MODEL_ARTIFACTS": "int8", "MODEL_CANARY": json.dumps(CANARY)})
    result = isolate(store, LocalDirSource(tiny_bert_dir), explicit=True, keep_versions=3, build=artifact_builder(only_int8))
    assert result.artifacts == {"int8": "built"} and result.revision is not None
    return result.revision


@pytest.mark.parametrize("name", ["model.onnx", ARTIFACT_RECORD])
def test_verify_reports_a_damaged_artifact_by_variant_and_blob(
    int8_env: dict[str, str], store: ModelStore, int8_version: str, name: str
) -> None:
    code, intact, _ = cli(int8_env, "verify")
    assert code == 0 and intact["ok"] is True and intact["artifacts"]["int8"]["state"] == "ok"
    flip_byte(store, int8_version, "int8", name, at=-20 if name != ARTIFACT_RECORD else 40)
    code, out, text = cli(int8_env, "verify")
    assert code == 1 and out["ok"] is False
    assert out["artifacts"]["int8"]["state"] == "damaged" and out["artifacts"]["int8"]["blob"] == name
    assert any("int8" in p and name in p for p in out["problems"]), out["problems"]
    assert "build-artifacts --rebuild" in out["repair"] and "build-artifacts --rebuild" in text
    assert out["artifacts"]["fp32"]["state"] == "missing"


@pytest.mark.parametrize("name", ["model.onnx", ARTIFACT_RECORD])
def test_build_artifacts_rebuild_replaces_a_damaged_artifact(
    int8_env: dict[str, str], store: ModelStore, int8_version: str, name: str
) -> None:
    flip_byte(store, int8_version, "int8", name, at=-20 if name != ARTIFACT_RECORD else 40)
    code, out, text = cli(int8_env, "build-artifacts", "--variant", "int8")
    assert code == 1 and out["artifacts"]["int8"].startswith("damaged") and "--rebuild" in text
    code, out, _ = cli(int8_env, "build-artifacts", "--variant", "int8", "--rebuild")
    assert code == 0 and out["artifacts"] == {"int8": "rebuilt"}
    code, verified, _ = cli(int8_env, "verify")
    assert code == 0 and verified["artifacts"]["int8"]["state"] == "ok"
    loaded = load_artifact(store, store.require_manifest(int8_version), "int8", Settings.from_env({}))
    assert loaded.variant == "int8" and loaded.engine.answer([QAItem("Who won the game?", CONTEXT)])[0]


def test_build_artifacts_rebuild_replaces_an_unusable_artifact(env: dict[str, str], store: ModelStore, tiny_bert_dir: Path) -> None:
    revision = isolate(store, LocalDirSource(tiny_bert_dir), explicit=True, keep_versions=3).revision
    wrong = {**env, "MODEL_CANARY": json.dumps({**CANARY, "answer": "nobody at all"})}
    code, out, _ = cli(wrong, "build-artifacts", "--variant", "int8")
    assert code == 1 and out["artifacts"]["int8"].startswith("unusable: the canary failed")
    code, out, _ = cli(env, "build-artifacts", "--variant", "int8")
    assert code == 1 and out["artifacts"]["int8"].startswith("unusable")  # recorded: not retried without --rebuild
    code, out, _ = cli(env, "build-artifacts", "--variant", "int8", "--rebuild")
    assert code == 0 and out == {"revision": revision, "artifacts": {"int8": "rebuilt"}}
    assert list_artifacts(store, store.require_manifest(str(revision)))["int8"].usable is True


def test_isolate_repair_rebuilds_a_damaged_artifact(
    int8_env: dict[str, str], store: ModelStore, int8_version: str, tiny_bert_dir: Path
) -> None:
    flip_byte(store, int8_version, "int8", "weights.bin", at=-20)
    isolate_again = ("isolate", "--from-dir", str(tiny_bert_dir), "--model-id", int8_env["MODEL_ID"])
    code, out, text = cli({**int8_env, "MODEL_ARTIFACTS": "int8"}, *isolate_again)
    assert code == 0 and out["outcome"] == "up_to_date"  # a plain isolate does not re-hash
    code, out, text = cli({**int8_env, "MODEL_ARTIFACTS": "int8"}, *isolate_again, "--repair")
    assert code == 0 and (out["outcome"], out["artifacts"], out["files_repaired"]) == ("repaired", {"int8": "rebuilt"}, [])
    assert "int8 rebuilt" in text
    code, verified, _ = cli(int8_env, "verify")
    assert code == 0 and verified["artifacts"]["int8"]["state"] == "ok"


def test_a_refresh_with_repair_rebuilds_a_damaged_artifact(env: dict[str, str], store: ModelStore, tiny_bert_dir: Path) -> None:
    from shared.refresh.worker import handle_message
    from shared.store.refresh_queue import RefreshRequest
    from tests.fixtures.fake_hub import FakeHubServer

    with FakeHubServer() as hub:
        commit = hub.hub.publish("tests/tiny-bert", tiny_bert_dir)
        settings = Settings.from_env({**env, "HF_ENDPOINT": hub.endpoint, "MODEL_ARTIFACTS": "int8"})
        first = handle_message(settings, RefreshRequest().to_bytes())
        assert first is not None and (first.outcome, first.artifacts) == ("published", {"int8": "built"})
        flip_byte(store, commit, "int8", "model.onnx", at=-20)
        repaired = handle_message(settings, RefreshRequest(repair=True, reason="http").to_bytes())
    assert repaired is not None and (repaired.outcome, repaired.artifacts) == ("repaired", {"int8": "rebuilt"})
    assert store.read_last_refresh()["outcome"] == "repaired"  # type: ignore[index]


def test_serving_marks_a_damaged_artifact_once_and_names_the_repair(
    int8_env: dict[str, str], store: ModelStore, int8_version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flip_byte(store, int8_version, "int8", "model.onnx", at=-20)
    settings = Settings.from_env({**int8_env, "QA_QUANTIZE": "int8", "MODEL_POLL_SECONDS": "0.2"})
    reads: list[str] = []
    read_file = ModelStore.read_file

    def counting(self: ModelStore, revision: str, entry: Any, **kwargs: Any) -> bytearray:
        if kwargs.get("blob") is not None:
            reads.append(entry.name)
        return read_file(self, revision, entry, **kwargs)

    monkeypatch.setattr(ModelStore, "read_file", counting)
    item = json.dumps({"question": "Who won the game?", "context": CONTEXT}).encode()
    holders = []
    for instance in range(2):  # a first instance finds the damage; a second one starts cold after it
        holder = ModelHolder(lambda: settings, artifact_loader=load_artifact)
        holders.append(holder)
        response = api.ask(holder, item)
        assert response.status == 200 and response.body["backend"] == "torch"
        described = holder.describe()
        assert described["degraded"] is True
        [fallback] = described["fallbacks"]
        assert (fallback["backend"], fallback["variant"], fallback["code"]) == ("onnx", "int8", "integrity_error")
        assert "damaged" in fallback["message"] and "build-artifacts --rebuild" in fallback["message"]
        assert reads == ["model.onnx"], (instance, reads)  # read once, by the first instance; the second never downloads it
    try:
        [version] = api.model_status(holders[1]).body["versions"]
        listed = version["artifacts"]["int8"]
        assert listed["usable"] is False and listed["state"] == "damaged"
        assert listed["reason"].startswith("model.onnx") and "build-artifacts --rebuild" in listed["reason"]
        proc = subprocess.run(
            [sys.executable, "-m", "shared", "status"], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **int8_env}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert "onnx int8:" in proc.stdout and "DAMAGED" in proc.stdout and "build-artifacts --rebuild" in proc.stdout, proc.stdout
        # repaired: a running instance notices the new record and serves the artifact again
        code, out, _ = cli(int8_env, "build-artifacts", "--variant", "int8", "--rebuild")
        assert code == 0 and out["artifacts"] == {"int8": "rebuilt"}
        for _ in range(600):  # bounded only so that a broken build cannot hang CI
            if holders[0].health().get("backend") == "onnx":
                break
            time.sleep(0.1)
        assert holders[0].health() | {"load_seconds": 0} == {
            "state": "ready", "degraded": False, "model_id": "tests/tiny-bert", "revision": int8_version, "load_seconds": 0,
            "backend": "onnx", "variant": "int8",
        }  # fmt: skip
        assert holders[0].describe()["fallbacks"] == []
    finally:
        for holder in holders:
            holder.close()
