"""PyTorch weights converted to safetensors at isolation: the same tensors, checked against the
model class, read with torch's restricted unpickler so that a pickle that would run code is
refused without running it; everything else that is not safetensors stays refused."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, load_file

from shared.engine.torch_model import engine_from_dir, engine_from_files
from shared.errors import IntegrityError, UnsafeModelError
from shared.refresh.isolation import LocalDirSource
from shared.refresh.model_checks import CheckedSource
from shared.refresh.weights_conversion import WeightsConversion
from shared.store.model_files import FileEntry, select_files
from tests.fixtures.tiny_models import save_the_old_way

from .test_question_answering_golden import RECORDS, ROOMY, assert_same, item

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"


class MarkerWhenUnpickled:
    """Unpickling this runs a shell command that leaves a file behind: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def entries(folder: Path) -> tuple[FileEntry, ...]:
    return tuple(
        FileEntry(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.iterdir()) if p.is_file()
    )


def reader(folder: Path) -> object:
    def open_file(entry: FileEntry) -> Iterator[bytes]:
        data = (folder / entry.name).read_bytes()
        for begin in range(0, len(data), 4096):  # in pieces, as a source streams
            yield data[begin : begin + 4096]

    return open_file


def conversion(folder: Path) -> WeightsConversion:
    files = tuple(e for e in entries(folder) if e.name.startswith("pytorch_model"))
    return WeightsConversion(files, reader(folder), (folder / "config.json").read_bytes(), where=f"folder {folder.name}")  # type: ignore[arg-type]


def converted_files(folder: Path) -> dict[str, bytes]:
    checked = CheckedSource(LocalDirSource(folder))
    snapshot = checked.snapshot()
    files = {}
    for entry in snapshot.files:
        data = b"".join(checked.open(entry))
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256), entry.name  # as announced before the copy
        files[entry.name] = data
    checked.release()
    return files


def test_a_bin_becomes_the_same_tensors_as_safetensors_and_answers_as_the_pipeline(tmp_path: Path) -> None:
    folder = save_the_old_way(MODELS / "bert", tmp_path / "bert", extra={"bert.embeddings.position_ids": torch.arange(512)[None]})
    checked = CheckedSource(LocalDirSource(folder))
    snapshot = checked.snapshot()
    assert [e.name for e in snapshot.files] == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert snapshot.revision == LocalDirSource(folder).revision()  # named by the files read, the .bin among them
    facts = snapshot.derived["model.safetensors"]
    assert facts["from"] == ["pytorch_model.bin"] and facts["from_sha256"] == {"pytorch_model.bin": entries(folder)[1].sha256}
    assert facts["by"] == f"torch {torch.__version__} weights_only" and "BertForQuestionAnswering" in facts["checked_with"]
    assert facts["tensors"] == 39 and facts["dropped"] == ["bert.embeddings.position_ids"]  # an old buffer the class no longer saves
    files = converted_files(folder)
    again = converted_files(folder)
    assert again == files  # the same bytes each time: a resumed copy and a repair find them stored
    original = load_file(str(MODELS / "bert" / "model.safetensors"))
    back = load(files["model.safetensors"])
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in back)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(files["model.safetensors"])
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as reader_:  # the reference reader accepts it
        assert reader_.metadata() == {"format": "pt"} and set(reader_.keys()) == set(original)
    qa = engine_from_files({name: bytearray(data) for name, data in files.items()}, limits=ROOMY)
    for record in [r for r in RECORDS if r["model"] == "bert"][:24]:
        assert_same(qa.answer([item(record)])[0], record["answers"], str(record["question"]))


def test_shards_become_safetensors_shards_with_an_index_a_folder_loads(tmp_path: Path) -> None:
    folder = save_the_old_way(MODELS / "electra", tmp_path / "electra", shards=3)
    files = converted_files(folder)
    shards = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert sorted(n for n in files if n.startswith("model")) == [*shards, "model.safetensors.index.json"]
    index = json.loads(files["model.safetensors.index.json"])
    original = load_file(str(MODELS / "electra" / "model.safetensors"))
    assert set(index["weight_map"]) == set(original) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(len(files[n]) for n in shards)
    out = tmp_path / "version"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    qa = engine_from_dir(out, limits=ROOMY)  # disk mode reads the index, as from_pretrained does
    for record in [r for r in RECORDS if r["model"] == "electra"][:24]:
        assert_same(qa.answer([item(record)])[0], record["answers"], str(record["question"]))


def test_a_legacy_pickle_converts_too(tmp_path: Path) -> None:
    folder = save_the_old_way(MODELS / "distilbert", tmp_path / "distilbert", legacy=True)
    files = converted_files(folder)
    original = load_file(str(MODELS / "distilbert" / "model.safetensors"))
    back = load(files["model.safetensors"])
    assert all(torch.equal(back[k], original[k]) for k in original) and set(back) == set(original)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path, legacy: bool) -> None:
    folder = save_the_old_way(MODELS / "bert", tmp_path / "bert")
    marker = tmp_path / "ran"
    tensors = dict(torch.load(folder / "pytorch_model.bin", weights_only=True))
    torch.save({**tensors, "payload": MarkerWhenUnpickled(marker)}, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeModelError) as raised:
        CheckedSource(LocalDirSource(folder)).snapshot()
    message = raised.value.message
    assert "pytorch_model.bin needs posix.system to be unpickled, which torch's restricted unpickler refuses" in message, message
    assert "code from a checkpoint never runs" in message and "\n" not in message
    assert not marker.exists()


