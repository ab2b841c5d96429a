"""What the commands share: the storage probe, progress bars, argument types and the revision to act on."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..settings import Settings

Handler = Callable[[argparse.Namespace, Settings], tuple[int, dict[str, Any], str]]
Add = Callable[[str, Handler, str], argparse.ArgumentParser]


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


def open_store(settings: Settings, args: argparse.Namespace) -> Any:
    """The store of the settings (patient profile), after a quick probe that storage answers."""
    from ..store.model_store import ModelStore
    from ..store.storage import probe

    probe(settings.require_storage(), settings.container)
    return ModelStore.from_settings(settings, profile="command", model_id=getattr(args, "model_id", None))


def count(low: int, high: int | None = None) -> Callable[[str], int]:
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


def argv_text(value: str, flag: str) -> str:
    """Text given as an argument, or the error a file of the same bytes gets (:func:`decode_utf8`):
    Python hands over argument bytes that are not UTF-8 as lone surrogates (U+DC80 to U+DCFF), which
    are not what the user typed; :func:`os.fsencode` gives the bytes back.

    Raises:
        InputError: ``{flag} is not UTF-8 (looks like ...)``.
    """
    import os

    from ..engine.question_answering import decode_utf8

    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return decode_utf8(os.fsencode(value), what=flag)
    return value


def nonempty(raw: str) -> str:
    """An argparse type for a path: an empty value is a usage error naming the flag, never "not
    given" (``--from-dir "$DIR"`` with ``DIR`` unset would otherwise go to the Hub)."""
    if not raw.strip():
        raise argparse.ArgumentTypeError("must not be empty (an unset shell variable?)")
    return raw


def revision_or_current(store: Any, revision: str | None, what: str) -> str:
    """``--revision`` checked, or the current one: the pointer's, its last recorded value when
    ``current.json`` is damaged, or else the newest intact version; NotFoundError on an empty store."""
    from ..errors import NotFoundError
    from ..store.model_store import check_revision_arg

    if revision:
        return check_revision_arg(revision)
    state = store.read_pointer_state()
    if state.empty:
        raise NotFoundError(f"No model has been published yet: nothing to {what}")
    if state.effective is not None:
        return str(state.effective.revision)
    order = store.serving_order(state)
    if not order:
        raise NotFoundError(f"current.json is damaged and no intact version is stored: nothing to {what}; see python -m shared status")
    return str(order[0])
