"""azd's postdeploy hook queues the first refresh on a fresh clone: no .venv, only the standard
library and the Azure CLI (here a fake `az` on PATH that records what it was asked), the message
encoded as the host's queue trigger reads it."""

from __future__ import annotations

import ast
import base64
import importlib.machinery
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    default = "ERROR: (AuthorizationPermissionMismatch) This request is not authorized to perform this operation."
    print(os.environ.get("FAKE_AZ_ERROR", default), file=sys.stderr)
    sys.exit(1)
print(os.environ.get("FAKE_AZ_STDOUT", ""))
"""
# What az says when a retry cannot help: signed out, and signed in to another tenant.
SIGNED_OUT = "ERROR: Please run 'az login' to setup account."
OTHER_TENANT = (
    "ERROR: (InvalidAuthenticationTokenTenant) The access token is from the wrong issuer 'https://sts.windows.net/x/'. "
    "It must match the tenant 'https://sts.windows.net/y/' associated with this subscription."
)


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


def test_postdeploy_queues_in_the_deployments_subscription(fresh_clone: Path, bin_dir: Path, tmp_path: Path) -> None:
    """Another default subscription in az must not matter: azd gives hooks AZURE_SUBSCRIPTION_ID."""
    done, calls = run_hook(fresh_clone, bin_dir, tmp_path, AZURE_SUBSCRIPTION_ID="sub-123", FAKE_AZ_FAIL="9", POSTDEPLOY_ATTEMPTS="1")
    assert calls[0][calls[0].index("--subscription") + 1] == "sub-123"
    assert "--subscription sub-123" in done.stderr, "the command printed for later names the subscription too"


@pytest.mark.parametrize(("error", "advice"), [(SIGNED_OUT, "az login"), (OTHER_TENANT, "another tenant or subscription")])
def test_postdeploy_stops_at_once_when_a_retry_cannot_help(
    fresh_clone: Path, bin_dir: Path, tmp_path: Path, error: str, advice: str
) -> None:
    done, calls = run_hook(fresh_clone, bin_dir, tmp_path, FAKE_AZ_FAIL="9", FAKE_AZ_ERROR=error, AZURE_TENANT_ID="tenant-1")
    assert done.returncode == 1 and len(calls) == 1, "no 5 minutes of retries for a failure no wait fixes"
    assert advice in done.stderr and "az login --tenant tenant-1" in done.stderr
    assert "role assignments take minutes" not in done.stderr


def test_postdeploy_retries_only_what_propagation_explains(fresh_clone: Path, bin_dir: Path, tmp_path: Path) -> None:
    unknown = "ERROR: (QueueBeingDeleted) The specified queue is being deleted."
    done, calls = run_hook(fresh_clone, bin_dir, tmp_path, FAKE_AZ_FAIL="9", FAKE_AZ_ERROR=unknown)
    assert done.returncode == 1 and len(calls) == 1 and "QueueBeingDeleted" in done.stderr
    dns = "ERROR: Failed to resolve 'sthabc123.queue.core.windows.net' ([Errno -2] Name or service not known)"
    done, calls = run_hook(fresh_clone, bin_dir, tmp_path, FAKE_AZ_FAIL="2", FAKE_AZ_ERROR=dns, POSTDEPLOY_ATTEMPTS="5")
    assert done.returncode == 0 and len(calls) == 3, "a new account's name resolves minutes after it is created"


def _smoke_module() -> Any:
    loader = importlib.machinery.SourceFileLoader("smoke_script", str(ROOT / "scripts" / "smoke"))
    spec = importlib.util.spec_from_loader("smoke_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["smoke_script"] = module  # its dataclasses look their module up
    loader.exec_module(module)
    return module


def test_smoke_lists_the_key_in_the_deployments_subscription_waiting_while_keys_are_not_ready(
    bin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    smoke = _smoke_module()
    log = tmp_path / "az.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_AZ_LOG", str(log))
    monkeypatch.setenv("FAKE_AZ_STDOUT", "the-host-key")
    monkeypatch.setenv("FAKE_AZ_FAIL", "2")  # keys not ready right after the deployment
    monkeypatch.setenv("FAKE_AZ_ERROR", "ERROR: Operation returned an invalid status 'Service Unavailable'")
    assert smoke.host_key("rg", "func-x", subscription="sub-123", wait=60, interval=0) == "the-host-key"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 3 and all(c[c.index("--subscription") + 1] == "sub-123" for c in calls)
    # signed out: at once, with what to do
    log.unlink()
    monkeypatch.setenv("FAKE_AZ_FAIL", "9")
    monkeypatch.setenv("FAKE_AZ_ERROR", SIGNED_OUT)
    with pytest.raises(SystemExit, match="az login"):
        smoke.host_key("rg", "func-x", subscription="sub-123", wait=60, interval=0)
    assert len(log.read_text().splitlines()) == 1
    # keys that never come: bounded by the wait
    log.unlink()
    monkeypatch.setenv("FAKE_AZ_ERROR", "ERROR: Operation returned an invalid status 'Service Unavailable'")
    with pytest.raises(SystemExit, match="gave no key in 0 s"):
        smoke.host_key("rg", "func-x", subscription=None, wait=0, interval=0)
    assert "--subscription" not in log.read_text()


# --- the Python versions the hooks can meet ------------------------------------------------------

HOOK_SCRIPTS = ("scripts/postdeploy.py", "scripts/azure_cli.py", "scripts/smoke", "scripts/package.py")
NEWER_THAN_3_9 = {  # what the hooks must not use: (pattern, since)
    r"\b(dt|datetime)\.UTC\b": "3.11",
    r"\bzip\([^)]*strict=": "3.10",
    r"\bimport tomllib\b": "3.11",
    r"\bStrEnum\b": "3.11",
    r"\bExceptionGroup\b|except\*": "3.11",
    r"\bkw_only=|\bslots=True": "3.10",
}


def test_hook_scripts_run_on_python_3_9() -> None:
    """azd's posix hooks fall back to python3, which is 3.9 on some macOS: no 3.10+ syntax or
    standard-library names (datetime.UTC was one: a traceback and no first refresh), and a one-line
    refusal below 3.9."""
    for name in HOOK_SCRIPTS:
        source = (ROOT / name).read_text()
        ast.parse(source, filename=name, feature_version=(3, 9))
        for pattern, since in NEWER_THAN_3_9.items():
            assert not re.search(pattern, source), f"{name} uses {pattern} (Python {since})"
        if name != "scripts/azure_cli.py":
            assert "sys.version_info < (3, 9)" in source, f"{name} must refuse an older Python in one line"


def _python_3_9() -> str | None:
    """A Python 3.9 that runs (pyenv's shims answer for versions they do not activate)."""
    candidates = [*sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9")), shutil.which("python3.9")]
    for candidate in candidates:
        if candidate and subprocess.run([str(candidate), "-c", "pass"], capture_output=True, check=False).returncode == 0:
            return str(candidate)
    return None


def test_postdeploy_hook_queues_with_python_3_9_where_one_is_installed(fresh_clone: Path, bin_dir: Path, tmp_path: Path) -> None:
    python39 = _python_3_9()
    if python39 is None:
        pytest.skip("no Python 3.9 here (test_hook_scripts_run_on_python_3_9 checks the source)")
    done, calls = run_hook(fresh_clone, bin_dir, tmp_path, PYTHON=python39)
    assert done.returncode == 0, done.stderr
    request = json.loads(base64.b64decode(calls[0][calls[0].index("--content") + 1]))
    assert request["requested_at"].endswith("+00:00")
