"""The torch side of the engine: a question-answering model from a version's files held in memory
(or a local folder), and the runner that feeds it windows (dynamic int8 on request).

Safetensors are parsed in place (tensors share the download buffers, no copy) or streamed into
tensors of their own (:class:`SafetensorsStream`); the tokenizer comes from ``tokenizer.json``, or is
converted from the slow tokenizer's files. Nothing here knows where the files came from.
"""

from __future__ import annotations

import json
import logging
import struct
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IntegrityError, UnsafeModelError
from .question_answering import QAEngine, TokenizerSpec
from .tokenizer_conversion import derive_tokenizer_json

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def safetensors_in_place(buffer: bytearray, *, name: str) -> dict[str, Any]:
    """Tensors over ``buffer`` (a whole ``.safetensors`` file) without copying their bytes.

    Raises:
        IntegrityError: the header is malformed or points outside the file.
    """
    import torch

    header_len = _header_length(bytes(buffer[:8]), len(buffer), name)
    base = 8 + header_len
    tensors = {}
    for key, dtype, begin, end, shape in _tensor_entries(bytes(buffer[8:base]), base, len(buffer), name):
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = (end - begin) // itemsize
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif (base + begin) % itemsize:
            # misaligned (rare): this tensor alone is copied
            tensors[key] = torch.frombuffer(bytes(buffer[base + begin : base + end]), dtype=dtype).reshape(shape)
        else:
            tensors[key] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + begin).reshape(shape)
    return tensors


def check_safetensors_file(path: Path) -> None:
    """Check a local ``.safetensors`` file's header and every tensor's byte range without reading
    the tensors: the diagnosis a load of the same bytes from storage gives.

    Raises:
        IntegrityError: naming the file, as :func:`safetensors_in_place` would.
    """
    size = path.stat().st_size
    with path.open("rb") as stream:
        header_len = _header_length(stream.read(8), size, path.name)
        header = stream.read(header_len)
    list(_tensor_entries(header, 8 + header_len, size, path.name))


def _header_length(first: bytes, size: int, name: str) -> int:
    if len(first) < 8 or size < 8:
        raise IntegrityError(f"{name} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", first)
    if header_len > min(size - 8, 100 << 20):
        raise IntegrityError(f"{name} has a malformed safetensors header")
    return int(header_len)


def _tensor_entries(header_bytes: bytes, base: int, size: int, name: str) -> Iterator[tuple[str, Any, int, int, list[int]]]:
    """Each tensor of a safetensors header: name, torch dtype, byte range in the data section and
    shape, checked against a file of ``size`` bytes whose data section starts at ``base``."""
    import torch

    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError as err:
        raise IntegrityError(f"{name} has a malformed safetensors header") from err
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = getattr(torch, _SAFETENSORS_DTYPES[meta["dtype"]])
            begin, end = (int(x) for x in meta["data_offsets"])
            shape = [int(x) for x in meta["shape"]]
        except (KeyError, TypeError, ValueError) as err:
            raise IntegrityError(f"{name}: unsupported or malformed tensor entry {key!r}") from err
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = (end - begin) // itemsize
        if begin < 0 or end < begin or base + end > size or count != _numel(shape):
            raise IntegrityError(f"{name}: tensor {key!r} points outside the file")
        yield key, dtype, begin, end, shape


