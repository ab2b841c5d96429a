"""Extractive question answering on ``AutoModelForQuestionAnswering`` and a fast tokenizer.

transformers 5.3 removed ``pipeline("question-answering")``; this engine gives the answers the
transformers 4.57.6 ``QuestionAnsweringPipeline`` gave with a fast tokenizer and its defaults
(``max_seq_len`` 384, ``doc_stride`` 128, ``align_to_words``): the same windows, masking, span
search, word alignment and merging of identical answers found in several windows. It differs in
how the work runs: the windows of every item of a request go through the model in runs grouped by
length (``batch_windows``: a fixed count, or ``auto`` for this CPU), and it is safe to call from
many threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import DeadlineExceededError, InputError, TooLargeError
from ..settings import MAX_ANSWER_LEN, MAX_TOP_K, MIN_ANSWER_LEN, MIN_TOP_K, Limits
from ..wire import Param, to_json, wire_field
from .batching import AUTO, BatchWindows, plan_runs
from .word_pattern import WORD

log = logging.getLogger(__name__)

_MASKED = -10000.0

SCORE_DESCRIPTION = (
    "the span's score as the transformers 4.57.6 question-answering pipeline computes it: its probability "
    "(start times end, softmax over the window) in each window that found it, summed over the overlapping "
    "windows of a long context that found the same span, so it can exceed 1. Not a percentage: compare the "
    "scores of one answer list with each other"
)


@dataclass(frozen=True)
class QAItem:
    """One question over one context, with the pipeline's per-call options: the engine's input, and
    the ``AskItem`` of ``/api/ask`` and of each line of ``python -m shared answer`` (one shape: the
    request validator builds it from a body that passed the schema made from these fields)."""

    question: str = wire_field(
        "at most {max_question_chars} characters and {max_question_tokens} tokens, with at least one letter or digit (`pattern`)",
        schema={"minLength": 1, "maxLength": Param("max_question_chars"), "pattern": WORD},
    )
    context: str = wire_field(
        "at most {max_context_chars} characters, with at least one letter or digit (`pattern`)",
        schema={"minLength": 1, "maxLength": Param("max_context_chars"), "pattern": WORD},
    )
    top_k: int = wire_field(default=1, optional=True, schema={"minimum": MIN_TOP_K, "maximum": MAX_TOP_K})
    max_answer_len: int = wire_field(
        "longest answer, in tokens", default=15, optional=True, schema={"minimum": MIN_ANSWER_LEN, "maximum": MAX_ANSWER_LEN}
    )
    handle_impossible_answer: bool = wire_field(default=False, optional=True)


def decode_utf8(raw: bytes, *, what: str, field: str | None = None) -> str:
    """``raw`` as UTF-8 text (a leading BOM dropped), else an :class:`InputError` that says what it
    looks like instead: a lone surrogate is what Python makes of such bytes, not what the user has.
    UTF-16 (or UTF-32) is named only when the bytes show it (a byte order mark, or NUL bytes in every
    other position); 8-bit text is named as Latin-1 or Windows-1252; anything else is "not UTF-8".

    Raises:
        InputError: ``{what} is not UTF-8 (...)``.
    """
    wide = wide_encoding(raw)
    if wide is not None:
        how = f"convert it to UTF-8, e.g. iconv -f {wide} -t UTF-8"
        raise InputError(f"{what} is not UTF-8 (looks like {wide}); {how}", field=field)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        byte = f"byte 0x{raw[err.start]:02X} at offset {err.start}"
        if not any(b in _CONTROL_BYTES for b in raw):
            how = "convert it to UTF-8, e.g. iconv -f WINDOWS-1252 -t UTF-8"
            raise InputError(f"{what} is not UTF-8 (looks like Latin-1 or Windows-1252: {byte}); {how}", field=field) from None
        raise InputError(f"{what} is not UTF-8 ({byte}); it does not look like text", field=field) from None
    if "\x00" in text:  # valid UTF-8, but no text has NUL characters
        raise InputError(f"{what} is not UTF-8 text (a NUL byte at offset {raw.index(0)})", field=field)
    return text


# bytes that 8-bit text does not have (tab, line feed, form feed and carriage return aside)
_CONTROL_BYTES = frozenset(range(0x20)) - {0x09, 0x0A, 0x0C, 0x0D}


def wide_encoding(raw: bytes) -> str | None:
    """``"UTF-16"`` or ``"UTF-32"`` when ``raw`` shows it (a byte order mark, or NUL bytes in every
    other position, as text of mostly Latin letters has in UTF-16 without one), else ``None``."""
    if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    head = raw[:4096]
    units = len(head) // 2
    if units == 0:
        return None
    nuls = sorted((head[0::2].count(0), head[1::2].count(0)))
    return "UTF-16" if nuls[1] >= 2 and nuls[1] * 2 >= units and nuls[0] * 16 <= units else None


def check_text(value: str, field: str) -> None:
    """JSON can carry lone UTF-16 surrogates (``"\\ud800"``); no tokenizer can read them.

    Raises:
        InputError: naming ``field`` and the surrogate.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f"'{field}' is not valid Unicode text: a lone surrogate (U+{ord(value[err.start]):04X}) at character {err.start}",
            field=field,
        ) from None


