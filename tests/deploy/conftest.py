"""Deployment checks: the tools live in venvs of their own under .tools/ (scripts/deploy-tools.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
TOOLS = ROOT / ".tools"


def missing_tool(what: str, hint: str) -> None:
    """Fail under CI (a check that silently does not run proves nothing), skip elsewhere."""
    message = f"{what} is not installed ({hint})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def tool(venv: str, executable: str) -> Path:
    path = TOOLS / venv / "bin" / executable
    if not path.exists():
        missing_tool(f"{executable} (.tools/{venv})", "run scripts/deploy-tools.sh")
    return path


def bicep_files() -> list[Path]:
    return sorted(INFRA.glob("*.bicep"))


def parse_bicep(path: Path) -> dict[str, Any]:
    """pycep-parser's JSON tree of one Bicep file (a recent pycep, from its own venv)."""
    python = tool("pycep", "python")
    code = (
        "import json, sys; from pathlib import Path; from pycep import BicepParser\n"
        "print(json.dumps(BicepParser().parse(file_path=Path(sys.argv[1]))))"
    )
    done = subprocess.run([str(python), "-c", code, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"pycep-parser cannot parse {path.name}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


@pytest.fixture(scope="session")
def bicep_trees() -> dict[str, dict[str, Any]]:
    return {path.name: parse_bicep(path) for path in bicep_files()}


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".mypy_cache"))
