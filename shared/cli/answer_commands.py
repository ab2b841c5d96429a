"""Commands that answer questions: ``ask`` (the stored current version, through the function's own
holder) and ``answer`` (JSON lines against a local model folder)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from ..engine.question_answering import decode_utf8
from ..errors import QAError
from ..serving.shapes import Answers
from ..settings import MAX_TOP_K, Settings, variant_for
from ..wire import to_json, wire_field
from .common import Add, argv_text, count, nonempty

LOAD_PATIENCE_SECONDS = 900  # a bert-large load from a slow link; a load that fails ends the wait at once


def cmd_ask(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """One question through the same check, holder and loader as the function."""
    import time

    from ..errors import ModelNotReadyError, StorageUnavailableError
    from ..loading.onnx_artifacts import load_artifact
    from ..serving import api
    from ..serving.holder import ModelHolder
    from ..serving.validation import check_ask

    question = argv_text(args.question, "--question")
    context = argv_text(args.context, "--context") if args.context_file is None else _read_text(args.context_file, "--context-file")
    items, _ = check_ask(settings.limits, {"question": question, "context": context, "top_k": args.top_k})
    holder = ModelHolder(lambda: settings, artifact_loader=load_artifact)
    try:
        holder.wait_loaded(LOAD_PATIENCE_SECONDS)  # a terminal waits for the load; the deadline is the answer's
        response = api.answer(holder, items, batch=False, deadline=time.monotonic() + settings.deadline_seconds)
    except ModelNotReadyError as err:
        # the function's 503 points operators at GET /api/model; here the cause is at hand
        failure = holder.last_failure
        if failure is None:
            raise
        if isinstance(failure, StorageUnavailableError):
            raise failure from err  # its own class: a refused key is not an outage
        raise ModelNotReadyError(f"The model could not be loaded: {failure.message}") from err
    finally:
        holder.close()
    body = response.body
    answers = body.get("answers") or [body]
    lines = [f"{a['answer']!r} (score {a['score']:.4f}, characters {a['start']}-{a['end']})" for a in answers]
    lines.append(f"model: {body['model_id']}@{body['revision']}")
    return 0, body, "\n".join(lines)


def _read_text(path: str, flag: str) -> str:
    """A UTF-8 text file, or standard input for ``-``; an error names the flag and the file."""
    from pathlib import Path

    from ..errors import NotFoundError

    if path == "-":
        return decode_utf8(sys.stdin.buffer.read(), what=f"{flag} - (standard input)")
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise NotFoundError(f"{flag} {path} cannot be read ({err.strerror})") from None
    return decode_utf8(raw, what=f"{flag} {path}")


@dataclass(frozen=True)
class BatchAnswers:
    """``answer``'s output line for an input line that is a batch (``{"items": [...]}``)."""

    results: tuple[Answers, ...] = wire_field("one per item, in order")


