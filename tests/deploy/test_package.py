"""scripts/package.py (azd's prepackage hook) installs the locked, hashed dependency set, CPU-only,
under the project's 1 GB budget; the zip it builds the way azd does (the folder minus .funcignore) holds the
app and imports on its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

SITE = ".python_packages/lib/site-packages/"
LIMIT = 1_000_000_000  # the project's own package budget, 1 GB (docs/deploy.md, The package)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins(path: Path) -> dict[str, str]:
    """``name -> version spec`` of the requirement lines of ``path`` (not -r, not comments)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]
            pins[normalize(name)] = line[len(name) :].strip()
    return pins


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """``name -> (version, hashes)`` of requirements.lock."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if found:
            current = normalize(found.group(1))
            entries[current] = (found.group(2), [])
        elif current and (digest := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            entries[current][1].append(digest.group(1))
    return entries


# --- the lock (fast: no install) -----------------------------------------------------------------


def test_lock_pins_every_requirement_with_hashes() -> None:
    """Defect 8: the deployment's dependencies are locked with hashes, built from requirements*.txt."""
    entries = lock_entries()
    assert len(entries) > 20
    text = (ROOT / "requirements.lock").read_text()
    for line in text.splitlines():
        assert not re.search(r"(/opt/|/home/|/root/|/tmp/|file:|\\)", line.replace(" \\", "")), f"machine path in the lock: {line}"
    unhashed = sorted(name for name, (_, hashes) in entries.items() if not hashes)
    assert not unhashed, f"locked without a hash: {unhashed}"
    wanted = {**requirement_pins(ROOT / "requirements.txt"), **requirement_pins(ROOT / "requirements-azure.txt")}
    for name, spec in wanted.items():
        assert name in entries, f"{name} (requirements) is not in requirements.lock: run scripts/lock"
        version = entries[name][0]
        if spec.startswith("=="):
            assert version == spec[2:] or version.split("+")[0] == spec[2:], f"{name}: locked {version}, requirements say {spec}"
    assert entries["torch"][0].endswith("+cpu")
    assert not [n for n in entries if n.startswith(("nvidia-", "cuda-")) or n in ("triton", "pytorch-triton")]


def test_the_tested_set_is_the_locked_set() -> None:
    """The environment running these tests has every locked distribution at its locked version
    (scripts/setup.sh installs .venv with the lock's versions as constraints)."""
    from importlib import metadata

    mismatched = []
    for name, (version, _) in lock_entries().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # not every locked distribution is needed here (setuptools, say)
        if installed.split("+")[0] != version.split("+")[0]:
            mismatched.append(f"{name}: locked {version}, tested {installed}")
    assert not mismatched, "the tests do not run the set that deploys:\n" + "\n".join(mismatched)


def test_package_script_installs_the_lock_with_require_hashes() -> None:
    script = (ROOT / "scripts" / "package.py").read_text()
    assert '"--require-hashes"' in script and '"--no-deps"' in script and "requirements.lock" in script
    assert not re.search(r'"-r",\s*str\(root / "requirements\.txt"\)', script), "installs requirements.txt, not the lock"


def test_an_unreachable_torch_index_is_named_with_pips_cause_not_blamed_on_a_hash(tmp_path: Path) -> None:
    """The script used to probe PyTorch's index itself and drop it silently on a TLS or proxy
    error; pip then found no torch==X+cpu and the message blamed a hash. Now pip reaches the index
    with its own settings, and the error names the index and the cause pip reported."""
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "package.py").write_text((ROOT / "scripts" / "package.py").read_text())
    lock = (ROOT / "requirements.lock").read_text()
    torch = re.search(r"^torch==.*?(?=^\S)", lock, re.M | re.S)
    assert torch
    (tmp_path / "requirements.lock").write_text(torch.group(0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull,  # no pip.conf (no find-links holding the wheel)
        PIP_INDEX_URL=f"http://127.0.0.1:{closed}/simple",
        PIP_RETRIES="1",  # pip names the cause in its retry warnings
        TORCH_INDEX_URL=f"http://127.0.0.1:{closed}/whl/cpu",
        PYTHON=sys.executable,
    )
    done = subprocess.run(
        [sys.executable, str(tmp_path / "scripts" / "package.py")], capture_output=True, text=True, check=False, env=env, timeout=300
    )
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()
    assert error and error[0].startswith(f"error: pip could not install requirements.lock (exit {1}): it could not reach "), done.stderr
    assert f"http://127.0.0.1:{closed}/whl/cpu" in error[0] and "Connection refused" in error[0], error[0]
    assert "hash" not in error[0].lower()
    assert "TORCH_INDEX_URL" in done.stderr and "HTTPS_PROXY" in done.stderr and "Traceback" not in done.stderr


def test_a_file_that_differs_from_the_lock_is_named_as_such() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import package
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    output = "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.\n    torch==2.13.0+cpu from ...\n"
    assert "differs from the one locked" in package.install_failure(output, 1, "https://download.pytorch.org/whl/cpu")
    missing = "ERROR: No matching distribution found for onnx==9.9.9\n"
    assert package.install_failure(missing, 1, "https://x").endswith("No matching distribution found for onnx==9.9.9")


# --- the package (slow: installs ~900 MB) --------------------------------------------------------


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[zipfile.ZipFile, str, Path]:
    zip_path = tmp_path_factory.mktemp("package") / "package.zip"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "package.py"), "--zip", str(zip_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
    )
    summary = [line for line in done.stdout.splitlines() if line.startswith("package:")]
    print("\n" + "\n".join(summary))
    assert done.returncode == 0, f"scripts/package.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return zipfile.ZipFile(zip_path), summary[0], zip_path


