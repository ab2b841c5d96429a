"""Load a stored version into a :class:`~shared.question_answering.QAEngine`.

``memory`` mode streams each file from Blob into a buffer of its exact size, checking sha256
as the ranges arrive, and builds the model on tensors that *share* those buffers (safetensors
parsed in place, no copy, no file written): peak RSS is about the model size plus the runtime.
``disk`` mode keeps a verified copy under ``MODEL_CACHE_DIR/{revision}`` (written to a staging
folder, then renamed), re-hashed on every load and reused across restarts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IntegrityError, UnsafeModelError
from .isolation import hash_file
from .model_files import Manifest, check_file_name, utc_now
from .model_store import ModelStore
from .question_answering import Limits, QAEngine, TokenizerSpec
from .settings import Settings

log = logging.getLogger(__name__)

CACHE_MARKER = ".verified-manifest.json"
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
_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class LoadedModel:
    """An engine and where it came from."""

    engine: QAEngine
    model_id: str
    revision: str
    mode: str
    bytes: int
    load_seconds: float
    backend: str = "torch"
    variant: str = "fp32"
    loaded_at: str = field(default_factory=utc_now)

    def describe(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "mode": self.mode,
            "bytes": self.bytes,
            "load_seconds": round(self.load_seconds, 3),
            "loaded_at": self.loaded_at,
            "backend": self.backend,
            "variant": self.variant,
        }


def load_version(
    store: ModelStore,
    revision: str,
    settings: Settings,
    *,
    manifest: Manifest | None = None,
    mode: str | None = None,
) -> LoadedModel:
    """Load ``revision`` of ``store`` the way ``settings`` say (``MODEL_LOAD_MODE``).

    ``manifest`` loads a staged version before its manifest is published (the refresh's
    validation); ``mode`` overrides the load mode.

    Raises:
        NotFoundError: the version is not complete.
        IntegrityError: a file's bytes do not match the manifest.
        UnsafeModelError: the model cannot be served (no QA head, no safetensors).
        StorageUnavailableError: storage could not be read.
    """
    began = time.monotonic()
    manifest = manifest or store.require_manifest(revision)
    mode = mode or settings.load_mode
    options = {"limits": Limits.from_settings(settings), "batch_windows": settings.batch_windows}
    if mode == "disk":
        assert settings.cache_dir is not None
        folder = cached_version(store, manifest, Path(settings.cache_dir))
        engine = QAEngine.from_dir(folder, quantize=settings.quantize, **options)
    else:
        files = {entry.name: store.read_file(revision, entry) for entry in manifest.files}
        engine = engine_from_files(files, quantize=settings.quantize, **options)
    seconds = time.monotonic() - began
    log.info(
        "Loaded %s@%s (%s mode, %d bytes) in %.1fs, %.1f MB/s",
        manifest.model_id,
        revision,
        mode,
        manifest.total_bytes,
        seconds,
        manifest.total_bytes / max(seconds, 1e-6) / 1e6,
    )
    return LoadedModel(
        engine=engine,
        model_id=manifest.model_id,
        revision=revision,
        mode=mode,
        bytes=manifest.total_bytes,
        load_seconds=seconds,
        variant="int8" if settings.quantize == "int8" else "fp32",
    )


# --- memory mode -------------------------------------------------------------------------------


def safetensors_in_place(buffer: bytearray, *, name: str) -> dict[str, Any]:
    """Tensors over ``buffer`` (a whole ``.safetensors`` file) without copying their bytes.

    Raises:
        IntegrityError: the header is malformed or points outside the file.
    """
    import torch

    if len(buffer) < 8:
        raise IntegrityError(f"{name} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", bytes(buffer[:8]))
    if header_len > min(len(buffer) - 8, 100 << 20):
        raise IntegrityError(f"{name} has a malformed safetensors header")
    try:
        header = json.loads(bytes(buffer[8 : 8 + header_len]))
    except ValueError as err:
        raise IntegrityError(f"{name} has a malformed safetensors header") from err
    base = 8 + header_len
    tensors = {}
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
        if begin < 0 or end < begin or base + end > len(buffer) or count != _numel(shape):
            raise IntegrityError(f"{name}: tensor {key!r} points outside the file")
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif (base + begin) % itemsize:
            # misaligned (rare): this tensor alone is copied
            tensors[key] = torch.frombuffer(bytes(buffer[base + begin : base + end]), dtype=dtype).reshape(shape)
        else:
            tensors[key] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + begin).reshape(shape)
    return tensors


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def engine_from_files(files: Mapping[str, bytearray], *, quantize: str = "none", **options: Any) -> QAEngine:
    """Build the engine from file contents in memory (config, safetensors, tokenizer)."""
    return QAEngine(model_from_files(files), _tokenizer_spec(files), quantize=quantize, **options)


def model_from_files(files: Mapping[str, bytearray]) -> Any:
    """The fp32 ``AutoModelForQuestionAnswering`` of in-memory files; its tensors share the
    safetensors buffers (no copy), so those buffers live as long as the model."""
    import torch
    from transformers import CONFIG_MAPPING, MODEL_FOR_QUESTION_ANSWERING_MAPPING
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        config_dict = json.loads(bytes(files["config.json"]))
        model_type = config_dict["model_type"]
        config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    except (KeyError, ValueError) as err:
        raise UnsafeModelError("config.json has no known model_type for transformers") from err
    model_class: Any = MODEL_FOR_QUESTION_ANSWERING_MAPPING.get(type(config), None)
    if model_class is None:
        raise UnsafeModelError(f"transformers has no question-answering head for model type {model_type!r}")
    state_dict: dict[str, Any] = {}
    for name in sorted(files):
        if name.endswith(".safetensors"):
            state_dict.update(safetensors_in_place(files[name], name=name))
    if not state_dict:
        raise UnsafeModelError("the version has no safetensors weights")
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.float32)
    del state_dict
    return model.eval()


def _tokenizer_spec(files: Mapping[str, bytearray]) -> TokenizerSpec:
    if "tokenizer.json" in files:
        return TokenizerSpec.from_files(files["tokenizer.json"], files.get("tokenizer_config.json"), files.get("special_tokens_map.json"))
    # No tokenizer.json: transformers must convert the slow files; they are a few KB on temp disk.
    from transformers import AutoTokenizer

    log.info("No tokenizer.json in the version: converting the tokenizer from its vocabulary files")
    with tempfile.TemporaryDirectory(prefix="qa-tokenizer-") as folder:
        for name in _TOKENIZER_FILES:
            if name in files:
                Path(folder, check_file_name(name)).write_bytes(bytes(files[name]))
        Path(folder, "config.json").write_bytes(bytes(files["config.json"]))
        return TokenizerSpec.from_transformers(AutoTokenizer.from_pretrained(folder, trust_remote_code=False))


# --- disk mode ---------------------------------------------------------------------------------


def cached_version(store: ModelStore, manifest: Manifest, cache_dir: Path) -> Path:
    """The verified local copy of a version, downloaded into the cache if needed.

    Every load re-hashes the cached files against the manifest; a bad copy is deleted and
    downloaded again.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / manifest.revision
    if _cache_is_intact(final, manifest):
        log.info("Using the cached copy of %s at %s", manifest.revision, final)
        return final
    if final.exists():
        log.warning("Cached copy of %s is damaged or incomplete; downloading again", manifest.revision)
        shutil.rmtree(final, ignore_errors=True)
    staging = cache_dir / f".{manifest.revision}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        store.download_version(manifest.revision, staging)
        (staging / CACHE_MARKER).write_bytes(manifest.to_json())
        try:
            os.replace(staging, final)
        except OSError:  # another process finished first: use its copy
            if not _cache_is_intact(final, manifest):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _cache_is_intact(folder: Path, manifest: Manifest) -> bool:
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        if Manifest.from_json(marker.read_bytes(), revision=manifest.revision).files != manifest.files:
            return False
    except IntegrityError:
        return False
    for entry in manifest.files:
        path = folder / entry.name
        if not path.is_file() or path.stat().st_size != entry.size or hash_file(path) != entry.sha256:
            return False
    return True
