"""Print ``export NAME=value`` lines for the ``Values`` of a ``local.settings.json`` that the
environment does not already set (as ``func start`` does), for ``scripts/run`` to ``eval``.

A file that is not a JSON object with an object ``Values`` is one ``error:`` line and exit 1,
before anything runs. Usage: ``python scripts/local_settings.py [local.settings.json]``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys


def exports(path: str) -> list[str]:
    """The export lines; raises ``ValueError`` naming what is wrong with the file."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f'must be a JSON object like {{"Values": {{...}}}}, not a JSON {type(data).__name__}')
    values = data.get("Values", {})
    if not isinstance(values, dict):
        raise ValueError(f'"Values" must be an object of setting names and strings, not a JSON {type(values).__name__}')
    return [
        f"export {key}={shlex.quote(value)}"
        for key, value in values.items()
        if isinstance(value, str) and value != "" and key not in os.environ
    ]


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "local.settings.json"
    try:
        lines = exports(path)
    except OSError as err:
        print(f"error: {path} cannot be read ({err.strerror})", file=sys.stderr)
        return 1
    except ValueError as err:
        fix = "fix it, or delete it to start again from local.settings.json.example"
        print(f"error: {os.path.basename(path)} {err}; {fix}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
