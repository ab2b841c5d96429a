#!/usr/bin/env bash
# Install the deployment checks' tools (tests/deploy) into venvs of their own under .tools/:
# checkov pins pycep-parser 0.5.1 while the parse test wants a recent one, and none of them
# belongs in the app's .venv. Idempotent: a venv whose pins file is unchanged is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in checkov pycep doctor; do
  pins="tests/deploy/tools/$name.txt"
  venv=".tools/$name"
  if [ -x "$venv/bin/python" ] && cmp -s "$pins" "$venv/pins.txt"; then
    continue
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pins" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  cp "$pins" "$venv/pins.txt"
done
