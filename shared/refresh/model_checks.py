"""What can be served, decided from a source's small files before any weight is copied; the id a
local source is stored under; and the checked source isolation copies from.

A model is refused in one line when transformers does not know its type, when it is generative,
when its checkpoint has no question-answering head (a base or classification model, whose span
head would be random), when its tokenizer's ids run past its embedding, or when it has no
``tokenizer.json`` and its slow tokenizer cannot be converted. A model that ships only its slow
tokenizer gets a ``tokenizer.json`` derived once here (:mod:`shared.engine.tokenizer_conversion`),
stored in the version as a file the manifest marks derived, so serving never converts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from ..engine.tokenizer_conversion import TOKENIZER_SOURCE_FILES, derive_tokenizer_json
from ..errors import InputError, SettingsError, UnsafeModelError
from ..settings import parse_model_id
from ..store.model_files import FileEntry, check_config, is_convertible
from .weights_conversion import WeightsConversion

log = logging.getLogger(__name__)

_SMALL_FILES = ("config.json", "tokenizer.json", *TOKENIZER_SOURCE_FILES)
_SMALL_LIMIT = 64 << 20  # a SentencePiece model of a large multilingual vocabulary is a few MB
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSeq2SeqLM")


def check_servable(files: Mapping[str, bytes | bytearray], *, where: str) -> None:
    """Refuse a model this app cannot serve, from its ``config.json`` (and tokenizer files).

    Raises:
        UnsafeModelError: one line saying what the model is and what is needed instead.
    """
    from transformers import CONFIG_MAPPING, MODEL_FOR_QUESTION_ANSWERING_MAPPING, __version__

    try:
        config = json.loads(bytes(files["config.json"]))
        assert isinstance(config, dict)
    except (KeyError, ValueError, AssertionError) as err:
        raise UnsafeModelError(f"{where}: config.json is missing or not a JSON object") from err
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UnsafeModelError(
            f"{where}: model type {model_type!r} is not known to transformers {__version__} (the version this app pins); "
            "it cannot be served (remote code is never run)"
        )
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    qa_heads = [a for a in architectures if a.endswith("ForQuestionAnswering")]
    if architectures and not qa_heads:
        generative = [a for a in architectures if a.endswith(_GENERATIVE_SUFFIXES)]
        kind = "a generative model" if generative else "not an extractive question-answering checkpoint"
        raise UnsafeModelError(
            f"{where}: {kind} ({', '.join(architectures)}): it has no question-answering head, so its answers would come "
            "from random weights; pick a checkpoint fine-tuned for extractive QA (architectures ...ForQuestionAnswering)"
        )
    config_class = CONFIG_MAPPING[model_type]
    if config_class not in MODEL_FOR_QUESTION_ANSWERING_MAPPING:
        raise UnsafeModelError(f"{where}: transformers {__version__} has no question-answering model for model type {model_type!r}")
    check_vocabulary(files, config, where=where)


def local_model_id(read_config: Callable[[], bytes], *, given: str | None, where: str, name: str) -> str:
    """The model id a local source (a folder, a container) is stored and reported under.

    ``given`` (``--model-id``) when there is one; else the Hub id ``config.json`` names in
    ``_name_or_path`` (``owner/name``, not a path on the machine that saved it); else a refusal.
    ``MODEL_ID`` is never used: a model stored under another model's id would be served and
    reported as that model.

    Args:
        read_config: reads the source's ``config.json`` (called only when ``given`` is ``None``).
        given: ``--model-id``, or ``None``.
        where: the source, for messages ("folder /x", "container c").
        name: a short name of the source, for the example id of the message (``local/NAME``).

    Raises:
        SettingsError: ``given`` is not a valid model id.
        UnsafeModelError: config.json is not a JSON object.
        InputError: no id given and config.json names none; the message says what to pass.
    """
    if given is not None:
        return parse_model_id("--model-id", given, given)
    named = check_config(read_config(), where=f"in {where}").get("_name_or_path")
    if isinstance(named, str) and is_hub_id(named):
        return named.strip()
    example = "local/" + (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "model")
    what = "names no model"
    if isinstance(named, str) and named.strip():  # a path on the machine that saved it, or an id without its owner
        what = f"names no model by a Hub id owner/name (its _name_or_path is {named.strip()!r})"
    raise InputError(f"{where}: config.json {what}: pass --model-id ID (for example {example}) to say which model it is")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a Hub model id of the ``owner/name`` form (not a local path)."""
    value = text.strip()
    if value.count("/") != 1 or value.startswith((".", "~")) or value.endswith("/"):
        return False
    try:
        parse_model_id("_name_or_path", value, value)
    except SettingsError:
        return False
    return True


