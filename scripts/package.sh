#!/usr/bin/env sh
# azd "prepackage" hook on Linux and macOS (azure.yaml; scripts/package.ps1 on Windows): both run
# scripts/package.py, which installs requirements.lock into .python_packages (hashes checked,
# CPU-only torch, Linux x86_64 / CPython 3.11 wheels) and measures the zip azd uploads.
# Usage: scripts/package.sh [--zip PATH]   (PYTHON: the interpreter whose pip is used)
set -eu
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/package.py "$@"
