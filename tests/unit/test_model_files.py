"""File names, file selection, manifest and pointer: the parts that guard local paths."""

from __future__ import annotations

import hashlib

import pytest

from shared.errors import IntegrityError, UnsafeModelError
from shared.store.model_files import FileEntry, Manifest, Pointer, check_file_name, select_files
from shared.store.transfer import rechunk

SHA = hashlib.sha256(b"x").hexdigest()
REV = "a" * 40


@pytest.mark.parametrize("name", ["", ".", "..", "../config.json", "a/b", "/etc/passwd", "C:x", "a\\b", "x\x00", 3, None])
def test_unsafe_names_are_rejected(name: object) -> None:
    with pytest.raises(IntegrityError):
        check_file_name(name)


def test_plain_names_pass() -> None:
    assert check_file_name("model.safetensors") == "model.safetensors"


def test_select_files_keeps_only_allowed() -> None:
    names = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "README.md", "onnx/model.onnx", "vocab.txt"]
    assert select_files(names, where="here") == ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"]


def test_pickle_only_is_refused_naming_what_is_there() -> None:
    with pytest.raises(UnsafeModelError, match=r"pytorch_model\.bin"):
        select_files(["config.json", "pytorch_model.bin", "vocab.txt"], where="repo x")
    with pytest.raises(UnsafeModelError, match="config.json"):
        select_files(["model.safetensors", "vocab.txt"], where="repo x")


def _manifest_json(names: list[str], revision: str = REV) -> bytes:
    import json

    return json.dumps(
        {
            "format": 1,
            "model_id": "a/b",
            "revision": revision,
            "source": "local",
            "isolated_at": "now",
            "files": [{"name": n, "size": 1, "sha256": SHA} for n in names],
        }
    ).encode()


def test_manifest_round_trip() -> None:
    manifest = Manifest(model_id="a/b", revision=REV, source="local", files=(FileEntry("config.json", 1, SHA),))
    again = Manifest.from_json(manifest.to_json(), revision=REV)
    assert again == manifest
    assert again.total_bytes == 1


def test_manifest_provenance_round_trips_and_an_older_manifest_reads_without_it() -> None:
    blobs = {"config.json": {"etag": '"0x8DC"', "last_modified": "2024-05-01T10:00:00+00:00", "size": 1}}
    provenance = {"kind": "blob", "account": "old", "container": "ml-poc-container", "prefix": "", "blobs": blobs}
    manifest = Manifest(model_id="a/b", revision=REV, source="blob", files=(FileEntry("config.json", 1, SHA),), provenance=provenance)
    assert Manifest.from_json(manifest.to_json(), revision=REV).provenance == provenance
    older = Manifest.from_json(_manifest_json(["config.json"]), revision=REV)  # written before provenance existed
    assert older.provenance == {} and older.derived == {}


@pytest.mark.parametrize("bad", ["../config.json", "sub/model.safetensors", "/abs.safetensors", "", "..", "evil.py"])
def test_manifest_with_unsafe_or_unknown_names_is_rejected(bad: str) -> None:
    with pytest.raises(IntegrityError):
        Manifest.from_json(_manifest_json(["config.json", bad]), revision=REV)


def test_manifest_rejects_duplicates_wrong_revision_and_garbage() -> None:
    with pytest.raises(IntegrityError, match="twice"):
        Manifest.from_json(_manifest_json(["config.json", "config.json"]), revision=REV)
    with pytest.raises(IntegrityError):
        Manifest.from_json(_manifest_json(["config.json"]), revision="b" * 40)
    with pytest.raises(IntegrityError):
        Manifest.from_json(b"{", revision=REV)
    with pytest.raises(IntegrityError):
        Manifest.from_json(_manifest_json(["config.json"], revision="../../x"), revision="../../x")


def test_pointer_history() -> None:
    first = Pointer(model_id="a/b", revision="1" * 40)
    second = first.moved_to("2" * 40, pinned=False)
    third = second.moved_to("3" * 40, pinned=False)
    assert third.previous == ("2" * 40, "1" * 40)
    back = third.moved_to("2" * 40, pinned=True)
    assert back.revision == "2" * 40 and back.previous == ("3" * 40, "1" * 40) and back.pinned
    assert Pointer.from_json(back.to_json(), etag="e") == back


def test_rechunk_regroups_into_fixed_blocks() -> None:
    data = bytes(range(256)) * 10
    pieces = [data[i : i + 7] for i in range(0, len(data), 7)]
    blocks = list(rechunk(pieces, 100))
    assert b"".join(blocks) == data
    assert all(len(b) == 100 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 100
    assert list(rechunk([], 100)) == []