class SafetensorsStream:
    """A sink that parses a ``.safetensors`` file as its bytes flow in order and puts each tensor
    in memory of its own (no whole-file buffer), so that whoever takes a tensor over can free it
    on its own. Use with :meth:`ModelStore.stream_file`; read :attr:`tensors` after it returns.

    Raises (from the sink):
        IntegrityError: the header is malformed, names an unknown dtype, or a range is out of bounds.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.restart()

    def restart(self) -> None:
        self.tensors: dict[str, Any] = {}
        self._head = bytearray()
        self._header_len: int | None = None
        self._slots: list[tuple[int, int, memoryview]] = []  # (begin, end, bytes of a tensor), by offset
        self._offset = 0  # bytes of the data section seen so far
        self._next = 0  # first slot that may still take bytes

    def __call__(self, chunk: memoryview) -> None:
        data = memoryview(chunk).cast("B")
        if self._header_len is None or len(self._head) < 8 + self._header_len:
            data = self._take_header(data)
        if data.nbytes:
            self._take_data(data)

    def _take_header(self, data: memoryview) -> memoryview:
        if self._header_len is None:
            need = 8 - len(self._head)
            self._head += data[:need]
            data = data[need:]
            if len(self._head) < 8:
                return data
            (self._header_len,) = struct.unpack("<Q", bytes(self._head[:8]))
            if self._header_len > 100 << 20:
                raise IntegrityError(f"{self.name}: safetensors header of {self._header_len} bytes")
        need = 8 + self._header_len - len(self._head)
        self._head += data[:need]
        data = data[need:]
        if len(self._head) == 8 + self._header_len:
            self._plan(bytes(self._head[8:]))
        return data

    def _plan(self, header_bytes: bytes) -> None:
        import numpy as np
        import torch

        try:
            header = json.loads(header_bytes)
            for tensor_name, meta in header.items():
                if tensor_name == "__metadata__":
                    continue
                dtype = getattr(torch, _SAFETENSORS_DTYPES[meta["dtype"]])
                begin, end = (int(x) for x in meta["data_offsets"])
                tensor = torch.empty([int(x) for x in meta["shape"]], dtype=dtype)
                if tensor.nbytes != end - begin or begin < 0:
                    raise ValueError(f"{tensor_name}: its shape does not match its byte range")
                self.tensors[tensor_name] = tensor
                view = memoryview(tensor.view(torch.uint8).reshape(-1).numpy() if tensor.nbytes else np.empty(0, np.uint8))  # type: ignore[arg-type]
                self._slots.append((begin, end, view))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise IntegrityError(f"{self.name} is not a readable safetensors file ({err})") from None
        self._slots.sort(key=lambda slot: slot[0])
        self._next = 0

    def check_complete(self) -> None:
        """Raise :class:`IntegrityError` if the bytes seen so far end before the last tensor."""
        if self._header_len is None or len(self._head) < 8 + self._header_len:
            raise IntegrityError(f"{self.name} ends inside its safetensors header")
        if self._slots and self._offset < max(end for _, end, _ in self._slots):
            raise IntegrityError(f"{self.name} ends before its last tensor")

    def _take_data(self, data: memoryview) -> None:
        start, stop = self._offset, self._offset + data.nbytes
        while self._next < len(self._slots) and self._slots[self._next][1] <= start:
            self._next += 1
        index = self._next
        while index < len(self._slots) and self._slots[index][0] < stop:
            begin, end, view = self._slots[index]
            lo, hi = max(begin, start), min(end, stop)
            if lo < hi:
                view[lo - begin : hi - begin] = data[lo - start : hi - start]
            index += 1
        self._offset = stop


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def engine_from_files(files: Mapping[str, bytearray], *, quantize: str = "none", **options: Any) -> QAEngine:
    """Build the engine from file contents in memory (config, safetensors, tokenizer)."""
    runner = TorchRunner(model_from_files(files), quantize=quantize)
    return QAEngine(runner, tokenizer_spec_from_files(files), quantize=quantize, **options)


def question_answering_config(files: Mapping[str, bytes | bytearray]) -> tuple[Any, Any, dict[str, Any]]:
    """The ``...ForQuestionAnswering`` class, the transformers config and the raw ``config.json`` of a
    model's files, read before any weight is.

    Raises:
        UnsafeModelError: config.json is not JSON, names no known model type, or that type has no
            question-answering head in transformers.
    """
    from transformers import CONFIG_MAPPING, MODEL_FOR_QUESTION_ANSWERING_MAPPING

    try:
        config_dict = json.loads(bytes(files["config.json"]))
    except ValueError as err:
        raise UnsafeModelError(f"config.json is not valid JSON ({err}): truncated or damaged?") from None
    try:
        model_type = config_dict["model_type"]
        config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    except (KeyError, ValueError, TypeError) as err:
        raise UnsafeModelError("config.json has no known model_type for transformers") from err
    model_class: Any = MODEL_FOR_QUESTION_ANSWERING_MAPPING.get(type(config), None)
    if model_class is None:
        raise UnsafeModelError(f"transformers has no question-answering head for model type {model_type!r}")
    return model_class, config, config_dict


def model_from_files(files: Mapping[str, bytearray], *, state_dict: dict[str, Any] | None = None) -> Any:
    """The fp32 ``AutoModelForQuestionAnswering`` of in-memory files; its tensors share the
    safetensors buffers (no copy), so those buffers live as long as the model. With
    ``state_dict`` (tensors already read, e.g. by :class:`SafetensorsStream`), ``files`` needs
    only ``config.json``; the dictionary is emptied as the model takes the tensors over."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_class, config, _ = question_answering_config(files)
    if state_dict is None:
        state_dict = {}
        for name in sorted(files):
            if name.endswith(".safetensors"):
                state_dict.update(safetensors_in_place(files[name], name=name))
    if not state_dict:
        raise UnsafeModelError("the version has no safetensors weights")
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.float32)
    state_dict.clear()
    return model.eval()


