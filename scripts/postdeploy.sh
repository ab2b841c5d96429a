#!/usr/bin/env sh
# azd "postdeploy" hook on Linux and macOS (azure.yaml; scripts/postdeploy.ps1 on Windows): both
# run scripts/postdeploy.py (standard library only, no .venv needed), which queues the first model
# refresh with your Azure CLI identity and then runs scripts/smoke against the deployment.
set -eu
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/postdeploy.py "$@"
