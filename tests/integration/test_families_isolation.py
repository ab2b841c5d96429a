"""Isolating the model families (docs/model-families.md) into Azurite: a derived tokenizer.json for a model that ships
only its SentencePiece model, one-line refusals before any weight is copied, and the model id of
a ``--from-dir`` folder (the Hub id its config.json names, or ``--model-id``; never ``MODEL_ID``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared.engine.torch_model import engine_from_files
from shared.errors import UnsafeModelError
from shared.refresh.isolation import LocalDirSource, isolate
from shared.settings import Settings
from shared.store.model_store import ModelStore
from tests.fixtures.cli_runs import run_cli
from tests.unit.test_question_answering_golden import RECORDS, ROOMY, assert_same, item

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "fixtures" / "models"


def copy_model(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(MODELS / name, folder)
    return folder


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_a_sentencepiece_only_model_gets_a_derived_tokenizer_json(store: ModelStore) -> None:
    result = isolate(store, LocalDirSource(MODELS / "deberta-v3", block_size=store.block_size), explicit=True, keep_versions=5)
    assert result.outcome == "published" and result.revision is not None
    manifest = store.require_manifest(result.revision)
    names = {f.name for f in manifest.files}
    assert {"spm.model", "tokenizer.json", "added_tokens.json"} <= names
    derived = manifest.derived["tokenizer.json"]
    assert derived["from"][0] == "spm.model" and derived["by"].startswith("transformers ")
    assert derived["converter"] == "DebertaV2Converter"
    assert set(store.read_manifest(result.revision).derived) == {"tokenizer.json"}  # type: ignore[union-attr]
    assert store.verify_version(result.revision) == []
    # the stored version answers as the 4.57.6 pipeline did (which converted with sentencepiece)
    files = {entry.name: store.read_file(result.revision, entry) for entry in manifest.files}
    qa = engine_from_files(files, limits=ROOMY)
    for record in [r for r in RECORDS if r["model"] == "deberta-v3"][:24]:
        assert_same(qa.answer([item(record)])[0], record["answers"], str(record["question"]))
    again = isolate(store, LocalDirSource(MODELS / "deberta-v3", block_size=store.block_size), explicit=True, keep_versions=5)
    assert again.outcome == "up_to_date" and again.bytes_moved == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["BertForSequenceClassification"]}, r"not an extractive question-answering checkpoint \(BertForSeq"),
        ({"architectures": ["BertModel"]}, r"no question-answering head"),
        ({"model_type": "not-a-model"}, r"model type 'not-a-model' is not known to transformers"),
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, r"a generative model \(GPT2LMHeadModel\)"),
        ({"vocab_size": 116}, r"the tokenizer has 254 tokens but the model's embedding has 116 rows"),
    ],
)
def test_unservable_models_are_refused_before_any_weight_is_copied(
    store: ModelStore, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    folder = copy_model("bert", tmp_path)
    edit_config(folder, **change)
    with pytest.raises(UnsafeModelError, match=message) as raised:
        isolate(store, LocalDirSource(folder, block_size=store.block_size), explicit=True, keep_versions=5)
    assert "\n" not in raised.value.message
    assert raised.value.message.startswith(f"folder {folder}: ")  # the source as the user named it, not "local local-..."
    assert not [b.name for b in store.container.list_blobs() if "/versions/" in b.name]  # nothing copied
    assert store.read_pointer() is None


def test_a_slow_only_tokenizer_that_cannot_be_converted_is_refused(store: ModelStore, tmp_path: Path) -> None:
    folder = copy_model("roberta", tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UnsafeModelError, match=r"cannot be converted.*found: tokenizer_config\.json"):
        isolate(store, LocalDirSource(folder, block_size=store.block_size), explicit=True, keep_versions=5)
    deberta = copy_model("deberta-v3", tmp_path)
    (deberta / "spm.model").unlink()
    (deberta / "vocab.txt").write_text("[UNK]\n")  # a tokenizer file, but not the one DeBERTa-v3 needs
    with pytest.raises(UnsafeModelError, match=r"needs its SentencePiece model \(spm\.model or spiece\.model"):
        isolate(store, LocalDirSource(deberta, block_size=store.block_size), explicit=True, keep_versions=5)
    assert not [b.name for b in store.container.list_blobs() if "/versions/" in b.name]


def test_a_folder_is_stored_under_the_model_its_config_names_or_the_model_id_given(
    azurite: str, container_name: str, tmp_path: Path
) -> None:
    """Never under MODEL_ID: a folder is stored and reported under the Hub id its config.json names,
    or under --model-id; one that names none is refused, saying what to pass."""
    folder = copy_model("electra", tmp_path)
    edit_config(folder, _name_or_path="deepset/electra-base-squad2")
    env = {
        "MODEL_STORAGE": azurite,
        "MODEL_CONTAINER": container_name,
        "MODEL_ID": "google-bert/bert-large-uncased-whole-word-masking-finetuned-squad",
        "MODEL_ARTIFACTS": "none",
        "MODEL_CANARY": json.dumps({"question": "Who won?", "context": "The Denver Broncos won the game."}),
    }
    code, out, err = run_cli(env, "isolate", "--from-dir", str(folder))
    assert code == 0 and out["outcome"] == "published" and out["model_id"] == "deepset/electra-base-squad2", err
    code, out, _ = run_cli({**env, "MODEL_ID": "deepset/electra-base-squad2"}, "isolate", "--from-dir", str(folder))
    assert code == 0 and out["outcome"] == "up_to_date"

    unnamed = copy_model("bert", tmp_path)  # saved by transformers 5: no _name_or_path
    code, out, err = run_cli(env, "isolate", "--from-dir", str(unnamed))
    assert code == 1 and out["error"]["code"] == "bad_request"  # type: ignore[index]
    assert "config.json names no model: pass --model-id ID (for example local/bert)" in err, err
    code, out, err = run_cli(env, "isolate", "--from-dir", str(unnamed), "--model-id", "local/bert")
    assert code == 0 and out["outcome"] == "published" and out["model_id"] == "local/bert", err
    store = ModelStore.from_settings(Settings.from_env(env))
    assert store.read_pointer() is None  # nothing ever stored under MODEL_ID
    store.container.delete_container()
