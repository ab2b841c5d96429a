#!/usr/bin/env bash
# azd "prepackage" hook (azure.yaml) and the tests' packaging step: install the runtime
# dependencies the way Azure's Linux workers need them, into .python_packages/lib/site-packages,
# so the package deploys with the remote build turned off.
#
# - Linux x86_64 (manylinux_2_28), CPython 3.11 wheels only (--only-binary=:all:): what the
#   Flex Consumption Python 3.11 workers run, whatever machine builds the package.
# - PyTorch's CPU wheel index as an extra index, so torch==X resolves to X+cpu (about 190 MB
#   zipped) instead of PyPI's Linux build that pulls about 3 GB of nvidia-*/cuda-*/triton wheels.
#   TORCH_INDEX_URL overrides it (a mirror). Where it cannot be reached, pip's own configuration
#   (a find-links folder holding the CPU wheel, say) must provide the CPU build.
# - Then checks the result is CPU-only (fails otherwise) and prints its size, unzipped and
#   zipped (the zip is what azd uploads to the deployment container).
#
# Usage: scripts/package.sh [--zip PATH]   (PYTHON: the interpreter whose pip is used)
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=.python_packages/lib/site-packages
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
ZIP=""
if [ "${1:-}" = "--zip" ]; then ZIP="${2:?--zip needs a path}"; fi

# pip does not widen an explicit --platform to older glibc tags: list manylinux_2_17 .. 2_28
# (every wheel a glibc 2.28+ Linux x86_64 worker can load; manylinux2014 is manylinux_2_17).
platform_args=(--platform manylinux2014_x86_64)
for glibc in $(seq 17 28); do platform_args+=(--platform "manylinux_2_${glibc}_x86_64"); done

index_args=(--extra-index-url "$TORCH_INDEX_URL")
if ! "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=15)' "$TORCH_INDEX_URL" 2>/dev/null; then
  echo "warning: $TORCH_INDEX_URL cannot be reached; the CPU torch wheel must come from pip's configuration (find-links)" >&2
  index_args=()
fi

rm -rf .python_packages
mkdir -p "$TARGET"
echo "Installing requirements.txt into $TARGET (manylinux_2_28_x86_64, cp311, binary wheels only)"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile \
  --target "$TARGET" \
  "${platform_args[@]}" --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
  --only-binary=:all: \
  "${index_args[@]}" \
  -r requirements.txt

# Nothing the app needs at run time: pip's console scripts, bytecode caches, and torch's C++
# unit-test binaries and headers (used only to compile C++ extensions / torch.compile, which the
# app never does): about 145 MB less to upload and unpack on every cold start.
rm -rf "$TARGET/bin" "$TARGET/torch/test" "$TARGET/torch/include"
find "$TARGET" -name __pycache__ -type d -prune -exec rm -rf {} +

"$PYTHON" - "$TARGET" "$ZIP" <<'PY'
"""Check the package is CPU-only, then print its unzipped and zipped size."""
import fnmatch
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

target, zip_path = Path(sys.argv[1]), sys.argv[2]
root = Path.cwd()

# CPU-only: no CUDA distribution, no CUDA library, and torch's version is a +cpu build.
problems = []
for meta in target.glob("*.dist-info/METADATA"):
    text = meta.read_text(encoding="utf-8", errors="replace")
    name = re.search(r"^Name: (.+)$", text, re.M).group(1).strip().lower().replace("_", "-")
    version = re.search(r"^Version: (.+)$", text, re.M).group(1).strip()
    if name.startswith(("nvidia-", "cuda-")) or name in ("triton", "pytorch-triton"):
        problems.append(f"CUDA distribution {name} {version}")
    if name == "torch" and not version.endswith("+cpu"):
        problems.append(f"torch {version} is not a +cpu build")
for path in target.rglob("*"):
    if re.match(r"lib(cu|cudnn|nccl)", path.name):
        problems.append(f"CUDA library {path.relative_to(target)}")
if problems:
    print("package is not CPU-only:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
    sys.exit(1)

ignore = [line.strip() for line in (root / ".funcignore").read_text().splitlines() if line.strip() and not line.startswith("#")]


def ignored(rel: str) -> bool:
    """gitignore-style: '/x' matches x at the root, 'x' matches any path component."""
    parts = rel.split("/")
    for pattern in ignore:
        if pattern.startswith("/"):
            if fnmatch.fnmatch(parts[0], pattern[1:]):
                return True
        elif any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


files = []
for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    dirnames[:] = [d for d in dirnames if not ignored(os.path.normpath(os.path.join(rel_dir, d)))]
    files.extend(os.path.normpath(os.path.join(rel_dir, name)) for name in filenames)
files = [rel for rel in files if not ignored(rel)]
unzipped = sum((root / rel).stat().st_size for rel in files)
out = Path(zip_path) if zip_path else Path(tempfile.mkstemp(suffix=".zip")[1])
with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
    for rel in sorted(files):
        archive.write(root / rel, rel)
zipped = out.stat().st_size
if not zip_path:
    out.unlink()
print(f"package: {len(files)} files, unzipped {unzipped / 1e6:.1f} MB, zipped {zipped / 1e6:.1f} MB (deployment limit 1 GB)")
PY
