"""``python -m shared adopt``: a container holding a model folder's files flat, as the scripts this
app replaces uploaded it, published as a verified version, from the model store's account or
another one; the same version as ``isolate --from-dir`` of the folder, the container only read."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient

from shared.engine.torch_model import engine_from_files
from shared.errors import IntegrityError
from shared.loading.onnx_artifacts import load_artifact
from shared.refresh.container_source import ContainerSource
from shared.refresh.isolation import LocalDirSource, isolate
from shared.refresh.model_checks import CheckedSource
from shared.settings import DEFAULT_MODEL_ID, Settings
from shared.store.model_store import ModelStore
from tests.conftest import AZURITE_KEY, PrivateAzurite
from tests.fixtures.cli_runs import run_cli
from tests.fixtures.tiny_models import save_the_old_way
from tests.unit.test_question_answering_golden import RECORDS, ROOMY, assert_same, item

pytestmark = pytest.mark.integration
MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
# the files of the original write-up's container, as save_pretrained wrote them
OLD_LAYOUT = ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
CANARY = json.dumps({"question": "Who won?", "context": "The Denver Broncos won the game."})  # any span: random weights
QUESTIONS = [r for r in RECORDS if r["model"] == "bert" and len(str(r["context"])) < 2000][::6]


def old_script_folder(tmp_path: Path, *, name: str | None = None, weights: str = "safetensors") -> Path:
    """The bert fixture as the original script's ``save_pretrained`` left it: the six files of the
    write-up (``pytorch_model.bin`` instead of ``model.safetensors`` with transformers < 4.35)."""
    folder = tmp_path / f"saved-{uuid.uuid4().hex[:6]}"
    if weights == "bin":
        save_the_old_way(MODELS / "bert", folder)
    else:
        shutil.copytree(MODELS / "bert", folder)
    specials = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    if name is not None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": name}, indent=2))
    return folder


def upload_flat(container: ContainerClient, folder: Path, prefix: str = "") -> dict[str, str]:
    """What the original script did: ``upload_blob(name, data)`` of each file, flat; returns each blob's ETag."""
    if not container.exists():
        container.create_container()
    for path in sorted(folder.iterdir()):
        container.upload_blob(prefix + path.name, path.read_bytes())
    return etags(container)


def etags(container: ContainerClient) -> dict[str, str]:
    """Each blob's ETag (the listing gives it unquoted, a blob's properties quoted, as HTTP has it)."""
    return {blob.name: str(blob.etag).strip('"') for blob in container.list_blobs()}


@pytest.fixture
def source_container(azurite: str) -> Iterator[ContainerClient]:
    """A container in the model store's account, as the write-up's ``ml-poc-container`` (named per test)."""
    container = BlobServiceClient.from_connection_string(azurite).get_container_client(f"ml-poc-{uuid.uuid4().hex[:12]}")
    yield container
    container.delete_container()


def cli_env(azurite: str, container: str, **extra: str) -> dict[str, str]:
    return {
        "MODEL_STORAGE": azurite,
        "MODEL_CONTAINER": container,
        "MODEL_ID": DEFAULT_MODEL_ID,  # never used for a container: its config.json or --model-id names it
        "MODEL_CANARY": CANARY,
        "MODEL_ARTIFACTS": "none",
        "QA_BACKEND": "torch",
        **extra,
    }


