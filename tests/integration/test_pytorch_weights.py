"""Models that ship only ``pytorch_model.bin`` (or its shards), isolated into Azurite from a folder
and from the fake Hub: converted to safetensors with torch's restricted unpickler, recorded in the
manifest, answering as the transformers 4.57.6 pipeline did through torch and ONNX; a pickle that
would run code is refused with nothing published."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared.engine.torch_model import engine_from_files
from shared.errors import UnsafeModelError
from shared.loading.onnx_artifacts import load_artifact
from shared.refresh.isolation import LocalDirSource, isolate
from shared.refresh.worker import artifact_builder, canary_validator, run_refresh
from shared.settings import Settings
from shared.store.model_store import ModelStore
from shared.store.refresh_queue import RefreshRequest
from tests.fixtures.cli_runs import run_cli
from tests.fixtures.fake_hub import FakeHubServer
from tests.fixtures.tiny_models import save_the_old_way
from tests.unit.test_question_answering_golden import RECORDS, ROOMY, assert_same, item
from tests.unit.test_weights_conversion import MarkerWhenUnpickled

pytestmark = pytest.mark.integration
MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
FAMILIES = ["bert", "bert-squad2", "distilbert", "roberta", "xlm-roberta", "deberta-v3", "electra", "albert", "mobilebert"]
ONNX_FAMILIES = ("bert", "xlm-roberta", "deberta-v3")  # WordPiece with token types; SentencePiece; a derived tokenizer.json
# the golden records need more room than the serving defaults give (long questions, many windows)
ROOMY_ENV = {"QA_MAX_QUESTION_TOKENS": "512", "QA_MAX_WINDOWS": "1000", "QA_MAX_ITEMS": "1000", "QA_MAX_CONTEXT_CHARS": "100000"}


def settings_for(azurite: str, container: str, **extra: str) -> Settings:
    return Settings.from_env({"MODEL_STORAGE": azurite, "MODEL_CONTAINER": container, "MODEL_ID": "tests/old-way", **ROOMY_ENV, **extra})


@pytest.fixture
def settings(azurite: str, container_name: str) -> Settings:
    return settings_for(azurite, container_name, MODEL_ARTIFACTS="fp32")


@pytest.fixture
def old_store(settings: Settings) -> Iterator[ModelStore]:
    store = ModelStore.from_settings(settings)
    store.block_size = 64 * 1024
    store.ensure_container()
    yield store
    store.container.delete_container()


def sample(family: str) -> list[dict[str, object]]:
    """A quarter of the family's golden records (short ones, unicode, options) and a multi-window one:
    the converted tensors are the same bytes (tests/unit/test_weights_conversion.py), so this checks
    that the version serves them, not the engine again (tests/unit/test_question_answering_golden.py)."""
    records = [r for r in RECORDS if r["model"] == family]
    return [*[r for r in records if len(str(r["context"])) < 2000][::4], next(r for r in records if len(str(r["context"])) > 4000)]


def stored_answers(store: ModelStore, revision: str, family: str) -> None:
    """The stored version answers golden questions of ``family`` as the pipeline did (torch)."""
    manifest = store.require_manifest(revision)
    files = {entry.name: store.read_file(revision, entry) for entry in manifest.files}
    qa = engine_from_files(files, limits=ROOMY)
    for index, record in enumerate(sample(family)):
        assert_same(qa.answer([item(record)])[0], record["answers"], f"{family} #{index} (torch)")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bin_only_model_of_each_family_is_converted_and_answers_as_the_pipeline(
    old_store: ModelStore, settings: Settings, tmp_path: Path, family: str
) -> None:
    folder = save_the_old_way(MODELS / family, tmp_path / family)
    build = artifact_builder(settings) if family in ONNX_FAMILIES else None
    result = isolate(old_store, LocalDirSource(folder), explicit=True, keep_versions=5, validate=canary_validator(settings), build=build)
    assert result.outcome == "published" and result.revision is not None
    manifest = old_store.require_manifest(result.revision)
    names = {entry.name for entry in manifest.files}
    assert "model.safetensors" in names and not any(name.endswith(".bin") for name in names)  # never a pickle in a version
    bin_sha256 = hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    assert manifest.derived["model.safetensors"]["from_sha256"] == {"pytorch_model.bin": bin_sha256}
    assert old_store.verify_version(result.revision) == []
    stored_answers(old_store, result.revision, family)
    if family in ONNX_FAMILIES:
        assert result.artifacts == {"fp32": "built"}
        onnx = load_artifact(old_store, manifest, "fp32", settings).engine
        for index, record in enumerate(sample(family)):
            assert_same(onnx.answer([item(record)])[0], record["answers"], f"{family} #{index} (onnx)")
    again = isolate(old_store, LocalDirSource(folder), explicit=True, keep_versions=5)
    assert again.outcome == "up_to_date" and again.bytes_moved == 0  # named by the .bin's hash: nothing converted again


def test_a_sharded_bin_from_the_hub_is_converted_and_repaired(azurite: str, container_name: str, tmp_path: Path) -> None:
    folder = save_the_old_way(MODELS / "roberta", tmp_path / "roberta", shards=2)
    with FakeHubServer() as hub:
        commit = hub.hub.publish("old/roberta-squad", folder)
        settings = settings_for(azurite, container_name, MODEL_ID="old/roberta-squad", HF_ENDPOINT=hub.endpoint, MODEL_ARTIFACTS="none")
        store = ModelStore.from_settings(settings)
        try:
            result = run_refresh(settings, RefreshRequest())
            assert (result.outcome, result.revision, result.source) == ("published", commit, hub.endpoint)
            manifest = store.require_manifest(commit)
            assert sorted(n for n in (e.name for e in manifest.files) if n.startswith("model")) == [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
            ]
            shard = manifest.derived["model-00001-of-00002.safetensors"]
            published = hub.hub.resolve("old/roberta-squad", "main")
            assert published is not None
            lfs = {name: f.sha256 for name, f in published.files.items()}
            assert shard["from"] == ["pytorch_model-00001-of-00002.bin"]
            assert shard["from_sha256"] == {"pytorch_model-00001-of-00002.bin": lfs["pytorch_model-00001-of-00002.bin"]}
            assert manifest.derived["model.safetensors.index.json"]["from"][0] == "pytorch_model.bin.index.json"
            stored_answers(store, commit, "roberta")
            # a damaged converted file is converted again from the Hub and copied: the same bytes
            blob = store.file_blob(commit, "model-00002-of-00002.safetensors")
            properties = blob.get_blob_properties()
            data = bytearray(blob.download_blob().readall())
            data[-3] ^= 0xFF
            blob.upload_blob(bytes(data), overwrite=True, metadata=properties.metadata)
            repaired = run_refresh(settings, RefreshRequest(repair=True, explicit=True))
            assert repaired.outcome == "repaired" and repaired.files_repaired == ["model-00002-of-00002.safetensors"]
            assert store.verify_version(commit) == []
        finally:
            store.container.delete_container()


def test_a_pickle_that_would_run_code_publishes_nothing(azurite: str, container_name: str, tmp_path: Path) -> None:
    folder = save_the_old_way(MODELS / "bert", tmp_path / "bert")
    marker = tmp_path / "ran"
    tensors = dict(torch.load(folder / "pytorch_model.bin", weights_only=True))
    torch.save({**tensors, "payload": MarkerWhenUnpickled(marker)}, folder / "pytorch_model.bin")
    env = {"MODEL_STORAGE": azurite, "MODEL_CONTAINER": container_name, "MODEL_ID": "tests/old-way", "MODEL_ARTIFACTS": "none"}
    code, out, err = run_cli(env, "isolate", "--from-dir", str(folder), "--model-id", "tests/old-way")
    assert code == 1 and out["error"]["code"] == "unsafe_model", err  # type: ignore[index]
    assert "pytorch_model.bin needs posix.system to be unpickled, which torch's restricted unpickler refuses" in err, err
    assert not marker.exists()
    store = ModelStore.from_settings(Settings.from_env(env))
    assert not [b.name for b in store.container.list_blobs() if "/versions/" in b.name]  # not a byte of the model
    assert store.read_pointer() is None
    last = store.read_last_refresh()
    assert last is not None and last["outcome"] == "failed" and last["error_code"] == "unsafe_model"
    # the same checkpoint from the Hub: refused the same way, before any byte is copied
    with FakeHubServer() as hub:
        hub.hub.publish("evil/bert", folder)
        settings = settings_for(azurite, container_name, MODEL_ID="evil/bert", HF_ENDPOINT=hub.endpoint, MODEL_ARTIFACTS="none")
        with pytest.raises(UnsafeModelError, match=r"restricted unpickler refuses"):
            run_refresh(settings, RefreshRequest())
    assert not marker.exists()
    assert not [b.name for b in store.container.list_blobs() if "/versions/" in b.name]
    store.container.delete_container()


def test_other_pickles_stay_refused_with_nothing_read(azurite: str, container_name: str, tmp_path: Path) -> None:
    folder = save_the_old_way(MODELS / "bert", tmp_path / "bert")
    (folder / "pytorch_model.bin").rename(folder / "model.pt")
    with FakeHubServer() as hub:
        hub.hub.publish("old/pt-only", folder)
        settings = settings_for(azurite, container_name, MODEL_ID="old/pt-only", HF_ENDPOINT=hub.endpoint)
        with pytest.raises(UnsafeModelError, match=r"no safetensors weights \(found model\.pt\)"):
            run_refresh(settings, RefreshRequest())
        assert not any("/resolve/" in path and path.endswith(".pt") for path in hub.hub.requests)  # never downloaded
    ModelStore.from_settings(settings).container.delete_container()


def test_the_manifest_of_a_converted_version_says_where_it_came_from(azurite: str, tmp_path: Path) -> None:
    """The derived facts are in the stored manifest.json itself (what an auditor reads)."""
    folder = save_the_old_way(MODELS / "distilbert", tmp_path / "distilbert", legacy=True)
    settings = settings_for(azurite, f"t{uuid.uuid4().hex[:20]}", MODEL_ARTIFACTS="none")
    store = ModelStore.from_settings(settings)
    store.ensure_container()
    try:
        result = isolate(store, LocalDirSource(folder), explicit=True, keep_versions=5)
        assert result.revision is not None
        raw = json.loads(store.file_blob(result.revision, "manifest.json").download_blob().readall())
        facts = raw["derived"]["model.safetensors"]
        assert facts["from"] == ["pytorch_model.bin"] and facts["by"].startswith("torch ") and "weights_only" in facts["by"]
        assert facts["checked_with"].startswith("transformers ") and "DistilBertForQuestionAnswering" in facts["checked_with"]
        assert facts["from_sha256"] == {"pytorch_model.bin": hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()}
    finally:
        store.container.delete_container()