@dataclass(frozen=True)
class Answer:
    """A span of the context: its text, probability and character offsets (``end`` exclusive)."""

    answer: str = wire_field("the span of the context")
    score: float = wire_field(SCORE_DESCRIPTION, schema={"minimum": 0})
    start: int = wire_field("offset of the first character, in Unicode code points (not UTF-16 units)", schema={"minimum": 0})
    end: int = wire_field("offset after the last character, in Unicode code points", schema={"minimum": 0})

    def to_dict(self) -> dict[str, Any]:
        return to_json(self)


@dataclass(frozen=True)
class TokenizerSpec:
    """What the engine needs of a fast tokenizer: the Rust tokenizer and a few facts.

    Build it from a transformers tokenizer (:meth:`from_transformers`) or straight from the
    bytes of ``tokenizer.json`` and ``tokenizer_config.json`` (:meth:`from_files`), which needs
    no file on disk.
    """

    backend: Any  # tokenizers.Tokenizer
    model_max_length: int
    cls_token_id: int | None
    pad_token_id: int | None
    input_names: tuple[str, ...]

    @classmethod
    def from_transformers(cls, tokenizer: Any) -> TokenizerSpec:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the QA engine needs a fast tokenizer (tokenizer.json)")
        return cls(
            backend=tokenizer.backend_tokenizer,
            model_max_length=int(min(tokenizer.model_max_length, 1 << 30)),
            cls_token_id=tokenizer.cls_token_id,
            pad_token_id=tokenizer.pad_token_id,
            input_names=tuple(tokenizer.model_input_names),
        )

    @classmethod
    def from_files(
        cls,
        tokenizer_json: bytes | bytearray,
        tokenizer_config: bytes | bytearray | None,
        special_tokens_map: bytes | bytearray | None = None,
    ) -> TokenizerSpec:
        """Read the spec from file contents, as ``AutoTokenizer`` would resolve it."""
        import json

        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(bytes(tokenizer_json).decode("utf-8"))
        config = json.loads(bytes(tokenizer_config)) if tokenizer_config else {}
        specials = json.loads(bytes(special_tokens_map)) if special_tokens_map else {}
        tokenizer_class = _tokenizer_class(config.get("tokenizer_class"))

        def token_id(name: str) -> int | None:
            token = config.get(name, specials.get(name))
            if token is None and tokenizer_class is not None:
                import inspect

                parameter = inspect.signature(tokenizer_class.__init__).parameters.get(name)
                token = parameter.default if parameter is not None and parameter.default is not inspect.Parameter.empty else None
            if isinstance(token, dict):
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        input_names = tuple(getattr(tokenizer_class, "model_input_names", ("input_ids", "token_type_ids", "attention_mask")))
        max_length = config.get("model_max_length")
        return cls(
            backend=backend,
            model_max_length=int(max_length) if isinstance(max_length, (int, float)) and max_length < (1 << 30) else 1 << 30,
            cls_token_id=token_id("cls_token"),
            pad_token_id=token_id("pad_token"),
            input_names=input_names,
        )

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> TokenizerSpec:
        """Read the spec from a model folder's files; without ``tokenizer.json``, one is converted
        from the slow tokenizer's files (:mod:`shared.engine.tokenizer_conversion`).

        Raises:
            UnsafeModelError: no tokenizer.json and the slow files cannot be converted.
        """
        from .tokenizer_conversion import TOKENIZER_SOURCE_FILES, derive_tokenizer_json

        folder = Path(model_dir)
        names = ("tokenizer.json", "config.json", *TOKENIZER_SOURCE_FILES)
        files = {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}
        tokenizer_json = files.get("tokenizer.json") or derive_tokenizer_json(files).data
        return cls.from_files(tokenizer_json, files.get("tokenizer_config.json"), files.get("special_tokens_map.json"))