def test_adopting_the_old_scripts_container_serves_what_isolating_the_folder_serves(
    azurite: str, container_name: str, source_container: ContainerClient, tmp_path: Path
) -> None:
    folder = old_script_folder(tmp_path, name="tests/old-script-bert")
    assert sorted(p.name for p in folder.iterdir()) == OLD_LAYOUT
    before = upload_flat(source_container, folder)
    env = cli_env(azurite, container_name, AZURE_STORAGE_CONNECTION_STRING=azurite, MODEL_ARTIFACTS="fp32")

    code, out, err = run_cli(env, "adopt", "--container", source_container.container_name)
    assert code == 0, err
    assert (out["outcome"], out["model_id"], out["source"]) == ("published", "tests/old-script-bert", "blob")
    assert out["revision"] == LocalDirSource(folder).revision()  # the revision a folder of the same files has
    assert out["artifacts"] == {"fp32": "built"}
    assert etags(source_container) == before  # only read: no blob written, changed or added

    settings = Settings.from_env({**env, "MODEL_ID": "tests/old-script-bert"})
    store = ModelStore.from_settings(settings)
    manifest = store.require_manifest(str(out["revision"]))
    assert manifest.source == "blob" and manifest.files == CheckedSource(LocalDirSource(folder)).snapshot().files
    where = manifest.provenance
    assert {k: v for k, v in where.items() if k != "blobs"} == {
        "kind": "blob",
        "account": "devstoreaccount1",
        "endpoint": "http://127.0.0.1:10000/devstoreaccount1",
        "container": source_container.container_name,
        "prefix": "",
    }
    assert sorted(where["blobs"]) == OLD_LAYOUT
    for name, facts in where["blobs"].items():
        assert facts["etag"].strip('"') == before[name] and facts["size"] == (folder / name).stat().st_size
        assert facts["last_modified"].endswith("+00:00")
    raw = store.file_blob(manifest.revision, "manifest.json").download_blob().readall().decode()
    assert AZURITE_KEY not in raw and "AccountKey" not in raw and "sig=" not in raw

    # the folder isolated into another store: the same version, and the same answers served
    other_env = cli_env(azurite, f"t{uuid.uuid4().hex[:20]}")
    code, isolated, err = run_cli(other_env, "isolate", "--from-dir", str(folder))
    assert code == 0 and (isolated["model_id"], isolated["revision"]) == ("tests/old-script-bert", out["revision"]), err
    other = ModelStore.from_settings(Settings.from_env({**other_env, "MODEL_ID": "tests/old-script-bert"}))
    try:
        assert other.require_manifest(manifest.revision).files == manifest.files
        record = QUESTIONS[1]
        ask = ("ask", "--question", str(record["question"]), "--context", str(record["context"]), "--top-k", "3")
        code, adopted_answer, _ = run_cli({**env, "MODEL_ID": "tests/old-script-bert"}, *ask)
        code2, folder_answer, _ = run_cli({**other_env, "MODEL_ID": "tests/old-script-bert"}, *ask)
        assert code == code2 == 0 and adopted_answer == folder_answer and adopted_answer["revision"] == manifest.revision
    finally:
        other.container.delete_container()
    # and as the transformers 4.57.6 pipeline answered, through torch and the ONNX artifact
    files = {entry.name: store.read_file(manifest.revision, entry) for entry in manifest.files}
    torch_qa = engine_from_files(files, limits=ROOMY)
    onnx_qa = load_artifact(store, manifest, "fp32", Settings.from_env({"QA_MAX_QUESTION_TOKENS": "512"})).engine
    for record in QUESTIONS:
        assert_same(torch_qa.answer([item(record)])[0], record["answers"], str(record["question"]))
        assert_same(onnx_qa.answer([item(record)])[0], record["answers"], str(record["question"]))

    code, again, _ = run_cli(env, "adopt", "--container", source_container.container_name)
    assert code == 0 and again["outcome"] == "up_to_date" and again["bytes_moved"] == 0
    store.container.delete_container()


