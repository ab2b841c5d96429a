"""Records that check themselves: any change to the bytes of a sealed record is found and named,
never parsed into a wrong value; records written before sealing still read."""

from __future__ import annotations

import json

import pytest

from shared.errors import RecordDamagedError
from shared.store.model_files import FileEntry, Manifest, Pointer
from shared.store.records import checksum, seal, unseal

REVISION = "local-0123456789abcdef"
EARLIER = "a" * 40
SHA = "b" * 64


def pointer() -> Pointer:
    return Pointer(model_id="org/model", revision=REVISION, previous=(EARLIER,), pinned=True, updated_at="2026-12-05T10:00:00+00:00")


def manifest() -> Manifest:
    files = (FileEntry("config.json", 120, SHA), FileEntry("model.safetensors", 4096, "c" * 64), FileEntry("tokenizer.json", 700, "d" * 64))
    return Manifest(model_id="org/model", revision=REVISION, source="local", files=files, isolated_at="2026-12-05T10:00:00.000001+00:00")


def read_pointer(raw: bytes) -> object:
    return Pointer.from_json(raw, etag=None)


def read_manifest(raw: bytes) -> object:
    return Manifest.from_json(raw, revision=REVISION)


def read_last_refresh(raw: bytes) -> object:
    return unseal(raw, kind="last-refresh", record="last-refresh.json", repair="python -m shared repair").data


RECORDS = {
    "current.json": (pointer().to_json(), read_pointer),
    "manifest.json": (manifest().to_json(), read_manifest),
    "last-refresh.json": (
        seal({"outcome": "published", "model_id": "org/model", "seconds": 1.25, "files_repaired": []}, kind="last-refresh"),
        read_last_refresh,
    ),
}


def test_a_sealed_record_reads_back_the_same() -> None:
    assert Pointer.from_json(pointer().to_json(), etag="x") == pointer()
    assert Manifest.from_json(manifest().to_json(), revision=REVISION) == manifest()
    sealed = json.loads(pointer().to_json())
    assert sealed["checksum"] == checksum(sealed) and sealed["checksum"].startswith("sha256:")


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_single_byte_change_is_found(name: str) -> None:
    """Each byte of the record, changed three ways (its low bit, a high bit, all bits): the reader
    names the damage and its repair, never returns a value."""
    raw, read = RECORDS[name]
    for index in range(len(raw)):
        for mask in (0x01, 0x40, 0xFF):
            changed = bytearray(raw)
            changed[index] ^= mask
            with pytest.raises(RecordDamagedError) as caught:
                read(bytes(changed))
            assert name.split(".")[0] in caught.value.message or "manifest" in caught.value.message, caught.value.message
            assert caught.value.repair


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_truncated_emptied_and_other_shapes_are_damage(name: str) -> None:
    raw, read = RECORDS[name]
    for cut in range(0, len(raw) - 1, 7):
        with pytest.raises(RecordDamagedError):
            read(raw[:cut])
    for other in (b"", b"   \n", b"[]", b"null", b'"current.json"', b"{}", b'{"hello": 1}', b"\xff\xfe{\x00}\x00", b"[" * 100_000):
        if name == "last-refresh.json" and other in (b"{}", b'{"hello": 1}'):
            continue  # an unsealed object: the store's reader checks its fields (tested with Azurite)
        with pytest.raises(RecordDamagedError):
            read(other)


def test_a_record_of_another_kind_is_damage_even_when_its_checksum_matches() -> None:
    with pytest.raises(RecordDamagedError, match="holds a manifest record, not a pointer"):
        Pointer.from_json(manifest().to_json(), etag=None)
    with pytest.raises(RecordDamagedError, match="holds a pointer record, not a manifest"):
        Manifest.from_json(pointer().to_json(), revision=REVISION)
    legacy_manifest = json.loads(manifest().to_json())
    del legacy_manifest["checksum"], legacy_manifest["record"]
    with pytest.raises(RecordDamagedError, match="not a pointer"):  # written before sealing: its shape tells
        Pointer.from_json(json.dumps(legacy_manifest).encode(), etag=None)
    other = Manifest(model_id="org/model", revision=EARLIER, source="local", files=manifest().files)
    with pytest.raises(RecordDamagedError, match=f"names revision {EARLIER}"):
        Manifest.from_json(other.to_json(), revision=REVISION)


def test_records_written_before_sealing_still_read() -> None:
    legacy_pointer = {"format": 1, "model_id": "org/model", "revision": REVISION, "previous": [EARLIER], "pinned": True, "updated_at": "t"}
    assert Pointer.from_json(json.dumps(legacy_pointer, indent=2).encode(), etag=None).previous == (EARLIER,)
    legacy_manifest = json.loads(manifest().to_json())
    del legacy_manifest["checksum"], legacy_manifest["record"], legacy_manifest["canary"]
    read = Manifest.from_json(json.dumps(legacy_manifest).encode(), revision=REVISION)
    assert read.files == manifest().files and read.canary == ""
    assert unseal(b'{"outcome": "failed"}', kind="last-refresh", record="last-refresh.json", repair="x").sealed is False


def test_the_message_names_the_record_and_the_repair_names_a_command() -> None:
    raw = bytearray(manifest().to_json())
    raw[raw.index(b"model.safetensors") + 2] ^= 0x01
    with pytest.raises(RecordDamagedError) as caught:
        Manifest.from_json(bytes(raw), revision=REVISION, repair="python -m shared isolate --repair --from-dir DIR")
    assert caught.value.message.startswith(f"manifest.json of version {REVISION} is damaged")
    assert caught.value.repair == "python -m shared isolate --repair --from-dir DIR" and caught.value.code == "record_damaged"
    assert caught.value.retry_after is None  # waiting does not repair a record
