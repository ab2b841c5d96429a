"""The memory loader: models built on the downloaded bytes must answer as models loaded from a folder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from shared.engine.question_answering import QAEngine, QAItem
from shared.engine.torch_model import engine_from_dir, engine_from_files, safetensors_in_place
from shared.errors import IntegrityError, UnsafeModelError

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
ITEMS = [
    QAItem("Who won the game?", "The Denver Broncos won Super Bowl 50 in 2016, in San Francisco.", top_k=3),
    QAItem("Where is the café?", "The café is in Zürich — near the river. " * 60, max_answer_len=5),
]


def files_of(folder: Path, *, without: tuple[str, ...] = ()) -> dict[str, bytearray]:
    return {p.name: bytearray(p.read_bytes()) for p in folder.iterdir() if p.is_file() and p.name not in without}


def spans(engine: QAEngine) -> list[list[tuple[str, int, int, float]]]:
    return [[(a.answer, a.start, a.end, round(a.score, 5)) for a in answers] for answers in engine.answer(ITEMS)]


@pytest.mark.parametrize("model", ["bert", "distilbert", "roberta", "bert-squad2"])
def test_memory_engine_answers_like_a_folder_engine(model: str) -> None:
    folder = MODELS / model
    assert spans(engine_from_files(files_of(folder))) == spans(engine_from_dir(folder))


def test_weights_share_the_downloaded_buffer() -> None:
    buffer = bytearray((MODELS / "bert" / "model.safetensors").read_bytes())
    tensors = safetensors_in_place(buffer, name="model.safetensors")
    import ctypes

    start = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    for tensor in tensors.values():
        if tensor.numel():
            assert start <= tensor.data_ptr() < start + len(buffer)  # a view, not a copy


def test_sharded_weights(tmp_path: Path) -> None:
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(str(MODELS / "bert"))
    model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="60KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    files = files_of(MODELS / "bert", without=("model.safetensors",)) | files_of(tmp_path, without=("config.json",))
    assert spans(engine_from_files(files)) == spans(engine_from_dir(MODELS / "bert"))


def test_without_tokenizer_json_the_vocabulary_is_converted() -> None:
    files = files_of(MODELS / "bert", without=("tokenizer.json",))
    assert spans(engine_from_files(files)) == spans(engine_from_dir(MODELS / "bert"))


def _safetensors(header: dict[str, object], data: bytes = b"") -> bytearray:
    raw = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "buffer",
    [
        bytearray(b"\x01\x02"),
        bytearray(struct.pack("<Q", 10**9) + b"{}"),
        bytearray(struct.pack("<Q", 4) + b"nope"),
        _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 8),
        _safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\x00" * 16),
        _safetensors({"w": {"dtype": "X99", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),
    ],
)
def test_malformed_safetensors_are_integrity_errors(buffer: bytearray) -> None:
    with pytest.raises(IntegrityError):
        safetensors_in_place(buffer, name="model.safetensors")


def test_a_model_without_a_qa_head_is_refused() -> None:
    files = files_of(MODELS / "bert")
    files["config.json"] = bytearray(json.dumps({"model_type": "vit"}).encode())
    with pytest.raises(UnsafeModelError, match="question-answering"):
        engine_from_files(files)
    files["config.json"] = bytearray(b'{"model_type": "no-such-type"}')
    with pytest.raises(UnsafeModelError):
        engine_from_files(files)


@pytest.mark.parametrize("chunk", [1, 7, 8, 100, 4096, 1 << 30])
def test_safetensors_stream_reads_any_chunking_into_tensors_of_their_own(tmp_path: Path, chunk: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from shared.engine.torch_model import SafetensorsStream

    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.tensor([1, -2], dtype=torch.int64),
        "empty": torch.zeros(0),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    data = memoryview(path.read_bytes())
    stream = SafetensorsStream("m.safetensors")
    stream(data[:3])  # a partial first chunk, then a restart as after a changed blob
    stream.restart()
    for start in range(0, len(data), chunk):
        stream(data[start : start + chunk])
    expected = load_file(str(path))
    assert set(stream.tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(stream.tensors[name], tensor)
    storages = {t.untyped_storage().data_ptr() for t in stream.tensors.values() if t.numel()}
    assert len(storages) == 2  # each tensor in memory of its own


def test_safetensors_stream_refuses_a_bad_header() -> None:
    import struct

    from shared.engine.torch_model import SafetensorsStream
    from shared.errors import IntegrityError

    header = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'
    with pytest.raises(IntegrityError, match="not a readable safetensors"):
        SafetensorsStream("x")(memoryview(struct.pack("<Q", len(header)) + header))


def test_safetensors_stream_notices_a_file_that_ends_early(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from shared.engine.torch_model import SafetensorsStream

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(16)}, str(path))
    data = memoryview(path.read_bytes())
    for cut in (4, 20, len(data) - 1):
        stream = SafetensorsStream("m.safetensors")
        stream(data[:cut])
        with pytest.raises(IntegrityError, match="ends"):
            stream.check_complete()
    stream = SafetensorsStream("m.safetensors")
    stream(data)
    stream.check_complete()