def test_adopting_from_a_second_storage_account(azurite: str, container_name: str, second_account: PrivateAzurite, tmp_path: Path) -> None:
    folder = old_script_folder(tmp_path)  # saved by transformers 5: its config.json names no model
    source = BlobServiceClient.from_connection_string(second_account.connection_string).get_container_client("ml-poc-container")
    upload_flat(source, folder, prefix="exports/squad/")
    source.upload_blob("exports/squad/checkpoint-500/pytorch_model.bin", b"a sub-folder: not the model's")
    source.upload_blob("README.md", b"elsewhere in the container")
    before = etags(source)
    env = cli_env(azurite, container_name, AZURE_STORAGE_CONNECTION_STRING=second_account.connection_string)
    adopt = ("adopt", "--container", "ml-poc-container", "--prefix", "exports/squad")

    code, out, err = run_cli(env, "adopt", "--container", "no-such-container")
    assert code == 1 and out["error"]["code"] == "not_found" and "no container no-such-container" in err, err  # type: ignore[index]
    code, out, err = run_cli(env, *adopt)
    assert code == 1 and out["error"]["code"] == "bad_request"  # type: ignore[index]
    assert (
        "container ml-poc-container/exports/squad of account oldscripts: config.json names no model: "
        "pass --model-id ID (for example local/squad)" in err
    ), err

    code, out, err = run_cli(env, *adopt, "--model-id", "local/squad")
    assert code == 0 and (out["outcome"], out["model_id"]) == ("published", "local/squad"), err
    assert out["revision"] == LocalDirSource(folder).revision()
    store = ModelStore.from_settings(Settings.from_env({**env, "MODEL_ID": "local/squad"}))
    manifest = store.require_manifest(str(out["revision"]))
    where = manifest.provenance
    assert (where["account"], where["endpoint"]) == ("oldscripts", f"http://127.0.0.1:{second_account.blob_port}/oldscripts")
    assert (where["container"], where["prefix"], sorted(where["blobs"])) == ("ml-poc-container", "exports/squad/", OLD_LAYOUT)
    assert second_account.key not in store.file_blob(manifest.revision, "manifest.json").download_blob().readall().decode()
    assert etags(source) == before

    # a damaged stored file: verify names the adopt command that repairs it, which copies it again
    blob = store.file_blob(manifest.revision, "vocab.txt")
    properties = blob.get_blob_properties()
    blob.upload_blob(b"[UNK]\n" + blob.download_blob().readall()[6:], overwrite=True, metadata=properties.metadata)
    code, verified, _ = run_cli({**env, "MODEL_ID": "local/squad"}, "verify")
    repair = "python -m shared adopt --repair --container ml-poc-container --prefix exports/squad --model-id local/squad"
    assert code == 1 and str(verified["repair"]).startswith(repair) and "oldscripts" in str(verified["repair"])
    code, repaired, err = run_cli(env, *adopt, "--model-id", "local/squad", "--repair")
    assert code == 0 and (repaired["outcome"], repaired["files_repaired"]) == ("repaired", ["vocab.txt"]), err
    assert store.verify_version(manifest.revision) == []

    # the source account down: the message names it, not the model store's
    second_account.stop()
    code, out, err = run_cli(env, *adopt, "--model-id", "local/squad", timeout=600)
    message = str(out["error"]["message"])  # type: ignore[index]
    assert code == 1 and out["error"]["code"] == "storage_unavailable", err  # type: ignore[index]
    assert f"127.0.0.1:{second_account.blob_port}" in message and "AZURE_STORAGE_CONNECTION_STRING" in message, message
    assert "MODEL_STORAGE" not in message
    store.container.delete_container()


def test_a_blob_rewritten_after_it_was_hashed_fails_the_publish(
    store: ModelStore, source_container: ContainerClient, tmp_path: Path
) -> None:
    upload_flat(source_container, old_script_folder(tmp_path, name="tests/old-script-bert"))
    source = CheckedSource(ContainerSource(source_container, block_size=64 * 1024))
    source.check()  # hashed: the revision is named by these bytes
    source_container.upload_blob("tokenizer_config.json", b'{"model_max_length": 384}', overwrite=True)
    with pytest.raises(IntegrityError, match=r"tokenizer_config\.json in container ml-poc-\w+ of account devstoreaccount1 changed after"):
        isolate(store, source, explicit=True, keep_versions=5)
    assert store.read_pointer() is None and store.list_versions() == []  # the staged files were deleted


def test_a_bin_only_container_is_converted_as_its_folder_would_be(
    store: ModelStore, source_container: ContainerClient, tmp_path: Path
) -> None:
    """The old script under transformers < 4.35 uploaded pytorch_model.bin: adopted, it is converted
    (nothing of the container written) into the version isolate --from-dir makes of the folder."""
    folder = old_script_folder(tmp_path, name="tests/old-script-bert", weights="bin")
    before = upload_flat(source_container, folder)
    adopted = isolate(store, ContainerSource(source_container, block_size=64 * 1024), explicit=True, keep_versions=5)
    assert adopted.outcome == "published" and adopted.revision == LocalDirSource(folder).revision()
    manifest = store.require_manifest(adopted.revision)
    local = CheckedSource(LocalDirSource(folder)).snapshot()
    assert manifest.files == local.files and manifest.derived == local.derived
    assert manifest.derived["model.safetensors"]["from"] == ["pytorch_model.bin"]
    assert manifest.provenance["blobs"]["pytorch_model.bin"]["etag"].strip('"') == before["pytorch_model.bin"]
    assert etags(source_container) == before
    files = {entry.name: store.read_file(adopted.revision, entry) for entry in manifest.files}
    qa = engine_from_files(files, limits=ROOMY)
    for record in QUESTIONS:
        assert_same(qa.answer([item(record)])[0], record["answers"], str(record["question"]))
