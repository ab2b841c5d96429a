"""The parser and the entry point: one handler per command, one ``error:`` line for any failure."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import ErrorBody, ErrorDetail, QAError, RecordDamagedError
from ..settings import Settings
from ..wire import to_json
from . import answer_commands, isolate_commands, store_commands
from .common import Handler

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as description

    parser = argparse.ArgumentParser(prog="python -m shared", description=description)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        cmd.set_defaults(handler=handler)
        return cmd

    isolate_commands.add_parsers(add)
    store_commands.add_parsers(add)
    answer_commands.add_parsers(add)
    return parser


# A reader that stops early (``| head -1``, ``| true``) closes the pipe: the command ends quietly with
# the status a shell gives a command killed by SIGPIPE (128 + 13), as ``yes | head -1`` does.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 failed check or error, 2 bad usage, 141 when
    standard output was closed before the command finished writing)."""
    try:
        try:
            code = _run(argv)
        finally:  # also after --help: a closed pipe shows here, not as a traceback when the interpreter exits
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    return code


def _silence_stdout() -> None:
    """Point standard output at the null device, so that the flush at exit does not fail again
    (the recipe of Python's ``signal`` documentation, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's captured stdout): nothing pending either
        pass


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = Settings.from_env()
        code, data, text = args.handler(args, settings)
    except QAError as err:
        err = _named(err)
        log.debug("command failed", exc_info=True)
        message = err.message
        if isinstance(err, RecordDamagedError) and err.repair not in message:
            message += f"; repair: {err.repair}"
        print(f"error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps(to_json(ErrorBody(ErrorDetail(err.code, message)))))
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away: not a bug, nothing left to tell it (see main)
        raise
    except Exception as err:  # a bug must still end in one line, not a traceback
        log.debug("command failed", exc_info=True)
        print(f"error: unexpected {type(err).__name__} (a bug; please report it with the command you ran)", file=sys.stderr)
        if args.json:
            print(json.dumps(to_json(QAError(f"unexpected {type(err).__name__}").body())))
        return 1
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(data, default=str))
    else:
        # a streaming command owns stdout; its summary goes to stderr
        print(text, file=sys.stderr if getattr(args, "stream", False) else sys.stdout)
    return code


def _named(err: QAError) -> QAError:
    """A storage outage names the endpoint that failed (the models' account, or the refresh queue's)
    and, for a local one, how to start Azurite; HTTP callers never see these details."""
    from ..errors import StorageUnavailableError

    if not isinstance(err, StorageUnavailableError):
        return err
    try:
        from ..store.storage import with_endpoint

        settings = Settings.from_env()
        conn = settings.queue_storage if err.service == "queue" else settings.storage
        return err if conn is None else with_endpoint(err, conn, err.service)
    except QAError:
        return err
