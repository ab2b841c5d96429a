"""What a stored model version is made of: allowed file names, the manifest and the pointer.

File names come from storage and from the Hub, so they are checked here before anything builds
a local path or a blob name from them.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, UnsafeModelError
from .records import seal, shape_error, unseal

FORMAT_VERSION = 1
TASK = "question-answering"
POINTER_REPAIR = "python -m shared repair (rewrites current.json from its history), or python -m shared rollback --to REVISION"

ALLOWED_NAMES = frozenset(
    {
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "spiece.model",
        "spm.model",
        "sentencepiece.bpe.model",
        "added_tokens.json",
    }
)
# files a tokenizer is read from, or converted from at isolation (DeBERTa-v3 ships only spm.model)
_TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.txt", "vocab.json", "spm.model", "spiece.model", "sentencepiece.bpe.model")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.pkl", "*.pickle")
# PyTorch weights isolation converts to safetensors (shared.refresh.weights_conversion) when a
# source has no safetensors; never stored in a version, and refused everywhere else
PYTORCH_WEIGHTS = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
_PYTORCH_SHARD_RE = re.compile(r"^pytorch_model-\d{5}-of-\d{5}\.bin$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REVISION_RE = re.compile(r"^([0-9a-f]{40}|local-[0-9a-f]{16})$")


def check_file_name(name: object) -> str:
    """Return ``name`` if it is a plain file name, else raise.

    A name from a manifest or a Hub listing becomes a local path and a blob name: it must not
    be empty, contain a separator, be ``.``/``..``, start with a drive or be absolute.

    Raises:
        IntegrityError: the name is unsafe.
    """
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise IntegrityError(f"Unsafe file name in model files: {name!r}")
    if "\x00" in name or ":" in name or name.startswith("~") or len(name) > 200:
        raise IntegrityError(f"Unsafe file name in model files: {name!r}")
    return name


def check_revision(revision: object) -> str:
    """Return ``revision`` if it is a 40-hex commit or ``local-`` + 16 hex, else raise."""
    if not isinstance(revision, str) or not _REVISION_RE.match(revision):
        raise IntegrityError(f"Not a valid stored revision: {revision!r}")
    return revision


def is_allowed(name: str) -> bool:
    """Whether a file belongs in an isolated version (weights as safetensors, config, tokenizer)."""
    return name in ALLOWED_NAMES or (name.endswith(".safetensors") and "/" not in name)


def is_convertible(name: str) -> bool:
    """Whether a file is PyTorch weights that isolation converts to safetensors (``pytorch_model.bin``,
    its shards ``pytorch_model-00001-of-00002.bin`` or their index)."""
    return name in (PYTORCH_WEIGHTS, PYTORCH_INDEX) or bool(_PYTORCH_SHARD_RE.match(name))


def is_pickle(name: str) -> bool:
    """Whether a file holds pickle-based weights, which are never loaded."""
    return any(fnmatch.fnmatch(name.lower(), pattern) for pattern in PICKLE_PATTERNS)


MODEL_FILES_NEEDED = (
    "a model folder needs config.json, the weights as *.safetensors, and the tokenizer "
    "(tokenizer.json, or vocab.txt / vocab.json with tokenizer_config.json)"
)


def check_config(raw: bytes, *, where: str) -> dict[str, Any]:
    """``config.json``'s object, or an :class:`UnsafeModelError` that says it is not valid JSON
    (a truncated download, a damaged copy) or not an object; ``where`` names the source."""
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise UnsafeModelError(f"config.json {where} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise UnsafeModelError(
            f"config.json {where} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): truncated or damaged?"
        ) from None
    if not isinstance(data, dict):
        raise UnsafeModelError(f"config.json {where} is not a JSON object")
    return data


def select_files(names: list[str], *, where: str, convert: bool = False) -> list[str]:
    """Pick the allowed files of a model source, refusing one with no safetensors weights.

    Args:
        names: every file name the source has (top level only; sub-folders are ignored).
        where: the source, for messages ("folder /x", "repo a/b@c").
        convert: the caller converts PyTorch weights (isolation): a source without safetensors but
            with ``pytorch_model.bin`` (or its index and shards) gets those picked too, for
            :mod:`shared.refresh.weights_conversion`; any other pickle is still refused.

    Raises:
        UnsafeModelError: no safetensors weights (nor convertible ones) or no config.json; the
            message lists what is there.
    """
    top_level = [n for n in names if "/" not in n]
    chosen = sorted(n for n in top_level if is_allowed(n))
    if not chosen and not any(is_pickle(n) for n in top_level):
        found = f"it has only {', '.join(sorted(top_level)[:5])}" if top_level else "it is empty"
        raise UnsafeModelError(f"{where} is not a model folder ({found}); {MODEL_FILES_NEEDED}")
    if not any(n.endswith(".safetensors") for n in chosen):
        weights = _convertible_weights(top_level) if convert else []
        if not weights:
            pickles = sorted(n for n in top_level if is_pickle(n))
            found = ", ".join(pickles) if pickles else "no weights"
            how = (
                "only safetensors are isolated, and a pytorch_model.bin (or its index and shards) is converted to them; "
                "any other pickle, TensorFlow or Flax weights are not"
                if convert
                else "only safetensors are loaded"
            )
            raise UnsafeModelError(
                f"{where} has no safetensors weights (found {found}); {how}. Convert the weights to safetensors or pick a revision "
                "that has them."
            )
        chosen = sorted([*chosen, *weights])
    if "config.json" not in chosen:
        raise UnsafeModelError(f"{where} has no config.json")
    if not any(n in chosen for n in _TOKENIZER_VOCABULARIES):
        raise UnsafeModelError(f"{where} has no tokenizer files ({', '.join(_TOKENIZER_VOCABULARIES)})")
    return chosen


def _convertible_weights(names: list[str]) -> list[str]:
    """``pytorch_model.bin`` alone, else the index and the shards, else nothing."""
    if PYTORCH_WEIGHTS in names:
        return [PYTORCH_WEIGHTS]
    if PYTORCH_INDEX in names:
        return [PYTORCH_INDEX, *(n for n in names if _PYTORCH_SHARD_RE.match(n))]
    return []


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: its name, size in bytes and sha256 (hex)."""

    name: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        check_file_name(self.name)
        if not isinstance(self.size, int) or self.size < 0:
            raise IntegrityError(f"Bad size for {self.name!r}: {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256):
            raise IntegrityError(f"Bad sha256 for {self.name!r}")


def hash_file(path: Path) -> str:
    """sha256 (hex) of a local file, read in blocks."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that matter for reading a version back."""
    found = {}
    for dist in ("transformers", "tokenizers", "safetensors", "torch", "huggingface_hub", "azure-storage-blob"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def utc_now(*, precise: bool = False) -> str:
    """The current UTC time as ISO 8601 with seconds (``precise``: microseconds)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds" if precise else "seconds")


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a version; its presence marks the version complete."""

    model_id: str
    revision: str
    source: str
    files: tuple[FileEntry, ...]
    isolated_at: str = field(default_factory=lambda: utc_now(precise=True))  # orders rollbacks
    source_revision: str | None = None
    task: str = TASK
    libraries: dict[str, str] = field(default_factory=library_versions)
    format: int = FORMAT_VERSION
    # files made at isolation rather than copied (a tokenizer.json converted from the slow
    # tokenizer's files): name -> {"from": [source files], "by": "transformers X.Y.Z", ...}
    derived: dict[str, dict[str, Any]] = field(default_factory=dict)
    # "passed": the staged version answered the canary before it was published; "skipped": published
    # without (--skip-canary); "" for manifests written before this was recorded
    canary: str = ""
    # where the files were read (empty for the Hub, whose source and commit name them): for a
    # container {"kind": "blob", "account", "endpoint", "container", "prefix",
    # "blobs": {name: {"etag", "last_modified", "size"}}}; never a key or a SAS token
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_json(self) -> bytes:
        """The sealed record (:mod:`shared.store.records`)."""
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        return seal(data, kind="manifest")

    @classmethod
    def from_json(cls, raw: bytes, *, revision: str, repair: str = "") -> Manifest:
        """Parse and check a manifest read from storage (``repair``: the command that rewrites it).

        Raises:
            RecordDamagedError: not the manifest of ``revision`` (damaged bytes, a checksum that does
                not match, another shape, another revision, unsafe or duplicate file names).
        """
        record = f"manifest.json of version {revision}"
        repair = repair or version_repair(revision)
        data = unseal(raw, kind="manifest", record=record, repair=repair).data
        try:
            files = tuple(FileEntry(name=f["name"], size=f["size"], sha256=f["sha256"]) for f in data["files"])
            manifest = cls(
                model_id=str(data["model_id"]),
                revision=check_revision(data["revision"]),
                source=str(data["source"]),
                files=files,
                isolated_at=str(data["isolated_at"]),
                source_revision=data.get("source_revision"),
                task=str(data.get("task", TASK)),
                libraries=dict(data.get("libraries", {})),
                format=int(data.get("format", FORMAT_VERSION)),
                derived={str(name): dict(facts) for name, facts in data.get("derived", {}).items()},
                canary=str(data.get("canary", "")),
                provenance=dict(data.get("provenance", {})),
            )
        except (ValueError, KeyError, TypeError, AttributeError, IntegrityError) as err:
            what = err.message if isinstance(err, IntegrityError) else "it is not a manifest (a field is missing or of the wrong type)"
            raise shape_error(record, repair, what) from None
        if manifest.revision != revision:
            raise shape_error(record, repair, f"it names revision {manifest.revision}")
        if not set(manifest.derived) <= {f.name for f in files}:
            raise shape_error(record, repair, "it marks a file derived that it does not list")
        if len({f.name for f in files}) != len(files):
            raise shape_error(record, repair, "it lists a file twice")
        for entry in files:
            if not is_allowed(entry.name):
                raise shape_error(record, repair, f"it lists a file that is not allowed: {entry.name!r}")
        return manifest


def version_repair(
    revision: str,
    source: str | None = None,
    source_revision: str | None = None,
    *,
    model_id: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> str:
    """The command that rewrites a version's files and manifest from where it came: the Hub at its
    commit, the local folder, or the container it was adopted from (``source``: the manifest's, when
    known; else guessed from the revision's form). With the manifest's ``model_id`` and
    ``provenance``, the command names them (a local source is stored under the id it is given)."""
    named = f" --model-id {model_id}" if model_id else ""
    if source == "blob":
        where = provenance or {}
        if not where.get("container"):
            return "python -m shared adopt --repair (with the --container and --prefix it was adopted from)"
        prefix = f" --prefix {str(where['prefix']).rstrip('/')}" if where.get("prefix") else ""
        return (
            f"python -m shared adopt --repair --container {where['container']}{prefix}{named} "
            f"(from account {where.get('account', '?')}: AZURE_STORAGE_CONNECTION_STRING or --account-url)"
        )
    if source == "local" or (source is None and revision.startswith("local-")):
        return (
            f"python -m shared isolate --repair --from-dir DIR{named} (the folder it was isolated from), "
            "or python -m shared adopt --repair for an adopted container"
        )
    return f"python -m shared isolate --repair --revision {source_revision or revision}"


@dataclass(frozen=True)
class Pointer:
    """``current.json``: the served revision, earlier ones (newest first) and the pin."""

    model_id: str
    revision: str
    previous: tuple[str, ...] = ()
    pinned: bool = False
    updated_at: str = field(default_factory=utc_now)
    etag: str | None = field(default=None, compare=False)

    def to_json(self) -> bytes:
        """The sealed record (:mod:`shared.store.records`)."""
        data: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "model_id": self.model_id,
            "revision": self.revision,
            "previous": list(self.previous),
            "pinned": self.pinned,
            "updated_at": self.updated_at,
        }
        return seal(data, kind="pointer")

    @classmethod
    def from_json(cls, raw: bytes, *, etag: str | None, record: str = "current.json") -> Pointer:
        """Parse and check ``current.json`` (or one of its history entries, ``record``).

        Raises:
            RecordDamagedError: damaged bytes, a checksum that does not match, or another shape.
        """
        data = unseal(raw, kind="pointer", record=record, repair=POINTER_REPAIR).data
        try:
            previous = data["previous"]  # every pointer this app wrote has both
            if not isinstance(previous, list) or not isinstance(data["pinned"], bool) or "files" in data:
                raise TypeError("previous or pinned")
            return cls(
                model_id=str(data["model_id"]),
                revision=check_revision(data["revision"]),
                previous=tuple(check_revision(r) for r in previous),
                pinned=data["pinned"],
                updated_at=str(data.get("updated_at", "")),
                etag=etag,
            )
        except (ValueError, KeyError, TypeError, AttributeError, IntegrityError):
            raise shape_error(record, POINTER_REPAIR, "it is not a pointer (a field is missing or of the wrong type)") from None

    def moved_to(self, revision: str, *, pinned: bool, history: int = 20) -> Pointer:
        """A new pointer at ``revision`` with this one's revision first in ``previous``."""
        earlier = [self.revision, *self.previous]
        previous = tuple(r for r in dict.fromkeys(earlier) if r != revision)[:history]
        return Pointer(model_id=self.model_id, revision=revision, previous=previous, pinned=pinned)