def check_vocabulary(files: Mapping[str, bytes | bytearray], config: Mapping[str, Any], *, where: str) -> None:
    """A tokenizer whose ids reach past the embedding fails on the first such token (IndexError)."""
    rows = config.get("vocab_size")
    raw = files.get("tokenizer.json")
    if not isinstance(rows, int) or raw is None:
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_str(bytes(raw).decode("utf-8")).get_vocab_size(with_added_tokens=True)
    except Exception as err:
        raise UnsafeModelError(f"{where}: tokenizer.json cannot be read ({type(err).__name__})") from err
    if size > rows:
        raise UnsafeModelError(
            f"{where}: the tokenizer has {size} tokens but the model's embedding has {rows} rows (vocab_size): "
            "the tokenizer does not belong to these weights"
        )


class CheckedSource:
    """A source whose snapshot is checked (:func:`check_servable`), completed with a derived
    ``tokenizer.json`` when it has none, and whose PyTorch weights (``pytorch_model.bin``, or its
    shards) are converted to safetensors (:mod:`shared.refresh.weights_conversion`), before
    isolation copies anything."""

    def __init__(self, source: Any) -> None:
        """``source``: an :class:`shared.refresh.isolation.Source` (typed loosely: isolation imports this module)."""
        self.source = source
        self._checked: Any = None
        self._snapshot: Any = None
        self._derived: dict[str, bytes] = {}
        self._config = b""
        self._conversion: WeightsConversion | None = None
        self._converted: set[str] = set()

    def revision(self) -> str:
        return self.source.revision()

    def check(self) -> Any:
        """The snapshot checked from its small files (a derived ``tokenizer.json`` included), before
        any weight is read: the quick refusals, for a command to give before it touches storage."""
        if self._checked is None:
            self._checked = self._check(self.source.snapshot())
        return self._checked

    def snapshot(self) -> Any:
        """The checked snapshot with PyTorch weights converted (read, checked against the model
        class and hashed here; refusals before anything is copied)."""
        if self._snapshot is None:
            self._snapshot = self._convert(self.check())
        return self._snapshot

    def open(self, entry: FileEntry) -> Iterator[bytes]:
        if entry.name in self._derived:
            yield self._derived[entry.name]
            return
        if self._conversion is not None and entry.name in self._converted:
            yield from self._conversion.open(entry)
            return
        yield from self.source.open(entry)

    def release(self) -> None:
        """Free the converted weights still in memory (isolation calls it once the files are staged)."""
        if self._conversion is not None:
            self._conversion.release()

    def _check(self, snapshot: Any) -> Any:
        where = _where(snapshot)
        small = {entry.name: self._read(entry) for entry in snapshot.files if entry.name in _SMALL_FILES and entry.size <= _SMALL_LIMIT}
        self._config = small.get("config.json", b"")
        if "tokenizer.json" in small:
            check_servable(small, where=where)
            return snapshot
        derived = derive_tokenizer_json(small)
        small["tokenizer.json"] = derived.data
        check_servable(small, where=where)
        self._derived["tokenizer.json"] = derived.data
        entry = FileEntry(name="tokenizer.json", size=len(derived.data), sha256=hashlib.sha256(derived.data).hexdigest())
        log.info("Derived tokenizer.json from %s with %s (%s)", ", ".join(derived.sources), derived.converter, derived.library)
        files = tuple(sorted((*snapshot.files, entry), key=lambda e: e.name))
        return replace(snapshot, files=files, derived={**snapshot.derived, "tokenizer.json": derived.describe()})

    def _convert(self, snapshot: Any) -> Any:
        if not any(is_convertible(entry.name) for entry in snapshot.files):
            return snapshot
        where = _where(snapshot)
        conversion = WeightsConversion(snapshot.files, self.source.open, self._config, where=where)
        self._conversion = conversion
        converted, derived = conversion.convert()
        self._converted = {entry.name for entry in converted}
        kept = [entry for entry in snapshot.files if not is_convertible(entry.name)]
        return replace(snapshot, files=tuple(sorted((*kept, *converted), key=lambda e: e.name)), derived={**snapshot.derived, **derived})

    def _read(self, entry: FileEntry) -> bytes:
        return b"".join(self.source.open(entry))


def _where(snapshot: Any) -> str:
    """The source as messages name it: its label, else its kind and revision."""
    return snapshot.label or f"{snapshot.source} {snapshot.source_revision or snapshot.revision}"
