"""azd's ``prepackage`` hook (azure.yaml, on Linux, macOS and Windows) and the tests' packaging
step: install the deployment's locked dependencies the way Azure's Linux workers need them, into
``.python_packages/lib/site-packages``, so the package deploys with the remote build turned off.

- ``requirements.lock`` only (built by ``scripts/lock`` from requirements-azure.txt), with
  ``--require-hashes --no-deps``: every distribution pinned, every file checked against its sha256,
  nothing resolved here. The deployed set is the locked set, which is also what ``.venv`` runs.
- Linux x86_64 (manylinux_2_17 .. 2_28), CPython 3.11 wheels only (``--only-binary=:all:``): what
  Flex Consumption's Python 3.11 workers run, whatever machine builds the package.
- PyTorch's CPU wheel index as an extra index, for ``torch==X+cpu``; ``TORCH_INDEX_URL`` overrides
  it (a mirror). Where it cannot be reached, pip's own configuration (a find-links folder holding
  the CPU wheel) must provide the file, and its sha256 must still match the lock.
- Then checks the result (CPU-only, every locked version installed), builds the zip azd would
  upload (the project folder minus ``.funcignore``) and prints its size, unzipped and zipped.

Standard library only: it runs before any environment of the project exists.
Usage: python scripts/package.py [--zip PATH]
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = Path(".python_packages") / "lib" / "site-packages"
LOCK = "requirements.lock"
LIMIT = 1_000_000_000  # Flex Consumption's deployment package limit, 1 GB
CUDA_DISTRIBUTIONS = ("nvidia-", "cuda-")
CUDA_NAMES = ("triton", "pytorch-triton")
CUDA_LIBRARY = re.compile(r"lib(cu|cudnn|nccl)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    """``name -> version`` of every distribution in the lock file."""
    found = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if match:
            found[normalize(match.group(1))] = match.group(2)
    return found


def installed_versions(site: Path) -> dict[str, str]:
    """``name -> version`` of every distribution installed under ``site``."""
    found = {}
    for meta in site.glob("*.dist-info/METADATA"):
        text = meta.read_text(encoding="utf-8", errors="replace")
        name = re.search(r"^Name: (.+)$", text, re.M)
        version = re.search(r"^Version: (.+)$", text, re.M)
        if name and version:
            found[normalize(name.group(1).strip())] = version.group(1).strip()
    return found


def cpu_only_problems(site: Path) -> list[str]:
    """What makes the installed set not CPU-only: a CUDA distribution or library, a torch not +cpu."""
    problems = []
    for name, version in sorted(installed_versions(site).items()):
        if name.startswith(CUDA_DISTRIBUTIONS) or name in CUDA_NAMES:
            problems.append(f"CUDA distribution {name} {version}")
        if name == "torch" and not version.endswith("+cpu"):
            problems.append(f"torch {version} is not a +cpu build")
    problems.extend(f"CUDA library {p.relative_to(site)}" for p in site.rglob("*") if CUDA_LIBRARY.match(p.name))
    return problems


# --- .funcignore: what azd leaves out of the zip -------------------------------------------------


def funcignore_patterns(root: Path) -> list[str]:
    path = root / ".funcignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """gitignore-style, for the patterns .funcignore uses: ``/x`` matches ``x`` at the root, ``x``
    matches any path component (no negation, no ``**``: the tests keep .funcignore to these)."""
    parts = rel.replace("\\", "/").split("/")
    for pattern in patterns:
        if pattern.startswith("/"):
            if fnmatch.fnmatchcase(parts[0], pattern[1:].rstrip("/")):
                return True
        elif any(fnmatch.fnmatchcase(part, pattern.rstrip("/")) for part in parts):
            return True
    return False


def package_files(root: Path) -> list[str]:
    """Every file of ``root`` that .funcignore keeps (and local.settings.json, which azd always
    leaves out of a function app's zip), as sorted ``/``-separated relative paths."""
    patterns = funcignore_patterns(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not ignored((rel_dir / d).as_posix(), patterns))
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if not ignored(rel, patterns) and rel != "local.settings.json":
                files.append(rel)
    return sorted(files)


def build_zip(root: Path, out: Path) -> tuple[int, int, int]:
    """Write the deployment zip of ``root`` to ``out``: (files, bytes unzipped, bytes zipped)."""
    files = [rel for rel in package_files(root) if (root / rel).resolve() != out.resolve()]
    unzipped = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for rel in files:
            archive.write(root / rel, rel)
            unzipped += (root / rel).stat().st_size
    return len(files), unzipped, out.stat().st_size


# --- the install ---------------------------------------------------------------------------------


def platform_args() -> list[str]:
    # pip does not widen an explicit --platform to older glibc tags: list manylinux_2_17 .. 2_28
    # (every wheel a glibc 2.28+ Linux x86_64 worker can load; manylinux2014 is manylinux_2_17).
    args = ["--platform", "manylinux2014_x86_64"]
    for glibc in range(17, 29):
        args += ["--platform", f"manylinux_2_{glibc}_x86_64"]
    return [*args, "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none"]


def torch_index_args() -> list[str]:
    url = os.environ.get("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu")
    try:
        urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=15).close()
    except OSError:
        print(f"warning: {url} cannot be reached; the CPU torch wheel must come from pip's configuration (find-links)", file=sys.stderr)
        return []
    return ["--extra-index-url", url]


