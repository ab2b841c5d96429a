"""Command line for operators and checks: ``python -m shared COMMAND``.

Every command reads its settings from the environment (``MODEL_STORAGE``, ``MODEL_CONTAINER``,
``MODEL_ID``, ...) and takes ``--json`` to print one JSON object as its last line. A user's
mistake (a bad flag, a missing folder, a bad setting, storage that is down) is one ``error:``
line and exit code 1 (2 for bad usage), never a traceback. Commands that use storage first make
a quick reachability probe, so a dead or silent account fails within seconds, naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .engine.question_answering import MAX_TOP_K
from .errors import InputError, QAError
from .settings import Settings, parse_model_id

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace, Settings], tuple[int, dict[str, Any], str]]


class BarProgress:
    """A tqdm progress bar on a terminal, silence elsewhere."""

    def __init__(self, description: str) -> None:
        self._bar: Any = None
        self._description = description

    def plan(self, total_bytes: int) -> None:
        if sys.stderr.isatty() and total_bytes > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=self._description)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _store(settings: Settings, args: argparse.Namespace) -> Any:
    """The store of the settings (patient profile), after a quick probe that storage answers."""
    from .store.model_store import ModelStore
    from .store.storage import probe

    probe(settings.require_storage(), settings.container)
    return ModelStore.from_settings(settings, model_id=getattr(args, "model_id", None))


def _count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in ``[low, high]``."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def cmd_isolate(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """The refresh from a terminal: from the Hub (as the queue worker does) or a local folder."""
    import dataclasses

    from .build.isolation import LocalDirSource, isolate
    from .build.model_checks import CheckedSource
    from .build.refresh import artifact_builder, canary_validator, run_refresh
    from .errors import SourceUnavailableError
    from .store.model_store import ModelStore
    from .store.refresh_queue import RefreshRequest, check_hub_revision
    from .store.storage import probe

    if args.model_id:
        settings = dataclasses.replace(settings, model_id=parse_model_id("--model-id", args.model_id, settings.model_id))
    if args.skip_canary:
        settings = dataclasses.replace(settings, canary=None)
    if args.from_dir and args.revision:
        raise InputError("--revision names a Hub revision; a --from-dir version is named by its files' hashes")
    if args.from_dir and not args.model_id:
        _check_folder_model_id(args.from_dir, settings.model_id)
    source = CheckedSource(LocalDirSource(args.from_dir, block_size=settings.block_size)) if args.from_dir else None
    if source is not None:
        source.snapshot()  # a missing or unusable folder fails before storage is touched
    probe(settings.require_storage(), settings.container)  # quick; the copy itself keeps patient retries
    bar = BarProgress("isolate")
    try:
        if source is not None:
            result = isolate(
                ModelStore.from_settings(settings),
                source,
                explicit=True,  # a folder names its version
                keep_versions=settings.keep_versions,
                validate=canary_validator(settings),
                progress=bar,
                repair=args.repair,
                build=artifact_builder(settings),
                unpin=args.unpin,
            )
        else:
            revision = check_hub_revision(args.revision) if args.revision else None
            request = RefreshRequest(
                revision=revision, explicit=revision is not None or args.unpin, reason="cli", repair=args.repair, unpin=args.unpin
            )
            result = run_refresh(settings, request, progress=bar)
    except SourceUnavailableError as err:
        raise SourceUnavailableError(
            f"{err.message}. Offline? Isolate a local model folder instead: python -m shared isolate --from-dir DIR"
        ) from err
    finally:
        bar.close()
    return 0, {**result.to_dict(), "pointer_moved": result.pointer_moved, "pin": result.pin}, result.summary()


def _check_folder_model_id(folder: str, model_id: str) -> None:
    """A folder whose config.json names another model than ``MODEL_ID`` is not stored (and then
    reported) under ``MODEL_ID`` unless ``--model-id`` says so.

    Raises:
        InputError: the config names a different Hub model id; the message says how to set it.
    """
    from pathlib import Path

    try:
        config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the folder's own checks (no config.json, ...) say what is wrong
    named = config.get("_name_or_path") if isinstance(config, dict) else None
    if not isinstance(named, str) or named.count("/") != 1 or named.startswith((".", "/", "~")) or Path(named).exists():
        return  # no Hub id in the config (or a local path): the folder is stored under MODEL_ID
    if named.lower() != model_id.lower():
        raise InputError(
            f"{folder}/config.json names model {named!r} but it would be stored and reported as MODEL_ID {model_id!r}: "
            f"pass --model-id {named} (or the id you want it stored under), and set MODEL_ID to the same id where the app "
            "serves it (local.settings.json, or the app settings)"
        )


def cmd_build_artifacts(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """Build the ONNX artifacts an existing complete version lacks (new versions get them from the refresh)."""
    import dataclasses

    from .build.artifacts import build_artifacts
    from .build.refresh import artifact_canary

    if args.skip_canary:
        settings = dataclasses.replace(settings, canary=None)
    store = _store(settings, args)
    revision = _revision_or_current(store, args.revision, "build artifacts for")
    manifest = store.require_manifest(revision)
    variants = tuple(args.variant) if args.variant else settings.artifacts or ("fp32", "int8")
    with store.lock():  # one writer at a time, as for a refresh
        outcomes = build_artifacts(
            store,
            manifest,
            settings,
            variants=variants,
            canary=artifact_canary(settings),
            progress=lambda step: log.info("%s", step),
            rebuild=args.rebuild,
            verify_blobs=True,  # an artifact that "exists" but does not verify is not one
        )
    failed = any(outcome.startswith(("unusable", "damaged")) for outcome in outcomes.values())
    text = "\n".join(f"{revision} {variant}: {outcome}" for variant, outcome in outcomes.items())
    return (1 if failed else 0), {"revision": revision, "artifacts": outcomes}, text


def cmd_refresh(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """Queue a refresh for the function app's worker (as ``POST /api/model/refresh`` does), with
    this machine's identity or connection string: no function key needed."""
    from .store.refresh_queue import RefreshRequest, check_hub_revision, enqueue

    revision = check_hub_revision(args.revision) if args.revision else None
    request = RefreshRequest(
        revision=revision,
        explicit=revision is not None or args.unpin,
        reason="cli",
        repair=args.repair,
        build_artifacts=args.build_artifacts,
        unpin=args.unpin,
    )
    message_id = enqueue(settings, request)
    data = {"status": "queued", "message_id": message_id, "queue": settings.refresh_queue, **request.__dict__}
    text = (
        f"Queued a refresh of {settings.model_id} on {settings.refresh_queue} (message {message_id}). "
        "Watch it: GET /api/model (last_refresh), or python -m shared status"
    )
    return 0, data, text