def cmd_answer(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """JSON lines of questions on stdin (each a body ``/api/ask`` takes, checked by the same
    :func:`~shared.serving.validation.check_ask`), one JSON line per input line on stdout: its
    answers, or its error. Exit 1 when any line failed (the summary counts them)."""
    import time

    from ..engine.question_answering import Answer, QAItem, wide_encoding
    from ..engine.torch_model import engine_from_dir
    from ..serving.validation import check_ask, parse_json_object

    check_model_dir(args.model_dir)
    quantize = args.quantize or settings.quantize
    if args.backend == "onnx":
        engine = _onnx_engine_from_dir(args.model_dir, quantize, settings)
    else:
        engine = engine_from_dir(args.model_dir, quantize=quantize, limits=settings.limits, batch_windows=settings.batch_windows)
    began = time.monotonic()
    counts = {"answered": 0, "failed": 0}
    Question = tuple[list[QAItem], bool]  # a line's items, and whether it was a batch

    def output(answers: list[list[Answer]], batch: bool) -> dict[str, Any]:
        lines = [Answers(tuple(a)) for a in answers]
        return to_json(BatchAnswers(tuple(lines)) if batch else lines[0])

    def answer_all(questions: list[Question]) -> list[dict[str, Any]]:
        try:
            answers = engine.answer([item for items, _ in questions for item in items])
        except QAError as err:
            if len(questions) == 1:
                return [to_json(err.body())]
            return [line for question in questions for line in answer_all([question])]  # one bad line must not fail the others
        out, start = [], 0
        for items, batch in questions:
            out.append(output(answers[start : start + len(items)], batch))
            start += len(items)
        return out

    def flush(pending: list[Question | dict[str, Any]]) -> None:
        questions = [p for p in pending if isinstance(p, tuple)]
        answered = iter(answer_all(questions) if questions else [])
        for slot in pending:  # output lines keep the order of the input lines
            line = next(answered) if isinstance(slot, tuple) else slot
            counts["failed" if "error" in line else "answered"] += 1
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")

    pending: list[Question | dict[str, Any]] = []
    for number, raw_bytes in enumerate(sys.stdin.buffer, start=1):  # bytes: UTF-8 whatever the locale says
        if number == 1 and wide_encoding(raw_bytes):
            decode_utf8(raw_bytes, what="the input")  # UTF-16: the whole input is unreadable, one error says so
        if not raw_bytes.strip():
            continue
        try:
            pending.append(check_ask(settings.limits, parse_json_object(raw_bytes, what=f"line {number}")))
        except QAError as err:
            pending.append(to_json(err.body()))
        if sum(len(p[0]) for p in pending if isinstance(p, tuple)) >= args.batch:
            flush(pending)
            pending = []
    flush(pending)
    sys.stdout.flush()
    seconds = time.monotonic() - began
    summary = {**counts, "seconds": round(seconds, 3)}
    return (1 if counts["failed"] else 0), summary, f"answered {counts['answered']}, failed {counts['failed']} in {seconds:.1f}s"


def _onnx_engine_from_dir(folder: str, quantize: str, settings: Settings) -> Any:
    """Build the folder's ONNX artifact in memory (no file written), then serve it as the app would."""
    from pathlib import Path

    from ..engine.onnx_runner import default_threads, onnx_engine
    from ..refresh.onnx_export import build_onnx

    variant = variant_for(quantize)
    artifact = build_onnx(Path(folder), variant, progress=lambda line: print(line, file=sys.stderr))
    tokenizer_files = {
        path.name: bytearray(path.read_bytes())
        for path in Path(folder).iterdir()
        if path.is_file() and path.name.startswith(("tokenizer", "special_tokens"))
    }
    return onnx_engine(
        artifact.files,
        artifact.record,
        tokenizer_files,
        limits=settings.limits,
        batch_windows=settings.batch_windows,
        threads=default_threads(settings.threads, 1),
    )


def check_model_dir(folder: str) -> None:
    """A local model folder the engine can load, or a clear error (never a Hub download).

    Raises:
        NotFoundError: the folder does not exist (or is not a folder).
        UnsafeModelError: it is empty, has no config, no tokenizer, or only pickle weights, or its
            config.json is not a JSON object.
        IntegrityError: a safetensors file is malformed (the message isolating it would give).
    """
    from pathlib import Path

    from ..engine.torch_model import check_safetensors_file
    from ..errors import NotFoundError
    from ..store.model_files import check_config, select_files

    path = Path(folder)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise NotFoundError(f"--model-dir {folder} {what}; give a local model folder (config.json, *.safetensors, tokenizer files)")
    chosen = select_files([p.name for p in path.iterdir() if p.is_file()], where=f"folder {folder}")
    check_config((path / "config.json").read_bytes(), where=f"in folder {folder}")
    for name in chosen:
        if name.endswith(".safetensors"):
            check_safetensors_file(path / name)


def add_parsers(add: Add) -> None:
    """Register this module's commands (``add`` makes a sub-parser with ``--json``)."""
    ask = add("ask", cmd_ask, "answer one question with the current model version in Blob Storage (as the function does)")
    ask.add_argument("--question", required=True)
    given = ask.add_mutually_exclusive_group(required=True)
    given.add_argument("--context")
    given.add_argument(
        "--context-file", metavar="FILE", type=nonempty, help="read the context from a UTF-8 text file; - reads standard input"
    )
    ask.add_argument("--top-k", type=count(1, MAX_TOP_K), default=1, help=f"answers to return (1-{MAX_TOP_K})")

    answer = add(
        "answer",
        cmd_answer,
        "Read JSON lines on stdin, each a body /api/ask takes ({question, context, top_k?, max_answer_len?, "
        "handle_impossible_answer?} or {items: [...]}), checked as /api/ask checks it; write one JSON line per input line on "
        "stdout: {answers: [...]}, {results: [{answers: [...]}, ...]} or {error: {...}} (with --json, a summary object last). "
        "Exit 1 when any line failed. Only a local folder: it never contacts the Hub.",
    )
    answer.add_argument("--model-dir", required=True, type=nonempty, help="a local model folder (safetensors, config, tokenizer)")
    answer.add_argument("--quantize", choices=("none", "int8"), help="default: QA_QUANTIZE")
    answer.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="torch (default): the safetensors through torch; onnx: export the folder to the ONNX artifact in memory first "
        "(int8 with --quantize int8), then answer with ONNX Runtime as the app serves it",
    )
    answer.add_argument(
        "--batch", type=count(1, 1024), default=1, help="items per engine call, 1-1024 (windows still batch per QA_BATCH_WINDOWS)"
    )
    answer.set_defaults(stream=True)