def install(root: Path, python: str) -> Path:
    site = root / TARGET
    shutil.rmtree(root / ".python_packages", ignore_errors=True)
    site.mkdir(parents=True)
    print(f"Installing {LOCK} into {TARGET.as_posix()} (manylinux x86_64, cp311, binary wheels, --require-hashes)", flush=True)
    command = [
        python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
        "--require-hashes", "--no-deps", "--only-binary=:all:", "--target", str(site),
        *platform_args(), *torch_index_args(), "-r", str(root / LOCK),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=root, check=False)
    if done.returncode != 0:
        raise SystemExit(
            f"error: pip could not install {LOCK} (exit {done.returncode}). A hash mismatch means a file differs from the "
            "one locked: rebuild the lock with scripts/lock where the intended indexes are reachable (docs/development.md, The lock)."
        )
    # Nothing the app needs at run time: pip's console scripts, bytecode caches, and torch's C++
    # unit-test binaries and headers (used only to compile C++ extensions / torch.compile, which
    # the app never does): about 145 MB less to upload and unpack on every cold start.
    for path in (site / "bin", site / "torch" / "test", site / "torch" / "include"):
        shutil.rmtree(path, ignore_errors=True)
    for cache in sorted(site.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache, ignore_errors=True)
    return site


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--zip", type=Path, help="keep the deployment zip at this path (default: measured, then deleted)")
    args = parser.parse_args(argv)
    python = os.environ.get("PYTHON") or sys.executable
    site = install(ROOT, python)

    problems = cpu_only_problems(site)
    locked, installed = locked_versions(ROOT / LOCK), installed_versions(site)
    problems += [
        f"{name} {version} locked, {installed.get(name)} installed" for name, version in locked.items() if installed.get(name) != version
    ]
    if problems:
        print("error: the package is not the locked CPU-only set:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 1

    out = args.zip.resolve() if args.zip else Path(tempfile.mkstemp(suffix=".zip")[1])
    try:
        count, unzipped, zipped = build_zip(ROOT, out)
    finally:
        if not args.zip:
            out.unlink(missing_ok=True)
    print(f"package: {count} files, unzipped {unzipped / 1e6:.1f} MB, zipped {zipped / 1e6:.1f} MB (deployment limit 1 GB)")
    if max(unzipped, zipped) >= LIMIT:
        print("error: the package is over Flex Consumption's 1 GB deployment limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
