"""The model store against a real Azurite: publish, read back, verify, lock, rollback, retention."""

from __future__ import annotations

import datetime as dt
import filecmp
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import IntegrityError, NotFoundError, RefreshAlreadyRunningError, UnsafeModelError
from shared.refresh.isolation import IsolationResult, LocalDirSource, Snapshot, isolate
from shared.store.model_files import FileEntry
from shared.store.model_store import ModelStore
from shared.store.records import seal

pytestmark = pytest.mark.integration


def publish(store: ModelStore, folder: Path, *, explicit: bool = True, keep: int = 3) -> IsolationResult:
    return isolate(store, LocalDirSource(folder, block_size=store.block_size), explicit=explicit, keep_versions=keep)


def variant(base: Path, dest: Path, tag: str) -> Path:
    """A copy of ``base`` whose config differs, hence another local revision."""
    shutil.copytree(base, dest)
    config = dest / "config.json"
    config.write_text(config.read_text().rstrip().rstrip("}") + f', "variant_tag": "{tag}"}}\n')
    return dest


def test_round_trip_is_byte_identical(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    result = publish(store, tiny_bert_dir)
    assert result.outcome == "published"
    assert result.revision is not None and result.revision.startswith("local-")
    assert result.files_copied == len(list(tiny_bert_dir.iterdir()))

    pointer = store.read_pointer()
    assert pointer is not None and pointer.revision == result.revision and not pointer.pinned
    manifest = store.download_version(result.revision, tmp_path / "out")
    names = sorted(p.name for p in tiny_bert_dir.iterdir())
    assert sorted(f.name for f in manifest.files) == names
    match, mismatch, errors = filecmp.cmpfiles(tiny_bert_dir, tmp_path / "out", names, shallow=False)
    assert (sorted(match), mismatch, errors) == (names, [], [])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names  # no temp files left

    weights = manifest.file("model.safetensors")
    assert bytes(store.read_file(result.revision, weights)) == (tiny_bert_dir / "model.safetensors").read_bytes()
    props = store.file_blob(result.revision, "model.safetensors").get_blob_properties()
    assert props.metadata["sha256"] == weights.sha256
    assert store.verify_version(result.revision) == []


def test_manifest_records_what_it_must(store: ModelStore, tiny_bert_dir: Path) -> None:
    result = publish(store, tiny_bert_dir)
    assert result.revision is not None
    manifest = store.require_manifest(result.revision)
    assert manifest.model_id == store.model_id and manifest.source == "local" and manifest.task == "question-answering"
    assert manifest.format == 1 and manifest.isolated_at
    assert {"transformers", "torch", "safetensors"} <= set(manifest.libraries)
    for entry in manifest.files:
        assert entry.size == (tiny_bert_dir / entry.name).stat().st_size


def test_republish_is_a_noop(store: ModelStore, tiny_bert_dir: Path) -> None:
    first = publish(store, tiny_bert_dir)
    assert first.revision is not None
    blob = store.file_blob(first.revision, "model.safetensors")
    before = blob.get_blob_properties().etag
    pointer_before = store.read_pointer()
    second = publish(store, tiny_bert_dir)
    assert second.outcome == "up_to_date"
    assert second.bytes_moved == 0 and second.files_copied == 0
    assert blob.get_blob_properties().etag == before
    after = store.read_pointer()
    assert after is not None and pointer_before is not None and after.etag == pointer_before.etag
    assert store.read_last_refresh()["outcome"] == "up_to_date"  # type: ignore[index]


def test_pickle_only_folder_is_refused(store: ModelStore, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.txt").write_text("[UNK]\n")
    # pytorch_model.bin is converted with the restricted unpickler (test_pytorch_weights.py); other pickles never are
    (tmp_path / "model.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UnsafeModelError, match=r"no safetensors weights \(found model\.pt\)"):
        publish(store, tmp_path)
    assert store.read_pointer() is None
    assert store.list_versions() == []


class GatedSource(LocalDirSource):
    """A local source whose big file waits for a signal half-way, to hold the lock."""

    def __init__(self, folder: Path, block_size: int) -> None:
        super().__init__(folder, block_size=block_size)
        self.started = threading.Event()
        self.release = threading.Event()

    def open(self, entry: FileEntry) -> Iterator[bytes]:
        for i, block in enumerate(super().open(entry)):
            if entry.name == "model.safetensors" and i == 1:
                self.started.set()
                assert self.release.wait(30)
            yield block


def test_two_concurrent_publishers_one_wins(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    other = variant(tiny_bert_dir, tmp_path / "other", "b")
    gated = GatedSource(tiny_bert_dir, store.block_size)
    outcome: dict[str, object] = {}

    def first() -> None:
        outcome["first"] = isolate(store, gated, explicit=True, keep_versions=3)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert gated.started.wait(30)
        with pytest.raises(RefreshAlreadyRunningError, match="already running"):
            publish(store, other)
    finally:
        gated.release.set()
        thread.join(60)
    winner = outcome["first"]
    assert isinstance(winner, IsolationResult) and winner.outcome == "published"
    pointer = store.read_pointer()
    assert pointer is not None and pointer.revision == winner.revision
    assert store.verify_version(pointer.revision) == []
    assert [v.revision for v in store.list_versions()] == [winner.revision]
    assert store.read_last_refresh()["outcome"] == "published"  # type: ignore[index]


class FailingSource(LocalDirSource):
    """Raises from inside the upload of the weights, after some blocks went out."""

    def open(self, entry: FileEntry) -> Iterator[bytes]:
        for i, block in enumerate(super().open(entry)):
            if entry.name == "model.safetensors" and i == 1:
                raise OSError("disk went away")
            yield block


def test_failure_half_way_leaves_pointer_and_no_complete_version(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    first = publish(store, tiny_bert_dir)
    pointer_before = store.read_pointer()
    other = variant(tiny_bert_dir, tmp_path / "other", "c")
    with pytest.raises(OSError, match="disk went away"):
        isolate(store, FailingSource(other, block_size=store.block_size), explicit=True, keep_versions=3)
    pointer_after = store.read_pointer()
    assert pointer_after is not None and pointer_before is not None
    assert pointer_after.etag == pointer_before.etag and pointer_after.revision == first.revision
    staged = [v for v in store.list_versions() if v.revision != first.revision]
    assert len(staged) == 1 and not staged[0].complete
    assert not store.file_blob(staged[0].revision, "model.safetensors").exists()  # never committed
    last = store.read_last_refresh()
    assert last is not None and last["outcome"] == "failed"

    resumed = publish(store, other)  # a resume skips the files already good
    assert resumed.outcome == "published" and resumed.files_reused >= 1
    assert resumed.files_copied < len(list(other.iterdir()))


def test_file_changing_during_upload_fails_and_deletes_staging(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    folder = variant(tiny_bert_dir, tmp_path / "changing", "d")
    source = LocalDirSource(folder, block_size=store.block_size)
    snapshot = source.snapshot()
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    class Frozen(LocalDirSource):
        def snapshot(self) -> Snapshot:
            return snapshot

    with pytest.raises(IntegrityError, match="model.safetensors"):
        isolate(store, Frozen(folder, block_size=store.block_size), explicit=True, keep_versions=3)
    assert store.read_pointer() is None
    assert store.list_versions() == []


def corrupt(store: ModelStore, revision: str, name: str) -> None:
    """Flip one byte of a stored file, keeping its size and sha256 metadata."""
    blob = store.file_blob(revision, name)
    props = blob.get_blob_properties()
    data = bytearray(blob.download_blob().readall())
    data[len(data) // 2] ^= 0x01
    blob.upload_blob(bytes(data), overwrite=True, metadata=props.metadata)


def test_corrupted_blob_fails_verify_and_download_naming_the_file(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    result = publish(store, tiny_bert_dir)
    assert result.revision is not None
    corrupt(store, result.revision, "model.safetensors")
    problems = store.verify_version(result.revision)
    assert len(problems) == 1 and "model.safetensors" in problems[0] and result.revision in problems[0]
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match="model.safetensors") as info:
        store.download_version(result.revision, out)
    assert result.revision in info.value.message
    assert not (out / "model.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temp file removed
    with pytest.raises(IntegrityError, match="model.safetensors"):
        store.read_file(result.revision, store.require_manifest(result.revision).file("model.safetensors"))


def test_truncated_blob_is_a_size_error(store: ModelStore, tiny_bert_dir: Path) -> None:
    result = publish(store, tiny_bert_dir)
    assert result.revision is not None
    store.file_blob(result.revision, "vocab.txt").upload_blob(b"short", overwrite=True)
    assert any("vocab.txt" in p for p in store.verify_version(result.revision))


@pytest.mark.parametrize("bad", ["../../escape.safetensors", "sub/model.safetensors", "/tmp/abs.safetensors", ".."])
def test_manifest_with_unsafe_names_is_rejected_before_any_path(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path, bad: str) -> None:
    import json

    result = publish(store, tiny_bert_dir)
    assert result.revision is not None
    blob = store.file_blob(result.revision, "manifest.json")
    data = json.loads(blob.download_blob().readall())
    data["files"][0]["name"] = bad
    blob.upload_blob(seal(data, kind="manifest"), overwrite=True)  # sealed again: the names themselves must be refused
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match="name"):
        store.download_version(result.revision, out)
    assert not out.exists()
    assert not (tmp_path / "escape.safetensors").exists()


def test_rollback_pins_and_scheduled_refresh_respects_the_pin(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    v1 = publish(store, tiny_bert_dir).revision
    v2 = publish(store, variant(tiny_bert_dir, tmp_path / "v2", "v2")).revision
    pointer = store.rollback()
    assert pointer.revision == v1 and pointer.pinned and pointer.previous[0] == v2

    v3_dir = variant(tiny_bert_dir, tmp_path / "v3", "v3")
    scheduled = publish(store, v3_dir, explicit=False)
    assert scheduled.outcome == "skipped" and scheduled.bytes_moved == 0
    current = store.read_pointer()
    assert current is not None and current.revision == v1 and current.pinned

    explicit = publish(store, v3_dir, explicit=True)
    current = store.read_pointer()
    assert explicit.outcome == "published" and current is not None and current.revision == explicit.revision
    assert not current.pinned

    assert v2 is not None
    again = store.rollback(to=v2)
    assert again.revision == v2 and again.pinned
    with pytest.raises(NotFoundError):
        store.rollback(to="f" * 40)
    with pytest.raises(NotFoundError):
        store.rollback(to="not-a-revision")


def test_rollback_with_nothing_published(store: ModelStore) -> None:
    with pytest.raises(NotFoundError, match="nothing to roll back"):
        store.rollback()


def test_rollback_while_a_refresh_runs_is_refused(store: ModelStore, tiny_bert_dir: Path) -> None:
    publish(store, tiny_bert_dir)
    with store.lock(), pytest.raises(RefreshAlreadyRunningError):
        store.rollback()


def test_retention_keeps_newest_and_never_current_or_previous(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    revisions = []
    for i in range(5):
        result = publish(store, variant(tiny_bert_dir, tmp_path / f"v{i}", f"v{i}"), keep=3)
        revisions.append(result.revision)
    complete = store.complete_revisions()
    assert sorted(complete) == sorted(revisions[-3:])

    # roll back to the oldest kept one, then publish two more: the pinned current must survive
    store.rollback(to=revisions[2])
    for i in range(5, 7):
        publish(store, variant(tiny_bert_dir, tmp_path / f"v{i}", f"v{i}"), keep=2)
    pointer = store.read_pointer()
    assert pointer is not None
    complete = store.complete_revisions()
    assert pointer.revision in complete and pointer.previous[0] in complete
    assert len(complete) <= 3


def test_retention_removes_stale_incomplete_versions_only(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    publish(store, tiny_bert_dir)
    other = variant(tiny_bert_dir, tmp_path / "other", "x")
    with pytest.raises(OSError):
        isolate(store, FailingSource(other, block_size=store.block_size), explicit=True, keep_versions=3)
    incomplete = [v.revision for v in store.list_versions() if not v.complete]
    assert len(incomplete) == 1
    with store.lock():
        assert store.apply_retention(3) == []  # fresh: maybe still being resumed
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
        assert store.apply_retention(3, now=later) == incomplete
    assert all(v.complete for v in store.list_versions())


def test_lock_is_released_after_an_error(store: ModelStore, tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        isolate(store, FailingSource(tiny_bert_dir, block_size=store.block_size), explicit=True, keep_versions=3)
    with store.lock():
        pass


def test_lock_is_renewed_while_work_goes_on(store: ModelStore) -> None:
    from shared.store.lease import RefreshLock

    lock = RefreshLock(store.container.get_blob_client(f"{store.model_id}/refresh.lock"), duration=15, renew_every=0.5)
    with lock:
        threading.Event().wait(2.0)
        assert not lock.lost.is_set()
        with pytest.raises(RefreshAlreadyRunningError):
            store.lock().__enter__()


def test_the_lease_duration_is_one_blob_storage_accepts(store: ModelStore) -> None:
    for seconds in (14, 61, 0):
        with pytest.raises(ValueError, match="15 to 60"):
            ModelStore(store.container, store.model_id, lease_seconds=seconds)
    short = ModelStore(store.container, store.model_id, lease_seconds=15)
    with short.lock():  # the expiry itself is proven by tests/integration/test_refresh_faults.py
        with pytest.raises(RefreshAlreadyRunningError):
            store.lock().__enter__()


def test_a_file_placed_piece_by_piece_in_any_order_is_committed_in_order_and_hashed_as_stored(store: ModelStore) -> None:
    import hashlib
    import random

    pieces = [bytes([k]) * size for k, size in enumerate([70_000, 1, 200_000, 0, 5, 131_072])]
    pads = [3, 0, 60, 0, 0, 0]
    whole = b"".join(piece + bytes(pad) for piece, pad in zip(pieces, pads, strict=True))
    upload = store.placed_upload("a" * 40, "onnx/fp32", "weights.bin")
    order = list(range(len(pieces)))
    random.Random(7).shuffle(order)
    for k in [*order, 2]:  # piece 2 again, as after a restart of its source: the same blocks
        upload.put(k, memoryview(pieces[k]), pads[k])
    assert upload.commit(len(whole)) == hashlib.sha256(whole).hexdigest()
    blob = store.folder_blob("a" * 40, "onnx/fp32", "weights.bin")
    assert blob.download_blob().readall() == whole
    assert blob.get_blob_properties().metadata["sha256"] == hashlib.sha256(whole).hexdigest()


def test_a_placed_file_missing_a_piece_is_never_committed(store: ModelStore) -> None:
    upload = store.placed_upload("b" * 40, "onnx/fp32", "weights.bin")
    upload.put(0, memoryview(b"x" * 10))
    upload.put(2, memoryview(b"z" * 10))
    with pytest.raises(IntegrityError, match="piece 1 missing"):
        upload.commit(30)
    assert not store.folder_blob("b" * 40, "onnx/fp32", "weights.bin").exists()
    short = store.placed_upload("b" * 40, "onnx/fp32", "weights.bin")
    short.put(0, memoryview(b"x" * 10))
    with pytest.raises(IntegrityError, match="for 11 bytes"):
        short.commit(11)
    assert not store.folder_blob("b" * 40, "onnx/fp32", "weights.bin").exists()