def test_a_whole_model_pickled_is_refused_naming_its_class(tmp_path: Path) -> None:
    folder = save_the_old_way(MODELS / "bert", tmp_path / "bert")
    torch.save(torch.nn.Linear(2, 2), folder / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match=r"needs torch\.nn\.modules\.linear\.Linear to be unpickled"):
        conversion(folder).convert()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a pickle at all", r"is not a PyTorch checkpoint that holds only weights"),
        (b"PK\x03\x04broken zip", r"is not a readable PyTorch checkpoint"),
        ("list", r"is not a state dict"),
        ("nested", r"is not a state dict"),
    ],
)
def test_what_is_not_a_state_dict_of_tensors_is_refused(tmp_path: Path, content: object, message: str) -> None:
    folder = save_the_old_way(MODELS / "bert", tmp_path / "bert")
    if isinstance(content, bytes):
        (folder / "pytorch_model.bin").write_bytes(content)
    else:
        tensors = dict(torch.load(folder / "pytorch_model.bin", weights_only=True))
        torch.save(list(tensors.values()) if content == "list" else {"model": tensors}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match=message):
        conversion(folder).convert()


def test_tensors_are_checked_against_the_model_class_the_config_names(tmp_path: Path) -> None:
    folder = save_the_old_way(MODELS / "bert", tmp_path / "bert")
    tensors = dict(torch.load(folder / "pytorch_model.bin", weights_only=True))
    torch.save({**tensors, "qa_outputs.weight": torch.zeros(3, 32)}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match=r"holds qa_outputs\.weight of shape \[3, 32\], but .* expects \[2, 32\]"):
        conversion(folder).convert()
    headless = {k: v for k, v in tensors.items() if not k.startswith("qa_outputs")}
    torch.save(headless, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match=r"lack 2 tensor\(s\) that BertForQuestionAnswering needs \(qa_outputs\.bias, qa_outputs"):
        conversion(folder).convert()
    old_names = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()
    }
    torch.save(old_names, folder / "pytorch_model.bin")
    converted, derived = conversion(folder).convert()  # the oldest checkpoints' names, renamed as transformers does
    assert derived["model.safetensors"]["renamed"]["bert.embeddings.LayerNorm.gamma"] == "bert.embeddings.LayerNorm.weight"
    assert converted[0].name == "model.safetensors"


def test_a_bin_whose_bytes_differ_from_what_the_source_said_is_refused(tmp_path: Path) -> None:
    folder = save_the_old_way(MODELS / "bert", tmp_path / "bert")
    [entry] = [e for e in entries(folder) if e.name == "pytorch_model.bin"]
    config = (folder / "config.json").read_bytes()
    lying = WeightsConversion((FileEntry(entry.name, entry.size, "0" * 64),), reader(folder), config, where="repo x")  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match=r"pytorch_model\.bin from repo x .* differs from what the source said"):
        lying.convert()


def test_only_pytorch_model_bin_and_its_shards_are_picked_for_conversion() -> None:
    names = ["config.json", "pytorch_model.bin", "training_args.bin", "tf_model.h5", "vocab.txt"]
    assert select_files(names, where="repo x", convert=True) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    sharded = [
        "config.json",
        "pytorch_model.bin.index.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "vocab.txt",
    ]
    assert select_files(sharded, where="repo x", convert=True) == sorted(sharded)
    both = ["config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt"]
    assert select_files(both, where="repo x", convert=True) == ["config.json", "model.safetensors", "vocab.txt"]  # safetensors win
    for weights in (["tf_model.h5"], ["flax_model.msgpack"], ["model.ckpt"], ["model.pt"], ["weights.bin"]):
        with pytest.raises(
            UnsafeModelError, match=r"no safetensors weights \(found .*\); only safetensors are isolated, and a pytorch_model"
        ):
            select_files(["config.json", "vocab.txt", *weights], where="repo x", convert=True)
    with pytest.raises(UnsafeModelError, match=r"only safetensors are loaded"):  # a folder served as it is (answer --model-dir)
        select_files(["config.json", "pytorch_model.bin", "vocab.txt"], where="folder x")


def test_an_index_naming_other_files_is_refused(tmp_path: Path) -> None:
    folder = save_the_old_way(MODELS / "bert", tmp_path / "bert", shards=2)
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["qa_outputs.bias"] = "../elsewhere.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeModelError, match=r"names files that are not PyTorch weight shards: \.\./elsewhere\.bin"):
        conversion(folder).convert()
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    index["weight_map"]["qa_outputs.bias"] = "pytorch_model-00002-of-00002.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeModelError, match=r"names shards the source does not have: pytorch_model-00002-of-00002\.bin"):
        conversion(folder).convert()
