"""azd's postdeploy hook queues the first refresh on a fresh clone: no .venv, only the standard
library and the Azure CLI (here a fake `az` on PATH that records what it was asked), the message
encoded as the host's queue trigger reads it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.store.refresh_queue import RefreshRequest
from tests.deploy.conftest import ROOT

pytestmark = pytest.mark.deploy

FAKE_AZ = """#!{python}
import json, os, sys
log = os.environ["FAKE_AZ_LOG"]
with open(log, "a") as out:
    out.write(json.dumps(sys.argv[1:]) + "\\n")
calls = sum(1 for _ in open(log))
if calls <= int(os.environ.get("FAKE_AZ_FAIL", "0")):
    print("ERROR: (AuthorizationPermissionMismatch) This request is not authorized to perform this operation.", file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """The project's scripts in a folder with no .venv, as after `git clone`."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "scripts", clone / "scripts")
    assert not (clone / ".venv").exists()
    return clone


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """PATH for the hook: a fake az, and a python3 without the project's dependencies (the base
    interpreter of this venv, isolated from user site-packages)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    base = getattr(sys, "_base_executable", sys.executable)
    probe = subprocess.run([base, "-I", "-c", "import azure.storage.queue"], capture_output=True, check=False)
    if probe.returncode == 0:
        pytest.skip(f"{base} has the Azure SDK installed: it cannot stand for a fresh machine")
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{base}" -I "$@"\n')
    (bin_dir / "az").write_text(FAKE_AZ.format(python=base))
    for tool in ("python3", "az"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def run_hook(clone: Path, bin_dir: Path, tmp_path: Path, **extra: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    log = tmp_path / "az.log"
    log.unlink(missing_ok=True)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_AZ_LOG": str(log),
        "AZURE_STORAGE_QUEUE_ENDPOINT": "https://sthabc123.queue.core.windows.net/",
        "MODEL_REFRESH_QUEUE": "model-refresh",
        "SERVICE_API_URI": "https://func-abc123.azurewebsites.net",
        "SMOKE_WAIT_SECONDS": "0",  # scripts/smoke has tests of its own (tests/integration/test_smoke.py)
        "POSTDEPLOY_RETRY_SECONDS": "0",
        **extra,
    }
    done = subprocess.run(["sh", str(clone / "scripts" / "postdeploy.sh")], capture_output=True, text=True, check=False, env=env)
    print(done.stdout, done.stderr)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def test_postdeploy_queues_the_first_refresh_without_the_projects_environment(fresh_clone: Path, bin_dir: Path, tmp_path: Path) -> None:
    """Defect 5: on a fresh clone the first isolation was never queued (only a warning)."""
    done, calls = run_hook(fresh_clone, bin_dir, tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(calls) == 1
    args = calls[0]
    assert args[:3] == ["storage", "message", "put"]
    options = dict(zip(args[3::2], args[4::2], strict=False))
    assert options["--auth-mode"] == "login" and options["--account-name"] == "sthabc123" and options["--queue-name"] == "model-refresh"
    # base64, as host.json's messageEncoding; the worker parses it as the app's own enqueue writes it
    assert json.loads((ROOT / "host.json").read_text())["extensions"]["queues"]["messageEncoding"] == "base64"
    request = RefreshRequest.from_bytes(base64.b64decode(options["--content"], validate=True))
    assert request.reason == "postdeploy" and request.revision is None and not request.explicit
    assert set(json.loads(base64.b64decode(options["--content"]))) == set(json.loads(RefreshRequest().to_bytes()))


def test_postdeploy_retries_while_the_role_assignment_propagates(fresh_clone: Path, bin_dir: Path, tmp_path: Path) -> None:
    done, calls = run_hook(fresh_clone, bin_dir, tmp_path, FAKE_AZ_FAIL="2", POSTDEPLOY_ATTEMPTS="5")
    assert done.returncode == 0 and len(calls) == 3
    assert done.stderr.count("role assignments take minutes to apply") == 2


def test_postdeploy_says_what_to_do_when_it_cannot_queue(fresh_clone: Path, bin_dir: Path, tmp_path: Path) -> None:
    done, calls = run_hook(fresh_clone, bin_dir, tmp_path, FAKE_AZ_FAIL="9", POSTDEPLOY_ATTEMPTS="2")
    assert done.returncode == 1 and len(calls) == 2
    assert "azd hooks run postdeploy" in done.stderr and "/api/model/refresh" in done.stderr
    (bin_dir / "az").unlink()
    done, calls = run_hook(fresh_clone, bin_dir, tmp_path)
    assert done.returncode == 1 and not calls
    assert "Azure CLI (az) is not installed" in done.stderr and "Traceback" not in done.stderr


def test_windows_hooks_run_the_same_scripts() -> None:
    """Defect 2: the pwsh variants run the Python scripts the sh variants run (pwsh is not
    installed here: the scripts are checked as text)."""
    for name in ("package", "postdeploy"):
        ps1 = (ROOT / "scripts" / f"{name}.ps1").read_text()
        sh = (ROOT / "scripts" / f"{name}.sh").read_text()
        assert f"scripts/{name}.py" in ps1 and f"scripts/{name}.py" in sh
        assert "$ErrorActionPreference = 'Stop'" in ps1 and "exit $LASTEXITCODE" in ps1
        assert "@args" in ps1 and '"$@"' in sh
    if shutil.which("pwsh"):
        command = f". '{ROOT / 'scripts' / 'python.ps1'}'; Find-Python"
        done = subprocess.run(["pwsh", "-NoProfile", "-Command", command], capture_output=True, text=True, check=False)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr


def test_windows_hooks_keep_a_one_element_interpreter_whole() -> None:
    """PowerShell unrolls a function's array output: `$python = Find-Python` with a one-element
    answer ($env:PYTHON, the .venv, python on PATH) is a bare string, and `& $python[0]` runs its
    first character (every branch but `py -3` broke `azd up` at prepackage). The callers wrap the
    call in @() so that the answer is always an array (checked as text: no pwsh here)."""
    finder = (ROOT / "scripts" / "python.ps1").read_text()
    assert "function Find-Python" in finder
    for name in ("package", "postdeploy"):
        ps1 = (ROOT / "scripts" / f"{name}.ps1").read_text()
        assert re.search(r"^\$python = @\(Find-Python\)", ps1, re.M), f"{name}.ps1 must call @(Find-Python)"
        assert not re.search(r"=\s*Find-Python\b", ps1), f"{name}.ps1 assigns Find-Python's output unwrapped"
        assert "& $python[0] @($python | Select-Object -Skip 1)" in ps1
    for path in (ROOT / "scripts").glob("*.ps1"):
        calls = re.findall(r"^(?!\s*#).*\bFind-Python\b.*$", path.read_text(), re.M)
        unwrapped = [c for c in calls if "function Find-Python" not in c and "@(Find-Python)" not in c]
        assert not unwrapped, f"{path.name}: {unwrapped}"
