"""azd's ``prepackage`` hook (azure.yaml, on Linux, macOS and Windows) and the tests' packaging
step: install the deployment's locked dependencies the way Azure's Linux workers need them, into
``.python_packages/lib/site-packages``, so the package deploys with the remote build turned off.

- ``requirements.lock`` only (built by ``scripts/lock`` from requirements-azure.txt), with
  ``--require-hashes --no-deps``: every distribution pinned, every file checked against its sha256,
  nothing resolved here. The deployed set is the locked set, which is also what ``.venv`` runs.
- Linux x86_64 (manylinux_2_17 .. 2_28), CPython 3.11 wheels only (``--only-binary=:all:``): what
  Flex Consumption's Python 3.11 workers run, whatever machine builds the package.
- PyTorch's CPU wheel index as an extra index for the ``+cpu`` builds only (a pip run of their
  own: pip would otherwise ask it for every distribution, and retry each where it cannot be
  reached); ``TORCH_INDEX_URL`` overrides it (a mirror). pip itself reaches it, with its own proxy
  and certificate settings; where it cannot, pip's configuration (a find-links folder holding the
  CPU wheel) may still provide the file, whose sha256 must match the lock. When the install fails,
  the error names the cause pip reported: an index it could not reach (and why), or a file that
  differs from the locked one.
- Then checks the result (CPU-only, every locked version installed), builds the zip azd would
  upload (the project folder minus ``.funcignore``) and prints its size, unzipped and zipped.

Standard library only: it runs before any environment of the project exists (Python 3.9 or newer).
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
import urllib.parse
import zipfile
from pathlib import Path

if sys.version_info < (3, 9):  # noqa: UP036 - the one line a too-old python3 gets instead of a traceback
    sys.exit(f"error: the prepackage hook needs Python 3.9 or newer, this is {sys.version.split()[0]}: set PYTHON to a newer one")

ROOT = Path(__file__).resolve().parents[1]
TARGET = Path(".python_packages") / "lib" / "site-packages"
LOCK = "requirements.lock"
LIMIT = 1_000_000_000  # the project's own budget, 1 GB: no published Flex Consumption limit was found (docs/deploy.md, The package)
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


def torch_index_url() -> str:
    return os.environ.get("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu").rstrip("/")


UNREACHABLE = re.compile(
    r"Could not fetch URL|NameResolutionError|Failed to resolve|Name or service not known|SSLError|CERTIFICATE_VERIFY_FAILED"
    r"|ProxyError|Tunnel connection failed|Connection refused|connection broken|timed out|Max retries exceeded",
    re.IGNORECASE,
)


def install_failure(output: str, exit_code: int, index: str) -> str:
    """The error line for a failed ``pip install`` whose messages were ``output``: the cause pip
    reported (an index it could not reach, a distribution it did not find, a file that differs
    from the locked one), with what to do about it."""
    lines = output.splitlines()
    if "DO NOT MATCH THE HASHES" in output:
        return (
            f"error: pip could not install {LOCK} (exit {exit_code}): a downloaded file differs from the one locked (its sha256 "
            "above). Rebuild the lock with scripts/lock where the intended indexes are reachable (docs/development.md, The lock)."
        )
    unreachable = [line.strip() for line in lines if UNREACHABLE.search(line)]
    if unreachable:
        where = urllib.parse.urlsplit(index)
        about_index = [line for line in unreachable if (where.hostname or "") in line and where.path in line]
        cause = (about_index or unreachable)[-1]
        return (
            f"error: pip could not install {LOCK} (exit {exit_code}): it could not reach {index if about_index else 'an index'}: "
            f"{cause[:400]}\nThe CPU torch wheel comes only from PyTorch's index. Behind a proxy or TLS inspection give pip "
            "its settings (HTTPS_PROXY, PIP_CERT or pip.conf); else set TORCH_INDEX_URL to a mirror, or PIP_FIND_LINKS to a "
            "folder holding the wheel (its sha256 must match the lock)."
        )
    missing = [line.strip() for line in lines if "No matching distribution" in line or "Could not find a version" in line]
    if missing:
        return f"error: pip could not install {LOCK} (exit {exit_code}): {missing[-1][:400]}"
    return f"error: pip could not install {LOCK} (exit {exit_code}): its messages above say why."


def run_pip(command: list[str], cwd: Path) -> tuple[int, str]:
    """Run pip, passing its output through as it comes; returns (exit code, output)."""
    lines = []
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
    return proc.returncode, "".join(lines)


def split_lock(text: str) -> tuple[str, str]:
    """The lock's entries (a ``name==version`` line and its ``--hash`` lines) in two parts: the
    ``+cpu`` builds, which only PyTorch's index serves, and everything else (PyPI's)."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            entries.append([line])
        elif entries and line.startswith((" ", "\t")):
            entries[-1].append(line)
    cpu = ["\n".join(e) for e in entries if "+cpu" in e[0].split()[0]]
    rest = ["\n".join(e) for e in entries if "+cpu" not in e[0].split()[0]]
    return "\n".join(cpu) + "\n", "\n".join(rest) + "\n"


def install(root: Path, python: str) -> Path:
    site = root / TARGET
    shutil.rmtree(root / ".python_packages", ignore_errors=True)
    site.mkdir(parents=True)
    print(f"Installing {LOCK} into {TARGET.as_posix()} (manylinux x86_64, cp311, binary wheels, --require-hashes)", flush=True)
    index = torch_index_url()
    base = [
        python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
        "--require-hashes", "--no-deps", "--only-binary=:all:", "--upgrade", "--target", str(site), *platform_args(),
    ]  # fmt: skip
    cpu, rest = split_lock((root / LOCK).read_text(encoding="utf-8"))
    # Two runs: PyTorch's index is asked for the +cpu builds only (pip would otherwise ask it for
    # every one of the lock's distributions, and retry each where it cannot be reached).
    with tempfile.TemporaryDirectory() as parts:
        for name, entries, extra in (("pypi", rest, []), ("cpu", cpu, ["--extra-index-url", index])):
            if not entries.strip():
                continue
            requirements = Path(parts) / f"{name}.txt"
            requirements.write_text(entries, encoding="utf-8")
            exit_code, output = run_pip([*base, *extra, "-r", str(requirements)], root)
            if exit_code != 0:
                raise SystemExit(install_failure(output, exit_code, index))
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
    print(f"package: {count} files, unzipped {unzipped / 1e6:.1f} MB, zipped {zipped / 1e6:.1f} MB (the project's budget: 1 GB)")
    if max(unzipped, zipped) >= LIMIT:
        print("error: the package is over the project's 1 GB budget (docs/deploy.md, The package)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
