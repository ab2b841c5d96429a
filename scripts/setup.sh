#!/usr/bin/env bash
# Install the Python (.venv) and npm (Azurite) dependencies. Idempotent; sourced by the other scripts.
install_dependencies() {
  local requirements="$1"
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch==2.13.0 is pinned in requirements.txt; on Azure use the CPU index (README, "Deploy").
  .venv/bin/python -m pip install --quiet -r "$requirements"
  # npm ci again whenever package-lock.json changed since the last install (a new dev tool)
  if [ ! -x node_modules/.bin/azurite ] || ! cmp -s package-lock.json node_modules/.installed-package-lock.json; then
    npm ci --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.installed-package-lock.json
  fi
}
