"""Self-checking JSON records: every small JSON document the store reads carries a checksum of its own
content, so that damage (a flipped byte, a truncated or emptied blob, JSON of another shape) is found
and named rather than parsed into an error or, worse, into a wrong value.

A sealed record is a JSON object with two extra top-level fields: ``"record"``, its kind (``pointer``,
``manifest``, ``last-refresh``), so that one record copied over another is named as such, and
``"checksum": "sha256:<hex>"``: the sha256 of the canonical JSON of every other field (keys sorted, no
spaces, ASCII only). A record without a checksum was written by an older version of the app and still
reads (its shape is checked as before); the next write seals it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import RecordDamagedError

CHECKSUM = "checksum"
KIND = "record"
_PREFIX = "sha256:"


def canonical(data: Mapping[str, Any]) -> bytes:
    """The bytes a record's checksum covers: ``data`` as canonical JSON."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def checksum(data: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``data`` (its own ``checksum`` field left out)."""
    body = {key: value for key, value in data.items() if key != CHECKSUM}
    return _PREFIX + hashlib.sha256(canonical(body)).hexdigest()


def seal(data: Mapping[str, Any], *, kind: str) -> bytes:
    """``data`` as the bytes of a sealed record of ``kind`` (indented JSON, keys sorted, with its checksum)."""
    body = {**{key: value for key, value in data.items() if key != CHECKSUM}, KIND: kind}
    return json.dumps({**body, CHECKSUM: checksum(body)}, indent=2, sort_keys=True).encode()


@dataclass(frozen=True)
class Unsealed:
    """A record's fields (without ``checksum`` and ``record``), and whether it carried a checksum
    (``False``: written by an older version of the app, whose damage can only be found by its shape)."""

    data: dict[str, Any]
    sealed: bool


def unseal(raw: bytes, *, kind: str, record: str, repair: str) -> Unsealed:
    """Read a record of ``kind`` and check it against its own checksum.

    Args:
        raw: the blob's bytes.
        kind: the kind it must be (``pointer``, ``manifest``, ``last-refresh``).
        record: what it is, for messages ("current.json", "manifest.json of version X").
        repair: the command that brings it back, for messages.

    Raises:
        RecordDamagedError: empty, not UTF-8, not JSON, not an object, its content does not match
            its checksum, or it is a record of another kind.
    """
    if not raw.strip():
        raise RecordDamagedError(f"{record} is empty", record=record, repair=repair)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecordDamagedError(f"{record} is damaged: it is not UTF-8 text", record=record, repair=repair) from None
    except json.JSONDecodeError as err:
        raise RecordDamagedError(
            f"{record} is damaged: it is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}; truncated?)",
            record=record,
            repair=repair,
        ) from None
    except RecursionError:
        raise RecordDamagedError(f"{record} is damaged: it is nested too deeply to be read", record=record, repair=repair) from None
    if not isinstance(data, dict):
        raise RecordDamagedError(f"{record} is damaged: it is not a JSON object", record=record, repair=repair)
    if CHECKSUM not in data:
        if any(_one_byte_from(key, CHECKSUM) for key in data):  # the name of its own checksum field changed
            raise RecordDamagedError(f"{record} is damaged: the name of its checksum field changed", record=record, repair=repair)
        return Unsealed(data, sealed=False)
    claimed = data.pop(CHECKSUM)
    try:
        actual = checksum(data)
    except ValueError:  # NaN or infinity: never written by the app
        actual = ""
    if claimed != actual:
        raise RecordDamagedError(
            f"{record} is damaged: its content does not match its own checksum (changed after it was written)",
            record=record,
            repair=repair,
        )
    found = data.pop(KIND, None)
    if found != kind:
        raise RecordDamagedError(f"{record} is damaged: it holds a {found} record, not a {kind}", record=record, repair=repair)
    return Unsealed(data, sealed=True)


def _one_byte_from(key: str, name: str) -> bool:
    """Whether ``key`` is ``name`` with exactly one character changed."""
    return len(key) == len(name) and sum(a != b for a, b in zip(key, name, strict=True)) == 1


def shape_error(record: str, repair: str, what: str) -> RecordDamagedError:
    """The error for a record that reads as JSON but is not the shape this record has."""
    return RecordDamagedError(f"{record} is damaged: {what}", record=record, repair=repair)