def cmd_status(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    from .loading.artifacts import status

    data = status(_store(settings, args))
    pointer = data["pointer"]
    last = data["last_refresh"] or {}
    lines = [f"model: {data['model_id']} in container {data['container']}"]
    if pointer is None:
        lines.append("current: nothing isolated yet (run: python -m shared isolate, or --from-dir DIR offline)")
    else:
        pin = " (pinned)" if pointer["pinned"] else ""
        lines.append(f"current: {pointer['revision']}{pin}, previous: {', '.join(pointer['previous']) or 'none'}")
    for version in data["versions"]:
        state = "complete" if version["complete"] else "INCOMPLETE (staged files, resumed by the next isolate)"
        if not version["complete"] and last.get("revision") == version["revision"] and last.get("error_code") == "validation_failed":
            state = "INCOMPLETE (staged; the canary failed: set MODEL_CANARY or isolate --skip-canary)"
        lines.append(f"  {version['revision']}  {state}  {version['files']} files  {version['bytes']} bytes  {version['last_modified']}")
        for variant, artifact in version.get("artifacts", {}).items():
            reason = str(artifact["reason"])
            usable = "usable" if artifact["usable"] else ("DAMAGED" if reason.startswith("damaged") else "UNUSABLE") + f" ({reason})"
            lines.append(f"    onnx {variant}: {artifact['size']} bytes, {usable}")
    if last.get("outcome"):
        line = f"last refresh: {last.get('outcome')} at {last.get('finished')} ({last.get('error') or 'ok'})"
        if last.get("outcome") == "failed" and pointer is not None:
            line += f"; nothing changed: still serving {pointer['revision']}"
        lines.append(line)
    if last.get("last_skipped_at"):
        lines.append(f"last skipped: {last['last_skipped_at']} ({last.get('skipped_reason')})")
    return 0, data, "\n".join(lines)


def _revision_or_current(store: Any, revision: str | None, what: str) -> str:
    """``--revision`` checked, or the pointer's revision; NotFoundError on an empty store."""
    from .errors import NotFoundError
    from .store.model_store import check_revision_arg

    if revision:
        return check_revision_arg(revision)
    pointer = store.read_pointer()
    if pointer is None:
        raise NotFoundError(f"No model has been published yet: nothing to {what}")
    return str(pointer.revision)


def cmd_verify(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """Re-hash a version's files against its manifest and its ONNX artifacts' blobs against their records."""
    from .loading.artifacts import artifact_state, repair_command
    from .settings import ARTIFACT_VARIANTS

    store = _store(settings, args)
    revision = _revision_or_current(store, args.revision, "verify")
    bar = BarProgress("verify")
    manifest = store.require_manifest(revision)
    bar.plan(manifest.total_bytes)
    try:
        problems = store.verify_version(revision, progress=bar.advance)
    finally:
        bar.close()
    states = {variant: artifact_state(store, manifest, variant, verify_blobs=True) for variant in ARTIFACT_VARIANTS}
    damaged = [f"onnx {s.variant}/{s.blob}: {s.message}" for s in states.values() if s.state == "damaged"]
    data: dict[str, Any] = {
        "revision": revision,
        "ok": not problems and not damaged,
        "files": len(manifest.files),
        "problems": problems + damaged,
        "artifacts": {variant: state.to_dict() for variant, state in states.items()},
    }
    text = f"{revision}: " + ("intact" if not problems else "CORRUPT\n" + "\n".join(problems))
    for state in states.values():
        if state.state != "missing":
            text += f"\n  onnx {state.variant}: " + {"ok": "intact", "unusable": f"unusable ({state.message})"}.get(
                state.state, f"DAMAGED: {state.blob}: {state.message}"
            )
    if problems:
        how = (
            "python -m shared isolate --repair --from-dir DIR (the folder it was isolated from)"
            if manifest.source == "local"
            else f"python -m shared isolate --repair --revision {manifest.source_revision or revision}"
        )
        data["repair"] = how
        text += f"\nRepair it (re-copies only the damaged files, rebuilds damaged artifacts): {how}"
    elif damaged:
        data["repair"] = repair_command(revision)
        text += f"\nRebuild the damaged artifacts: {data['repair']}"
    return (0 if data["ok"] else 1), data, text


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    pointer = _store(settings, args).rollback(args.to)
    data = {"revision": pointer.revision, "previous": list(pointer.previous), "pinned": pointer.pinned}
    return 0, data, f"current: {pointer.revision} (pinned; a scheduled refresh leaves it until a refresh names a revision)"


def cmd_ask(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """One question through the same holder and loader as the function."""
    from .errors import ModelNotReadyError, StorageUnavailableError
    from .loading.artifacts import load_artifact
    from .serving import api
    from .serving.holder import ModelHolder

    context = args.context if args.context_file is None else _read_text(args.context_file, "--context-file")
    holder = ModelHolder(lambda: settings, artifact_loader=load_artifact)
    item: dict[str, Any] = {"question": args.question, "context": context, "top_k": args.top_k}
    try:
        response = api.ask(holder, json.dumps(item).encode())
    except ModelNotReadyError as err:
        # the function's 503 points operators at GET /api/model; here the cause is at hand
        last = holder.describe()["last_error"]
        if last is None:
            raise
        if last["code"] == "storage_unavailable":
            raise StorageUnavailableError(last["message"]) from err
        raise ModelNotReadyError(f"The model could not be loaded: {last['message']}") from err
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

    from .engine.question_answering import decode_utf8
    from .errors import NotFoundError

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

    from .engine.question_answering import Limits, QAEngine, QAItem, decode_utf8

    check_model_dir(args.model_dir)
    quantize = args.quantize or settings.quantize
    if args.backend == "onnx":
        engine = _onnx_engine_from_dir(args.model_dir, quantize, settings)
    else:
        engine = QAEngine.from_dir(
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

    from .build.onnx_export import build_onnx
    from .engine.onnx_runner import default_threads, onnx_engine
    from .engine.question_answering import Limits

    variant = "int8" if quantize == "int8" else "fp32"
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

    from .engine.torch_model import check_safetensors_file
    from .errors import NotFoundError
    from .store.model_files import check_config, select_files

    path = Path(folder)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise NotFoundError(f"--model-dir {folder} {what}; give a local model folder (config.json, *.safetensors, tokenizer files)")
    chosen = select_files([p.name for p in path.iterdir() if p.is_file()], where=f"folder {folder}")
    check_config((path / "config.json").read_bytes(), where=f"in folder {folder}")
    for name in chosen:
        if name.endswith(".safetensors"):
            check_safetensors_file(path / name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        cmd.set_defaults(handler=handler)
        return cmd

    iso = add("isolate", cmd_isolate, "copy the model (from the Hub, or a local folder) into Blob Storage as a verified version")
    iso.add_argument("--model-id", help="Hub model id (default: MODEL_ID)")
    iso.add_argument("--revision", help="branch, tag or commit (default: MODEL_REVISION); naming one moves a pinned pointer")
    iso.add_argument("--from-dir", help="isolate from this local model folder instead of the Hub (offline)")
    iso.add_argument("--skip-canary", action="store_true", help="publish without answering MODEL_CANARY first")
    iso.add_argument(
        "--repair",
        action="store_true",
        help="if the revision is already stored: re-hash its files and copy again each one whose bytes differ from the source, "
        "and rebuild its damaged or unusable ONNX artifacts",
    )
    iso.add_argument("--unpin", action="store_true", help="let a pinned pointer move (or lift the pin of the current version)")

    refresh = add("refresh", cmd_refresh, "queue a refresh for the function app's worker (needs --enqueue)")
    refresh.add_argument("--enqueue", action="store_true", required=True, help="put the request on MODEL_REFRESH_QUEUE")
    refresh.add_argument("--revision", help="branch, tag or commit (moves a pinned pointer)")
    refresh.add_argument("--unpin", action="store_true", help="let the refresh move a pinned pointer")
    refresh.add_argument("--repair", action="store_true", help="re-copy the stored files of the revision that differ from the Hub")
    refresh.add_argument("--build-artifacts", action="store_true", help="build the ONNX serving artifacts the version lacks")

    build = add("build-artifacts", cmd_build_artifacts, "build the ONNX artifacts an existing version lacks (exit 1 if one is unusable)")
    build.add_argument("--revision", help="default: the current one")
    build.add_argument("--variant", action="append", choices=("fp32", "int8"), help="repeat for both (default: MODEL_ARTIFACTS)")
    build.add_argument("--skip-canary", action="store_true", help="record the artifacts without answering MODEL_CANARY")
    build.add_argument("--rebuild", action="store_true", help="build again the damaged or unusable artifacts (their records are replaced)")
    build.add_argument("--model-id")

    status = add("status", cmd_status, "show the pointer, the stored versions and the last refresh")
    status.add_argument("--model-id")

    verify = add("verify", cmd_verify, "re-hash a stored version against its manifest and its ONNX artifacts (exit 1 on mismatch)")
    verify.add_argument("--revision", help="default: the current one")
    verify.add_argument("--model-id")

    rollback = add("rollback", cmd_rollback, "point back at an earlier version and pin it")
    rollback.add_argument("--to", help="revision (default: the newest earlier complete version)")
    rollback.add_argument("--model-id")

    ask = add("ask", cmd_ask, "answer one question with the current model version in Blob Storage (as the function does)")
    ask.add_argument("--question", required=True)
    given = ask.add_mutually_exclusive_group(required=True)
    given.add_argument("--context")
    given.add_argument("--context-file", metavar="FILE", help="read the context from a UTF-8 text file; - reads standard input")
    ask.add_argument("--top-k", type=_count(1, MAX_TOP_K), default=1, help=f"answers to return (1-{MAX_TOP_K})")

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
        "--batch", type=_count(1, 1024), default=1, help="items per engine call, 1-1024 (windows still batch per QA_BATCH_WINDOWS)"
    )
    answer.set_defaults(stream=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 failed check or error, 2 bad usage)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = Settings.from_env()
        code, data, text = args.handler(args, settings)
    except QAError as err:
        err = _named(err)
        log.debug("command failed", exc_info=True)
        print(f"error: {err.message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"code": err.code, "message": err.message}}))
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug must still end in one line, not a traceback
        log.debug("command failed", exc_info=True)
        print(f"error: unexpected {type(err).__name__} (a bug; please report it with the command you ran)", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"code": "internal_error", "message": f"unexpected {type(err).__name__}"}}))
        return 1
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(data, default=str))
    else:
        # a streaming command owns stdout; its summary goes to stderr
        print(text, file=sys.stderr if getattr(args, "stream", False) else sys.stdout)
    return code


def _named(err: QAError) -> QAError:
    """A storage outage names the endpoint (and, for a local one, how to start Azurite)."""
    from .errors import StorageUnavailableError

    if not isinstance(err, StorageUnavailableError):
        return err
    try:
        from .store.storage import with_endpoint

        conn = Settings.from_env().storage
        return err if conn is None else with_endpoint(err, conn)
    except QAError:
        return err
