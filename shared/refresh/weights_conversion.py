"""PyTorch weights (``pytorch_model.bin``, or its shards) converted to safetensors at isolation.

Many extractive QA models still ship only ``pytorch_model.bin``: a pickle, which can run any code
when it is loaded. A version never holds one. Isolation reads it with torch's restricted
unpickler (``torch.load(weights_only=True)``: tensors and plain containers only, never a class
or a function of the checkpoint's choosing), so a pickle that needs code is refused, naming what
it asked for. Every tensor is then checked against the model class the config names, built on
the meta device (no memory): each parameter the class expects must be there with its shape;
tensors it does not use (a pooler, an old ``position_ids`` buffer) are left out.

Memory: the ``.bin`` streams from the source into an anonymous in-memory file (``memfd``: no
disk, which Flex Consumption barely has) while its sha256 is checked, and ``torch.load(mmap=True)``
maps its tensors over those pages (no second copy). The safetensors bytes (header, then each
tensor's bytes straight from the mapping) are produced twice as a stream, never held whole: once
to learn the converted file's size and sha256 before anything is copied (the version's file list
needs them), once into the upload. So one shard (the whole ``.bin`` of an unsharded model) is in
memory at a time, from the conversion until it is uploaded; a legacy (pre-zip) pickle cannot be
mapped and is read into tensors, then the in-memory file is freed (about twice the shard's size
while it loads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import IntegrityError, UnsafeModelError
from ..store.model_files import PYTORCH_INDEX, PYTORCH_WEIGHTS, FileEntry, is_convertible

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
_CHUNK = 8 << 20
_INDEX_LIMIT = 64 << 20
_DTYPES = {  # torch dtype name -> safetensors dtype
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
_LEGACY_NAMES = ((".gamma", ".weight"), (".beta", ".bias"))  # LayerNorm names of the oldest checkpoints, renamed as transformers does

Opener = Callable[[FileEntry], Iterator[bytes]]


def target_name(source: str) -> str:
    """The safetensors file a PyTorch weights file becomes (``pytorch_model-00001-of-00002.bin`` ->
    ``model-00001-of-00002.safetensors``)."""
    return "model" + source.removeprefix("pytorch_model").removesuffix(".bin") + ".safetensors"


@dataclass
class _Shard:
    source: FileEntry
    target: FileEntry | None = None
    kept: list[str] = field(default_factory=list)  # the checkpoint's names of the tensors written
    dropped: list[str] = field(default_factory=list)  # tensors the model class does not have
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint name -> name written


class _Loaded:
    """One ``.bin`` in an anonymous in-memory file, its tensors mapped over it."""

    def __init__(self, tensors: dict[str, Any], memory: Any) -> None:
        self.tensors = tensors
        self._memory = memory

    def close(self) -> None:
        self.tensors = {}
        if self._memory is not None:
            self._memory.close()
            self._memory = None


class WeightsConversion:
    """Converts the PyTorch weights among ``files`` (``pytorch_model.bin``, or the index and its
    shards) to safetensors, read from ``open``.

    :meth:`convert` reads, checks and hashes them (the refusals are raised there, before anything
    is copied) and says which files replace them; :meth:`open` then streams a converted file;
    :meth:`release` frees what is still in memory.

    Args:
        files: the source's files (sizes and sha256 as the source gave them).
        open: reads one of them.
        config: the model's ``config.json``.
        where: the source, for messages.
    """

    def __init__(self, files: tuple[FileEntry, ...], open: Opener, config: bytes | bytearray, *, where: str) -> None:
        self._files = {entry.name: entry for entry in files}
        self._open = open
        self._config = bytes(config)
        self._where = where
        self._shards: list[_Shard] = []
        self._loaded: tuple[str, _Loaded] | None = None
        self._index: bytes | None = None

    @property
    def sources(self) -> list[str]:
        """The source files converted (never stored in the version)."""
        return sorted(name for name in self._files if is_convertible(name))

    # --- the conversion pass ------------------------------------------------------------------

    def convert(self) -> tuple[list[FileEntry], dict[str, dict[str, Any]]]:
        """Read, check and hash the conversion.

        Returns:
            The converted files (the safetensors files, and their index when sharded) and, per
            converted file, what the manifest records of it (``derived``).

        Raises:
            UnsafeModelError: a pickle that needs code, not a PyTorch checkpoint, a tensor of another
                shape than the model class's, a parameter it needs missing, a bad index.
            IntegrityError: the bytes read differ from the sha256 the source gave.
        """
        import torch
        import transformers

        began = time.monotonic()
        model_class, expected, tied = self._expected_tensors()
        self._shards = [_Shard(self._files[name]) for name in self._shard_names()]
        seen: dict[str, str] = {}  # tensor name written -> the shard it is in
        for shard in self._shards:
            self._convert_shard(shard, expected, seen)
            if shard is not self._shards[-1]:
                self._unload()  # one shard in memory at a time; the last one stays for the upload that follows
        missing = sorted(set(expected) - set(seen) - tied)
        if missing:
            self._unload()
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UnsafeModelError(
                f"{self._where}: the PyTorch weights lack {len(missing)} tensor(s) that {model_class} needs ({shown}): "
                "its answers would come from random weights"
            )
        how = {"by": f"torch {torch.__version__} weights_only", "checked_with": f"transformers {transformers.__version__} ({model_class})"}
        converted: list[FileEntry] = []
        derived: dict[str, dict[str, Any]] = {}
        for shard in self._shards:
            assert shard.target is not None
            converted.append(shard.target)
            facts = {
                "from": [shard.source.name],
                "from_sha256": {shard.source.name: shard.source.sha256},
                **how,
                "tensors": len(shard.kept),
            }
            derived[shard.target.name] = {
                **facts,
                **({"dropped": shard.dropped} if shard.dropped else {}),  # tensors the model class does not use
                **({"renamed": dict(sorted(shard.renamed.items()))} if shard.renamed else {}),
            }
        if len(self._shards) > 1:
            self._index = self._safetensors_index()
            entry = FileEntry(name=SAFETENSORS_INDEX, size=len(self._index), sha256=hashlib.sha256(self._index).hexdigest())
            converted.append(entry)
            sources = [PYTORCH_INDEX, *(shard.source.name for shard in self._shards)]
            derived[SAFETENSORS_INDEX] = {"from": sources, "from_sha256": {name: self._files[name].sha256 for name in sources}, **how}
        log.info(
            "Converted %s to %s with torch's restricted unpickler, %d tensors checked against %s, in %.1fs",
            ", ".join(shard.source.name for shard in self._shards),
            ", ".join(entry.name for entry in converted),
            len(seen),
            model_class,
            time.monotonic() - began,
        )
        return converted, derived

    def _convert_shard(self, shard: _Shard, expected: Mapping[str, tuple[int, ...]], seen: dict[str, str]) -> None:
        """Check one shard's tensors and hash its safetensors file (the shard stays loaded)."""
        loaded = self._load(shard.source)
        for name in sorted(loaded.tensors):
            shape, written = tuple(loaded.tensors[name].shape), _expected_name(name, expected)
            if written is None:
                shard.dropped.append(name)
                continue
            if written in seen:
                raise UnsafeModelError(f"{self._where}: tensor {written!r} is in both {seen[written]} and {shard.source.name}")
            if shape != expected[written]:
                raise UnsafeModelError(
                    f"{self._where}: {shard.source.name} holds {name} of shape {list(shape)}, but the model class the config names "
                    f"expects {list(expected[written])}: these weights do not belong to this config.json"
                )
            _dtype(name, loaded.tensors[name], where=self._where)
            seen[written] = shard.source.name
            shard.kept.append(name)
            if written != name:
                shard.renamed[name] = written
        size, digest = 0, hashlib.sha256()
        for chunk in self._serialize(shard, loaded):
            size += len(chunk)
            digest.update(chunk)
        shard.target = FileEntry(name=target_name(shard.source.name), size=size, sha256=digest.hexdigest())

    def open(self, entry: FileEntry) -> Iterator[bytes]:
        """The bytes of a converted file, streamed again from the (re-read if freed) PyTorch weights."""
        if entry.name == SAFETENSORS_INDEX and self._index is not None:
            yield self._index
            return
        shard = next((s for s in self._shards if s.target is not None and s.target.name == entry.name), None)
        if shard is None:
            raise KeyError(entry.name)
        try:
            loaded = self._load(shard.source)
            yield from self._serialize(shard, loaded)
        finally:
            self._unload()  # uploaded (or failed): a repair reads the source again

    def release(self) -> None:
        """Free the PyTorch weights still in memory (the last shard converted, when its upload was not needed)."""
        self._unload()

    # --- reading a .bin -----------------------------------------------------------------------

    def _shard_names(self) -> list[str]:
        if PYTORCH_WEIGHTS in self._files:
            return [PYTORCH_WEIGHTS]
        raw = b"".join(self._open(self._files[PYTORCH_INDEX]))
        try:
            index = json.loads(raw)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("no weight_map")
            names = sorted({str(v) for v in weight_map.values()})
        except (ValueError, KeyError, TypeError) as err:
            raise UnsafeModelError(f"{self._where}: {PYTORCH_INDEX} is not an index of weight files ({err})") from None
        unknown = [n for n in names if not is_convertible(n) or n == PYTORCH_INDEX]
        if unknown:
            raise UnsafeModelError(
                f"{self._where}: {PYTORCH_INDEX} names files that are not PyTorch weight shards: {', '.join(unknown[:3])}"
            )
        absent = [n for n in names if n not in self._files]
        if absent:
            raise UnsafeModelError(f"{self._where}: {PYTORCH_INDEX} names shards the source does not have: {', '.join(absent[:3])}")
        return names

    def _load(self, entry: FileEntry) -> _Loaded:
        if self._loaded is not None and self._loaded[0] == entry.name:
            return self._loaded[1]
        self._unload()
        memory = _AnonymousFile(entry.name)
        try:
            digest, size = hashlib.sha256(), 0
            for chunk in self._open(entry):
                digest.update(chunk)
                size += len(chunk)
                memory.write(chunk)
            if size != entry.size or digest.hexdigest() != entry.sha256:
                raise IntegrityError(
                    f"{entry.name} from {self._where} ({size} B, sha256 {digest.hexdigest()[:12]}...) differs from what the source "
                    f"said ({entry.size} B, sha256 {entry.sha256[:12]}...): it changed or was damaged in transit"
                )
            tensors = _restricted_load(memory, entry.name, where=self._where)
        except BaseException:
            memory.close()
            raise
        if not memory.mapped:
            memory.close()  # a legacy pickle was read into tensors of its own
            loaded = _Loaded(tensors, None)
        else:
            loaded = _Loaded(tensors, memory)
        self._loaded = (entry.name, loaded)
        return loaded

    def _unload(self) -> None:
        if self._loaded is not None:
            self._loaded[1].close()
            self._loaded = None

    # --- the model class ----------------------------------------------------------------------

    def _expected_tensors(self) -> tuple[str, dict[str, tuple[int, ...]], set[str]]:
        """The model class's name, the name -> shape of every tensor it saves, and the names it ties
        to another (which a checkpoint may leave out), from a model built on the meta device."""
        import torch
        from transformers.utils import logging as hf_logging

        from ..engine.torch_model import question_answering_config

        model_class, config, _ = question_answering_config({"config.json": self._config})
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                model = model_class(config)
        finally:
            hf_logging.set_verbosity(verbosity)
        expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        return model_class.__name__, expected, set(tied)

    # --- writing safetensors ------------------------------------------------------------------

    def _serialize(self, shard: _Shard, loaded: _Loaded) -> Iterator[bytes]:
        """The safetensors file of the shard's kept tensors: header, then each tensor's bytes, in
        the order of the header's offsets (the same bytes each time)."""
        import torch

        tensors = {shard.renamed.get(name, name): loaded.tensors[name] for name in shard.kept}
        order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))  # every tensor aligned to its item size
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in order:
            tensor = tensors[name]
            nbytes = tensor.numel() * tensor.element_size()
            header[name] = {
                "dtype": _dtype(name, tensor, where=self._where),
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        raw += b" " * (-len(raw) % 8)
        yield struct.pack("<Q", len(raw)) + raw
        for name in order:
            tensor = tensors[name].detach().contiguous()  # a copy only for a tensor that is a strided view
            if tensor.numel() == 0:
                continue
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            for begin in range(0, len(view), _CHUNK):
                yield bytes(view[begin : begin + _CHUNK])

    def _safetensors_index(self) -> bytes:
        weight_map = {
            shard.renamed.get(name, name): shard.target.name for shard in self._shards if shard.target is not None for name in shard.kept
        }
        total = sum(shard.target.size for shard in self._shards if shard.target is not None)
        return json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2).encode()


