"""A ``tokenizer.json`` for a model that ships only its slow tokenizer's files.

Several popular QA repositories (DeBERTa-v3 and its SQuAD fine-tunes, some ALBERT and ELECTRA
ones) have a SentencePiece model or a ``vocab.txt`` and no ``tokenizer.json``. The QA engine
reads ``tokenizer.json`` alone, so this module converts the slow files once, with the converter
class of the pinned transformers (``SLOW_TO_FAST_CONVERTERS``, the code transformers 4.57.6 runs
when it loads such a model as a fast tokenizer). It needs ``protobuf`` to read a SentencePiece
model, never the ``sentencepiece`` library: the converter reads only the model's protobuf, and
the few facts it asks of a slow tokenizer (lower-casing, special-token ids) come from
``tokenizer_config.json`` and the class defaults. Isolation stores the result in the version
as a derived file, so serving reads a ``tokenizer.json`` like any other.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UnsafeModelError

# SentencePiece models by the names transformers' tokenizer classes give them
SENTENCEPIECE_FILES = ("spm.model", "spiece.model", "sentencepiece.bpe.model")
TOKENIZER_SOURCE_FILES = (*SENTENCEPIECE_FILES, "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class DerivedTokenizer:
    """A converted ``tokenizer.json`` and what it was made from (for the version's manifest)."""

    data: bytes
    sources: tuple[str, ...]
    tokenizer_class: str
    converter: str
    library: str  # "transformers X.Y.Z"

    def describe(self) -> dict[str, Any]:
        return {"from": list(self.sources), "tokenizer_class": self.tokenizer_class, "converter": self.converter, "by": self.library}


def tokenizer_class_name(files: Mapping[str, bytes | bytearray]) -> str | None:
    """The slow tokenizer class the files name (``tokenizer_config.json``, else the model type's default)."""
    name = _json(files, "tokenizer_config.json").get("tokenizer_class")
    if isinstance(name, str) and name:
        return name.removesuffix("Fast")
    model_type = _json(files, "config.json").get("model_type")
    if not isinstance(model_type, str):
        return None
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    found: Any = TOKENIZER_MAPPING_NAMES.get(model_type)
    if isinstance(found, (tuple, list)):
        found = next((n for n in found if n), None)
    return found.removesuffix("Fast") if isinstance(found, str) else None


def derive_tokenizer_json(files: Mapping[str, bytes | bytearray]) -> DerivedTokenizer:
    """Convert the slow tokenizer files among ``files`` (name -> bytes) to a ``tokenizer.json``.

    Raises:
        UnsafeModelError: no converter for the tokenizer class, or the files it needs are
            missing or unreadable; the message names the files found and the files needed.
    """
    import transformers
    from transformers.convert_slow_tokenizer import SLOW_TO_FAST_CONVERTERS, BertConverter, SpmConverter

    found = ", ".join(sorted(n for n in files if n in TOKENIZER_SOURCE_FILES)) or "none"
    class_name = tokenizer_class_name(files)
    converter_class = SLOW_TO_FAST_CONVERTERS.get(class_name or "")
    if converter_class is None or not issubclass(converter_class, (SpmConverter, BertConverter)):
        raise UnsafeModelError(
            f"the model has no tokenizer.json and its tokenizer ({class_name or 'class not named'}) cannot be converted to one "
            f"(tokenizer files found: {found}); the engine needs tokenizer.json: save the tokenizer with "
            "tokenizer.save_pretrained() (a fast tokenizer) and isolate that folder"
        )
    config = _json(files, "tokenizer_config.json")
    specials_map = _json(files, "special_tokens_map.json")
    options = _slow_options(class_name or "", config, specials_map)
    sources: list[str] = []
    converter: Any
    try:
        with tempfile.TemporaryDirectory(prefix="qa-tokenizer-") as folder:
            if issubclass(converter_class, SpmConverter):
                model_file = next((n for n in SENTENCEPIECE_FILES if n in files), None)
                if model_file is None:
                    raise UnsafeModelError(
                        f"the model has no tokenizer.json and {class_name} needs its SentencePiece model "
                        f"({' or '.join(SENTENCEPIECE_FILES)}) to make one; tokenizer files found: {found}"
                    )
                path = Path(folder, model_file)
                path.write_bytes(bytes(files[model_file]))
                sources.append(model_file)
                slow = _SlowTokenizer(class_name or "", options, vocab_file=str(path))
                converter = converter_class(slow)
                slow.ids = {piece: index for index, (piece, _score) in enumerate(converter.vocab(converter.proto))}
            else:
                if "vocab.txt" not in files:
                    raise UnsafeModelError(
                        f"the model has no tokenizer.json and {class_name} needs vocab.txt to make one; tokenizer files found: {found}"
                    )
                sources.append("vocab.txt")
                tokens = bytes(files["vocab.txt"]).decode("utf-8").splitlines()
                slow = _SlowTokenizer(class_name or "", options, vocab={token: index for index, token in enumerate(tokens)})
                converter = converter_class(slow)
            tokenizer = converter.converted()
    except UnsafeModelError:
        raise
    except Exception as err:
        raise UnsafeModelError(
            f"the model has no tokenizer.json and its {class_name} files could not be converted to one "
            f"({type(err).__name__}); tokenizer files found: {found}"
        ) from err
    sources += [name for name in ("tokenizer_config.json", "special_tokens_map.json") if name in files]
    _add_special_tokens(tokenizer, config, specials_map, _json(files, "added_tokens.json"), found)
    if "added_tokens.json" in files:
        sources.append("added_tokens.json")
    return DerivedTokenizer(
        data=tokenizer.to_str().encode("utf-8"),
        sources=tuple(sources),
        tokenizer_class=class_name or "",
        converter=converter_class.__name__,
        library=f"transformers {transformers.__version__}",
    )


class _SlowTokenizer:
    """The facts a converter reads of a slow tokenizer instance, without loading one (which would
    need the ``sentencepiece`` library)."""

    def __init__(self, class_name: str, options: dict[str, Any], *, vocab_file: str | None = None, vocab: dict[str, int] | None = None):
        self.__dict__.update(options)
        self.class_name = class_name
        self.vocab_file = vocab_file
        self.vocab = vocab or {}
        self.ids: dict[str, int] = dict(self.vocab)
        self.basic_tokenizer = _BasicTokenizer(
            do_lower_case=bool(options.get("do_lower_case", True)),
            tokenize_chinese_chars=bool(options.get("tokenize_chinese_chars", True)),
            strip_accents=options.get("strip_accents"),
        )

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.ids.get(str(token))

    def __getattr__(self, name: str) -> Any:
        if name.endswith("_token_id"):  # cls_token_id, sep_token_id, ...
            return self.ids.get(str(self.__dict__.get(name.removesuffix("_id"))))
        raise AttributeError(name)


@dataclass(frozen=True)
class _BasicTokenizer:
    do_lower_case: bool
    tokenize_chinese_chars: bool
    strip_accents: Any


def _slow_options(class_name: str, config: Mapping[str, Any], specials_map: Mapping[str, Any]) -> dict[str, Any]:
    """The slow tokenizer's settings: its class's defaults, overridden by ``tokenizer_config.json``."""
    options: dict[str, Any] = {}
    cls = _tokenizer_class(class_name)
    if cls is not None:
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                options[name] = parameter.default
    options.update({key: value for key, value in config.items() if not isinstance(value, (dict, list))})
    for name in _SPECIAL_TOKENS:
        value = config.get(name, specials_map.get(name, options.get(name)))
        options[name] = value.get("content") if isinstance(value, dict) else value
    return options


def _add_special_tokens(
    tokenizer: Any, config: Mapping[str, Any], specials_map: Mapping[str, Any], added: Mapping[str, Any], found: str
) -> None:
    """Add the special and added tokens as transformers' fast tokenizer does when it converts, so
    that ``[MASK]`` or ``<s>`` in a text are matched whole, at the ids the slow tokenizer gives them."""
    from tokenizers import AddedToken

    specials = []
    for name in _SPECIAL_TOKENS:
        raw = config.get(name, specials_map.get(name))
        if isinstance(raw, dict) and isinstance(raw.get("content"), str):
            specials.append(
                AddedToken(
                    raw["content"],
                    single_word=bool(raw.get("single_word", False)),
                    lstrip=bool(raw.get("lstrip", False)),
                    rstrip=bool(raw.get("rstrip", False)),
                    normalized=bool(raw.get("normalized", False)),
                    special=True,
                )
            )
        elif isinstance(raw, str):
            specials.append(AddedToken(raw, normalized=False, special=True))
    special_names = {token.content for token in specials}
    for content, index in sorted(added.items(), key=lambda item: int(item[1])):
        if tokenizer.token_to_id(content) is None:
            tokenizer.add_tokens([AddedToken(content, normalized=False, special=content in special_names)])
        if tokenizer.token_to_id(content) != int(index):
            raise UnsafeModelError(
                f"added_tokens.json gives {content!r} id {index} but the converted vocabulary puts it at "
                f"{tokenizer.token_to_id(content)}; tokenizer files found: {found}"
            )
    tokenizer.add_special_tokens(specials)


def _tokenizer_class(name: str) -> Any:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        return tokenizer_class_from_name(name) or tokenizer_class_from_name(f"{name}Fast")
    except (ImportError, ValueError, AttributeError):
        return None


def _json(files: Mapping[str, bytes | bytearray], name: str) -> dict[str, Any]:
    raw = files.get(name)
    if not raw:
        return {}
    try:
        data = json.loads(bytes(raw))
    except ValueError as err:
        raise UnsafeModelError(f"{name} is not valid JSON") from err
    return data if isinstance(data, dict) else {}