def _tokenizer_class(name: object) -> Any:
    if not isinstance(name, str) or not name:
        return None
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        return tokenizer_class_from_name(name) or tokenizer_class_from_name(name.removesuffix("Fast"))
    except (ImportError, ValueError, AttributeError):
        return None


@dataclass
class _Window:
    item: int
    encoding: Any  # tokenizers.Encoding
    p_mask: np.ndarray


def decode_spans(
    start: np.ndarray, end: np.ndarray, topk: int, max_answer_len: int, undesired_tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``topk`` best (start, end) pairs with ``start <= end < start + max_answer_len``.

    Same operations as transformers 4.57.6 ``decode_spans`` (so ties resolve the same way), with
    two fixes that change no answer the pipeline gets right: ``topk`` equal to the number of
    candidates sorts them all (the pipeline's ``argpartition`` raises there), and candidates that
    are not spans (end before start, too long, or starting on CLS: score exactly 0) are dropped
    instead of being returned as empty or made-up answers when ``topk`` exceeds the real spans.
    """
    if start.ndim == 1:
        start = start[None]
    if end.ndim == 1:
        end = end[None]
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = np.array([np.argmax(scores_flat)])
    elif len(scores_flat) <= topk:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    desired_spans = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    desired_spans &= scores_flat[idx_sort] > 0  # 0: masked by triu/tril or the CLS start, not a span
    starts = starts[desired_spans]
    ends = ends[desired_spans]
    scores = candidates[0, starts, ends]
    return starts, ends, scores


def select_starts_ends(
    start: np.ndarray,
    end: np.ndarray,
    p_mask: np.ndarray,
    min_null_score: float,
    top_k: int,
    handle_impossible_answer: bool,
    max_answer_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Softmax over the context tokens (and CLS) of one window, then the best spans.

    ``start`` and ``end`` are float32 logits of shape (1, window length), unpadded.
    """
    undesired_tokens = np.abs(p_mask - 1)
    undesired_tokens_mask = undesired_tokens == 0.0
    start = np.where(undesired_tokens_mask, np.float32(_MASKED), start)
    end = np.where(undesired_tokens_mask, np.float32(_MASKED), end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0
    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score


def _char_span(encoding: Any, s: int, e: int) -> tuple[int, int]:
    """Character span of tokens ``s..e`` widened to whole words of the context (``align_to_words``);
    tokens without a word (CLS) fall back to their offsets, as the pipeline does."""
    start_word = encoding.token_to_word(s)
    end_word = encoding.token_to_word(e)
    if start_word is not None and end_word is not None:
        start_chars = encoding.word_to_chars(start_word, sequence_index=1)
        end_chars = encoding.word_to_chars(end_word, sequence_index=1)
        if start_chars is not None and end_chars is not None:
            return start_chars[0], end_chars[1]
    return encoding.offsets[s][0], encoding.offsets[e][1]


@runtime_checkable
class Runner(Protocol):
    """The model call of :class:`QAEngine`: one padded batch of windows in, logits out.

    ``input_names`` are the inputs the model takes, among ``input_ids``, ``attention_mask`` and
    ``token_type_ids``; a call gets int64 arrays of shape (batch, width) for those names and
    returns float32 ``start_logits`` and ``end_logits`` of the same shape. A runner must be safe
    to call from several threads at once.
    """

    input_names: tuple[str, ...]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]: ...


class QAEngine:
    """Answers questions with one loaded model; thread safe.

    Args:
        model: the :class:`Runner` of a model (torch: :class:`shared.engine.torch_model.TorchRunner`;
            ONNX Runtime: :class:`shared.engine.onnx_runner.OnnxRunner`).
        tokenizer: its fast tokenizer, as a :class:`TokenizerSpec`.
        limits: the request limits; the engine enforces those that need its tokenizer (question
            tokens, windows), the request validator the others.
        batch_windows: windows per forward pass, or ``"auto"``: runs bounded in tokens for this
            CPU (:mod:`shared.engine.batching`).
        quantize: what the runner computes in (``none`` or ``int8``), as reported.
        max_seq_len, doc_stride: window geometry (pipeline defaults: 384 and 128).
    """

    def __init__(
        self,
        model: Runner,
        tokenizer: TokenizerSpec,
        *,
        limits: Limits | None = None,
        batch_windows: BatchWindows = AUTO,
        quantize: str = "none",
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        self.runner: Runner = model
        self.quantize = quantize
        self.limits = limits or Limits()
        plan_runs((), batch_windows)  # a bad value fails here, not at the first request
        self.batch_windows = batch_windows
        self.max_seq_len = max_seq_len or min(tokenizer.model_max_length, 384)
        self.doc_stride = doc_stride or min(self.max_seq_len // 2, 128)
        # token_type_ids follow the model (the torch model's forward, the ONNX record), not the tokenizer class:
        # transformers 5 dropped them from ALBERT's model_input_names, which 4.57.6 passed
        self.input_names = [n for n in self.runner.input_names if n in tokenizer.input_names or n == "token_type_ids"]
        self.cls_token_id = tokenizer.cls_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # A private copy of the Rust tokenizer with truncation set once: encode() then never
        # mutates shared state, so threads can tokenize at once.
        serialized = tokenizer.backend.to_str()
        self._windowing = Tokenizer.from_str(serialized)
        self._windowing.no_padding()
        self._windowing.enable_truncation(self.max_seq_len, stride=self.doc_stride, strategy="only_second", direction="right")
        self._questions = Tokenizer.from_str(serialized)
        self._questions.no_padding()
        self._questions.no_truncation()

    # --- answering --------------------------------------------------------------------------

    def answer(self, items: Sequence[QAItem], *, deadline: float | None = None, stats: dict[str, int] | None = None) -> list[list[Answer]]:
        """Answer every item; each gets its ``top_k`` answers, best first.

        Args:
            items: the questions.
            deadline: a ``time.monotonic()`` value after which work stops.
            stats: if given, receives ``windows``: the model windows the items took.

        Raises:
            InputError, TooLargeError: an item has no word the model reads, or is over the tokens or
                windows limit (the limits without a tokenizer are the request validator's); nothing was run.
            DeadlineExceededError: the deadline passed between forward passes.
        """
        windows = self._windows(items)
        if stats is not None:
            stats["windows"] = len(windows)
        logits = self._run(windows, deadline)
        return [self._postprocess(items[i], [(w, logits[k]) for k, w in enumerate(windows) if w.item == i]) for i in range(len(items))]

    def _windows(self, items: Sequence[QAItem]) -> list[_Window]:
        windows: list[_Window] = []
        for index, item in enumerate(items):
            where = f"items[{index}]." if len(items) > 1 else ""
            question_tokens = len(self._safe_encode(self._questions, item.question, None, where, add_special_tokens=False).ids)
            if question_tokens == 0:
                raise InputError(f"'{where}question' has no words the model can read", field=where + "question")
            if question_tokens > self.limits.max_question_tokens:
                raise TooLargeError(
                    f"'{where}question' has {question_tokens} tokens; the limit is {self.limits.says('max_question_tokens')}",
                    field=where + "question",
                )
            encoding = self._safe_encode(self._windowing, item.question, item.context, where)
            if 1 not in encoding.sequence_ids:
                raise InputError(f"'{where}context' has no words the model can read", field=where + "context")
            for enc in [encoding, *encoding.overflowing]:
                windows.append(_Window(item=index, encoding=enc, p_mask=self._p_mask(enc)))
            if len(windows) > self.limits.max_windows:
                setting = Limits.setting("max_windows")
                raise TooLargeError(
                    f"the request needs more than {self.limits.max_windows} windows of {self.max_seq_len} tokens ({setting}); "
                    "send shorter contexts or fewer items",
                    field="context" if len(items) == 1 else "items",
                )
        return windows

    def _safe_encode(self, tokenizer: Any, question: str, context: str | None, where: str, **kwargs: Any) -> Any:
        try:
            return tokenizer.encode(question, context, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - tokenizers raises pyo3 PanicException (a BaseException)
            log.info("Tokenizer refused an input: %s", type(err).__name__)
            raise InputError(
                f"'{where}question' is too long to leave room for the context in a {self.max_seq_len}-token window",
                field=where + "question",
            ) from None

    def _p_mask(self, enc: Any) -> np.ndarray:
        # 1 where a token cannot be part of the answer: everything but the context, except CLS
        p_mask = np.array([0 if seq == 1 else 1 for seq in enc.sequence_ids], dtype=np.int64)
        if self.cls_token_id is not None:
            p_mask[np.asarray(enc.ids) == self.cls_token_id] = 0
        return p_mask

    def _run(self, windows: list[_Window], deadline: float | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Logits of every window, in the windows' order. Windows are grouped into runs by length
        (:func:`~shared.engine.batching.plan_runs`) so that a run pads as little as possible; each
        window's logits are cut back to its own length."""
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(windows)
        for batch in plan_runs([len(w.encoding.ids) for w in windows], self.batch_windows):
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceededError("The request ran out of time; send a shorter context or fewer questions")
            width = max(len(windows[k].encoding.ids) for k in batch)
            ids = np.full((len(batch), width), self.pad_token_id, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            types = np.zeros((len(batch), width), dtype=np.int64)
            for row, k in enumerate(batch):
                encoding = windows[k].encoding
                n = len(encoding.ids)
                ids[row, :n] = encoding.ids
                mask[row, :n] = 1
                types[row, :n] = encoding.type_ids
            arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            start, end = self.runner({name: arrays[name] for name in self.input_names})
            for row, k in enumerate(batch):
                n = len(windows[k].encoding.ids)
                results[k] = (start[row : row + 1, :n], end[row : row + 1, :n])
        return [r for r in results if r is not None]

    def _postprocess(self, item: QAItem, outputs: list[tuple[_Window, tuple[np.ndarray, np.ndarray]]]) -> list[Answer]:
        min_null_score = 1000000.0
        answers: list[dict[str, Any]] = []
        by_text: dict[str, dict[str, Any]] = {}
        pre_topk = item.top_k * 2 + 10
        for window, (start, end) in outputs:
            starts, ends, scores, min_null_score = select_starts_ends(
                start, end, window.p_mask, min_null_score, pre_topk, item.handle_impossible_answer, item.max_answer_len
            )
            for s, e, score in zip(starts, ends, scores, strict=True):
                start_index, end_index = _char_span(window.encoding, int(s), int(e))
                text = item.context[start_index:end_index]
                key = text.lower()
                found = by_text.get(key)
                if found is not None:
                    found["score"] += score.item()
                else:
                    entry = {"score": score.item(), "start": start_index, "end": end_index, "answer": text}
                    by_text[key] = entry
                    answers.append(entry)
        if item.handle_impossible_answer:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        best = sorted(answers, key=lambda a: a["score"], reverse=True)[: item.top_k]
        return [Answer(answer=a["answer"], score=float(a["score"]), start=a["start"], end=a["end"]) for a in best]