def _expected_name(name: str, expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """The name a checkpoint's tensor has in the model class, or ``None`` when the class has no such tensor."""
    if name in expected:
        return name
    for old, new in _LEGACY_NAMES:
        if name.endswith(old) and (renamed := name[: -len(old)] + new) in expected:
            return renamed
    return None


def _dtype(name: str, tensor: Any, *, where: str) -> str:
    import torch

    kind = str(tensor.dtype).removeprefix("torch.")
    if tensor.layout != torch.strided or tensor.is_quantized or kind not in _DTYPES:
        raise UnsafeModelError(
            f"{where}: tensor {name!r} is {kind} ({tensor.layout}): only dense tensors of plain number types are converted"
        )
    return _DTYPES[kind]


def _restricted_load(memory: _AnonymousFile, name: str, *, where: str) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of the file: a mapping of names to tensors, or a refusal
    that says why (a pickle that needs code is never run)."""
    import pickle

    import torch

    mapped = zipfile.is_zipfile(memory.path)
    try:
        loaded = torch.load(memory.path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as err:
        text = str(err)
        needed = re.search(r"GLOBAL ([\w.]+)", text)
        if needed:
            raise UnsafeModelError(
                f"{where}: {name} needs {needed.group(1)} to be unpickled, which torch's restricted unpickler refuses: it is not "
                "converted (code from a checkpoint never runs). Convert it to safetensors where you trust it, or pick a revision "
                "with model.safetensors"
            ) from None
        raise UnsafeModelError(f"{where}: {name} is not a PyTorch checkpoint that holds only weights ({_first_line(text)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError, AttributeError, IndexError, struct.error) as err:
        detail = _first_line(str(err)) if str(err) else type(err).__name__
        raise UnsafeModelError(f"{where}: {name} is not a readable PyTorch checkpoint ({detail})") from None
    memory.mapped = mapped
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise UnsafeModelError(f"{where}: {name} is not a state dict (a mapping of tensor names to tensors), so it is not converted")
    return dict(loaded)


def _first_line(text: str) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "no detail")
    return line if len(line) <= 160 else line[:157] + "..."


class _AnonymousFile:
    """A file in memory (``memfd`` on Linux: no disk) with a path torch can open and map; elsewhere
    a temporary file, removed on close."""

    def __init__(self, name: str) -> None:
        self.mapped = False
        self._temp: str | None = None
        if hasattr(os, "memfd_create"):
            self._fd = os.memfd_create(re.sub(r"[^\w.-]", "_", name), os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self._fd}"
        else:  # pragma: no cover - macOS, Windows
            self._fd, self._temp = tempfile.mkstemp(prefix=".convert-", suffix=".bin")
            self.path = self._temp

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view.nbytes:
            written = os.write(self._fd, view)
            view = view[written:]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._temp is not None:
            try:
                os.unlink(self._temp)
            except OSError:
                pass
            self._temp = None
