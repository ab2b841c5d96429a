#!/usr/bin/env bash
# Install the Python (.venv) and npm (Azurite) dependencies. Idempotent; sourced by the other scripts.
install_dependencies() {
  local requirements="$1"
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  # The versions of requirements.lock (what deploys) as constraints, so the tests run the set that
  # deploys; without hashes (pip would demand one for every dev tool too) and without torch's
  # +cpu label (PyPI's torch of the same version matches where PyTorch's CPU index is not used).
  local constraints
  constraints="$(mktemp)"
  sed -n -E 's/^([A-Za-z0-9][A-Za-z0-9._-]*==[^ \\;+]+).*/\1/p' requirements.lock > "$constraints"
  .venv/bin/python -m pip install --quiet -c "$constraints" -r "$requirements"
  rm -f "$constraints"
  # npm ci again whenever package-lock.json changed since the last install (a new dev tool)
  if [ ! -x node_modules/.bin/azurite ] || ! cmp -s package-lock.json node_modules/.installed-package-lock.json; then
    npm ci --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.installed-package-lock.json
  fi
}