def tokenizer_spec_from_files(files: Mapping[str, bytearray]) -> TokenizerSpec:
    """The tokenizer facts of a model's files: from ``tokenizer.json``, or converted from the slow
    files (a version isolated before tokenizer.json was derived at isolation; no ``sentencepiece``).

    Raises:
        UnsafeModelError: no tokenizer.json and the slow files cannot be converted.
    """
    tokenizer_json = files.get("tokenizer.json")
    if tokenizer_json is None:
        log.info("No tokenizer.json in the version: converting the tokenizer from its vocabulary files")
        tokenizer_json = bytearray(derive_tokenizer_json(files).data)
    return TokenizerSpec.from_files(tokenizer_json, files.get("tokenizer_config.json"), files.get("special_tokens_map.json"))


def engine_from_dir(model_dir: Path | str, *, quantize: str = "none", **options: Any) -> QAEngine:
    """Load a model folder (safetensors only, no remote code) and build the engine."""
    from transformers import AutoModelForQuestionAnswering
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load is noise in function logs
    # the tokenizer from its files, as in memory mode: transformers 5's tokenizer classes
    # rebuild SentencePiece pipelines (XLM-R, ALBERT) that tokenize unlike their tokenizer.json
    tokenizer = TokenizerSpec.from_dir(model_dir)
    model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir), use_safetensors=True, trust_remote_code=False, dtype="float32")
    return QAEngine(TorchRunner(model, quantize=quantize), tokenizer, quantize=quantize, **options)


class TorchRunner:
    """An ``AutoModelForQuestionAnswering`` through torch (``quantize="int8"``: dynamic int8)."""

    def __init__(self, model: Any, *, quantize: str = "none") -> None:
        import inspect

        import torch

        self.model = quantize_model(model.eval(), quantize)
        accepted = inspect.signature(model.forward).parameters
        self.input_names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted)
        if getattr(model.config, "type_vocab_size", 2) < 2:
            # one token type or none (RoBERTa, XLM-R, DeBERTa-v3): type 1 of the context would index
            # past the embedding (IndexError) or be ignored; the model is fed what it was trained on
            self.input_names = tuple(n for n in self.input_names if n != "token_type_ids")
        self._torch = torch

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            output = self.model(**{name: torch.from_numpy(array) for name, array in inputs.items()})
        return output.start_logits.float().numpy(), output.end_logits.float().numpy()


def quantize_model(model: Any, quantize: str) -> Any:
    """Dynamic int8 quantization of the Linear layers, in place (no second copy of the weights).

    Scores may move slightly against fp32; answers rarely change.
    """
    if quantize == "none":
        return model
    if quantize != "int8":
        raise ValueError(f"unknown quantization {quantize!r}")
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic is deprecated in torch 2.13 but present
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