def zipped_versions(archive: zipfile.ZipFile) -> dict[str, str]:
    versions = {}
    for name in archive.namelist():
        # top-level dist-info only (setuptools vendors packages with dist-info folders of their own)
        if name.startswith(SITE) and name.endswith(".dist-info/METADATA") and name[len(SITE) :].count("/") == 1:
            text = archive.read(name).decode("utf-8", "replace")
            found = re.search(r"^Name: (.+)$", text, re.M), re.search(r"^Version: (.+)$", text, re.M)
            assert found[0] and found[1], name
            versions[normalize(found[0].group(1).strip())] = found[1].group(1).strip()
    return versions


def test_zip_holds_exactly_the_locked_set(package: tuple[zipfile.ZipFile, str, Path]) -> None:
    archive, _, _ = package
    versions = zipped_versions(archive)
    locked = {name: version for name, (version, _) in lock_entries().items()}
    differ = {n: (versions.get(n), locked.get(n)) for n in set(versions) | set(locked) if versions.get(n) != locked.get(n)}
    assert not differ, f"zipped vs locked: {differ}"


def test_zip_is_cpu_only(package: tuple[zipfile.ZipFile, str, Path]) -> None:
    archive, _, _ = package
    versions = zipped_versions(archive)
    cuda = sorted(n for n in versions if n.startswith(("nvidia-", "cuda-")) or n in ("triton", "pytorch-triton"))
    assert not cuda, f"CUDA distributions in the package: {cuda}"
    libraries = [n for n in archive.namelist() if re.match(r"lib(cu|cudnn|nccl)", n.rsplit("/", 1)[-1])]
    assert not libraries, f"CUDA libraries in the package: {libraries[:10]}"
    assert versions["torch"].endswith("+cpu"), f"torch {versions['torch']} is not the CPU build"


def test_zip_holds_the_app_and_nothing_of_the_workspace(package: tuple[zipfile.ZipFile, str, Path]) -> None:
    """What azd uploads after .funcignore: the app, its static files, the built dependencies; no
    tests, tools, infra, secrets, caches or environments."""
    archive, _, _ = package
    names = set(archive.namelist())
    app_files = ("function_app.py", "host.json", "requirements.txt", "shared/settings.py", "playground/index.html")
    for needed in (*app_files, f"{SITE}torch/__init__.py"):
        assert needed in names, f"{needed} is not in the zip"
    tops = {name.split("/", 1)[0] for name in names}
    allowed = {"function_app.py", "host.json", "requirements.txt", "shared", "playground", ".python_packages", ".funcignore"}
    assert tops <= allowed, sorted(tops - allowed)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.split("/")[-1] in ("local.settings.json", ".env")]


def test_package_is_under_the_deployment_limit_zipped_and_unzipped(package: tuple[zipfile.ZipFile, str, Path]) -> None:
    archive, summary, zip_path = package
    unzipped = sum(info.file_size for info in archive.infolist())
    assert unzipped < LIMIT and zip_path.stat().st_size < LIMIT, summary
    found = re.search(r"unzipped ([\d.]+) MB, zipped ([\d.]+) MB", summary)
    assert found and abs(float(found.group(1)) * 1e6 - unzipped) < 1e6, summary


def test_the_app_imports_from_the_zip_alone(package: tuple[zipfile.ZipFile, str, Path], tmp_path: Path) -> None:
    """Like the Functions worker on the unpacked zip: only the app folder and its .python_packages
    on sys.path (-S: no site-packages of this machine), so a file the zip lacks fails here."""
    archive, _, _ = package
    app = tmp_path / "wwwroot"
    archive.extractall(app)
    site = app / SITE
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import function_app, torch, transformers, onnxruntime, azure.identity\n"
        "import opentelemetry.sdk._logs, azure.monitor.opentelemetry.exporter  # the event export (shared/telemetry/export.py)\n"
        "assert function_app.__file__.startswith(sys.argv[2]), function_app.__file__\n"
        "assert torch.__file__.startswith(sys.argv[1]), torch.__file__\n"
        "print(torch.__version__, len(function_app.app.get_functions()))"
    )
    done = subprocess.run([sys.executable, "-S", "-c", code, str(site), str(app)], capture_output=True, text=True, check=False, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    version, functions = done.stdout.split()
    assert version.endswith("+cpu") and int(functions) >= 6
