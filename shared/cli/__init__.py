"""Command line for operators and checks: ``python -m shared COMMAND``.

Every command reads its settings from the environment (``MODEL_STORAGE``, ``MODEL_CONTAINER``,
``MODEL_ID``, ...) and takes ``--json`` to print one JSON object as its last line. A user's
mistake (a bad flag, a missing folder, a bad setting, storage that is down) is one ``error:``
line and exit code 1 (2 for bad usage), never a traceback; a reader that stops early (``| head -1``)
ends the command quietly with 141. Commands that use storage first make
a quick reachability probe, so a dead or silent account fails within seconds, naming it.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
