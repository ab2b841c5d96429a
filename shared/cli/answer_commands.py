"""Commands that answer questions: ``ask`` (the stored current version, through the function's own
holder) and ``answer`` (JSON lines against a local model folder)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..engine.question_answering import MAX_TOP_K
from ..errors import QAError
from ..settings import Settings, variant_for
from .common import Add, count


def cmd_ask(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """One question through the same holder and loader as the function."""
    from ..errors import ModelNotReadyError, StorageUnavailableError
    from ..loading.onnx_artifacts import load_artifact
    from ..serving import api
    from ..serving.holder import ModelHolder

    context = args.context if args.context_file is None else _read_text(args.context_file, "--context-file")
    holder = ModelHolder(lambda: settings, artifact_loader=load_artifact)
    item: dict[str, Any] = {"question": args.question, "context": context, "top_k": args.top_k}
    try:
        response = api.ask(holder, json.dumps(item).encode())
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

    from ..engine.question_answering import decode_utf8
    from ..errors import NotFoundError

    if path == "-":
        return decode_utf8(sys.stdin.buffer.read(), what=f"{flag} - (standard input)")
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise NotFoundError(f"{flag} {path} cannot be read ({err.strerror})") from None
    return decode_utf8(raw, what=f"{flag} {path}")


def cmd_answer(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """JSON lines of items on stdin, one JSON line of answers per item on stdout."""
    import time

    from ..engine.question_answering import Limits, QAItem, decode_utf8
    from ..engine.torch_model import engine_from_dir

    check_model_dir(args.model_dir)
    quantize = args.quantize or settings.quantize
    if args.backend == "onnx":
        engine = _onnx_engine_from_dir(args.model_dir, quantize, settings)
    else:
        engine = engine_from_dir(
            args.model_dir,
            quantize=quantize,
            limits=Limits.from_settings(settings),
            batch_windows=settings.batch_windows,
        )
    began = time.monotonic()
    counts = {"answered": 0, "failed": 0}

    def emit(line: dict[str, Any]) -> None:
        counts["failed" if "error" in line else "answered"] += 1
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")

    def error_line(err: QAError) -> dict[str, Any]:
        return {"error": {"code": err.code, "message": err.message}}

    def answer_all(items: list[QAItem]) -> list[dict[str, Any]]:
        try:
            return [{"answers": [a.to_dict() for a in answers]} for answers in engine.answer(items)]
        except QAError as err:
            if len(items) == 1:
                return [error_line(err)]
            return [line for single in items for line in answer_all([single])]  # one bad item must not fail the others

    def flush(pending: list[QAItem | dict[str, Any]]) -> None:
        items = [p for p in pending if isinstance(p, QAItem)]
        answered = iter(answer_all(items) if items else [])
        for slot in pending:  # output lines keep the order of the input lines
            emit(next(answered) if isinstance(slot, QAItem) else slot)

    pending: list[QAItem | dict[str, Any]] = []
    for number, raw_bytes in enumerate(sys.stdin.buffer, start=1):  # bytes: UTF-8 whatever the locale says
        if number == 1 and (raw_bytes.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw_bytes):
            decode_utf8(raw_bytes, what="the input")  # UTF-16: the whole input is unreadable, one error says so
        if not raw_bytes.strip():
            continue
        try:
            raw = decode_utf8(raw_bytes, what=f"line {number}")
            pending.append(QAItem.from_dict(json.loads(raw)))
        except json.JSONDecodeError:
            pending.append({"error": {"code": "bad_request", "message": "the line is not valid JSON"}})
        except QAError as err:
            pending.append(error_line(err))
        if sum(isinstance(p, QAItem) for p in pending) >= args.batch:
            flush(pending)
            pending = []
    flush(pending)
    sys.stdout.flush()
    seconds = time.monotonic() - began
    summary = {**counts, "seconds": round(seconds, 3)}
    return 0, summary, f"answered {counts['answered']}, failed {counts['failed']} in {seconds:.1f}s"


def _onnx_engine_from_dir(folder: str, quantize: str, settings: Settings) -> Any:
    """Build the folder's ONNX artifact in memory (no file written), then serve it as the app would."""
    from pathlib import Path

    from ..engine.onnx_runner import default_threads, onnx_engine
    from ..engine.question_answering import Limits
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
        limits=Limits.from_settings(settings),
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
    given.add_argument("--context-file", metavar="FILE", help="read the context from a UTF-8 text file; - reads standard input")
    ask.add_argument("--top-k", type=count(1, MAX_TOP_K), default=1, help=f"answers to return (1-{MAX_TOP_K})")

    answer = add(
        "answer",
        cmd_answer,
        "Read JSON lines of {question, context, top_k?, max_answer_len?, handle_impossible_answer?} on stdin; "
        "write one JSON line {answers: [...]} or {error: {...}} per item on stdout (with --json, a summary object last). "
        "Only a local folder: it never contacts the Hub.",
    )
    answer.add_argument("--model-dir", required=True, help="a local model folder (safetensors, config, tokenizer)")
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
