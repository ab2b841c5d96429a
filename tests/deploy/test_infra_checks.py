"""infra/ passes the offline checks: pycep-parser, checkov, azure-functions-doctor (no Bicep CLI here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import INFRA, ROOT, bicep_files, copy_tree, tool

pytestmark = pytest.mark.deploy

# Checks no skip may cover: shared keys, TLS, HTTPS only, public blob access, FTP.
NEVER_SKIPPED = {
    "CKV_AZURE_3": "storage HTTPS only",
    "CKV_AZURE_44": "storage TLS 1.2",
    "CKV_AZURE_190": "no public blob access",
    "CKV_AZURE_34": "no public blob containers",
    "CKV2_AZURE_40": "no shared key authorization",
    "CKV2_AZURE_47": "no anonymous blob access",
    "CKV_AZURE_14": "web app HTTPS only",
    "CKV_AZURE_15": "web app TLS",
    "CKV_AZURE_154": "web app TLS",
    "CKV_AZURE_78": "FTP disabled",
}

EXPECTED_TYPES = {
    "Microsoft.Storage/storageAccounts",
    "Microsoft.Storage/storageAccounts/blobServices/containers",
    "Microsoft.Web/serverfarms",
    "Microsoft.Web/sites",
    "Microsoft.ManagedIdentity/userAssignedIdentities",
    "Microsoft.Authorization/roleAssignments",
    "Microsoft.Insights/components",
    "Microsoft.OperationalInsights/workspaces",
    "Microsoft.KeyVault/vaults",
    "Microsoft.KeyVault/vaults/secrets",
    "Microsoft.Insights/scheduledQueryRules",
}


def test_every_bicep_file_parses_with_a_recent_pycep(bicep_trees: dict[str, dict[str, Any]]) -> None:
    assert set(bicep_trees) == {"main.bicep", "resources.bicep"}
    assert "resources" in bicep_trees["main.bicep"]["modules"]
    assert bicep_trees["resources.bicep"]["resources"], "resources.bicep declares no resource"
    assert not any(
        str(module.get("path", "")).startswith("br") for tree in bicep_trees.values() for module in tree.get("modules", {}).values()
    ), "registry modules cannot be checked offline: declare resources locally"


def test_no_registry_modules() -> None:
    for path in bicep_files():
        assert "br/public:" not in path.read_text() and "br:" not in path.read_text(), path.name


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    checkov = tool("checkov", "checkov")
    out = tmp_path_factory.mktemp("checkov") / "report.json"
    done = subprocess.run(
        [
            str(checkov),
            "--directory", str(INFRA),
            "--framework", "bicep",
            "--external-checks-dir", str(ROOT / "tests" / "deploy" / "checkov_checks"),
            "--output", "json",
            "--compact",
            "--skip-download",  # offline: no policy metadata from the vendor's API
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )  # fmt: skip
    out.write_text(done.stdout)
    assert done.stdout.strip().startswith("{"), f"checkov printed no JSON report:\n{done.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(done.stdout)
    summary = report["summary"]
    print(f"\ncheckov {summary['checkov_version']}: passed {summary['passed']}, failed {summary['failed']}, "
          f"skipped {summary['skipped']}, parsing errors {summary['parsing_errors']}, resources {summary['resource_count']}")  # fmt: skip
    return report


def test_checkov_finds_no_failed_check_and_no_parsing_error(checkov_report: dict[str, Any]) -> None:
    summary = checkov_report["summary"]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in checkov_report["results"]["failed_checks"]]
    assert summary["parsing_errors"] == 0, checkov_report["results"].get("parsing_errors")
    assert summary["failed"] == 0, "\n".join(failed)
    assert summary["passed"] > 0


def test_checkov_lists_the_expected_resource_types(checkov_report: dict[str, Any]) -> None:
    results = checkov_report["results"]
    types = {c["resource"].rsplit(".", 1)[0] for key in ("passed_checks", "skipped_checks") for c in results[key]}
    print("resource types:", ", ".join(sorted(types - {"string"})))
    assert EXPECTED_TYPES <= types, f"missing: {sorted(EXPECTED_TYPES - types)}"


def test_every_checkov_skip_is_justified_and_none_covers_the_basics(checkov_report: dict[str, Any]) -> None:
    skip = re.compile(r"checkov:skip=([A-Z0-9_]+)(:?)(.*)")
    for path in bicep_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = skip.search(line)
            if not found:
                continue
            check_id, colon, reason = found.groups()
            assert line.lstrip().startswith("// checkov:skip="), f"{path.name}:{number}: a skip is a // comment"
            assert colon and len(reason.strip()) >= 20, f"{path.name}:{number}: {check_id} needs a reason"
            assert check_id not in NEVER_SKIPPED, f"{path.name}:{number}: {check_id} ({NEVER_SKIPPED[check_id]}) must pass, not be skipped"
    skipped = {c["check_id"] for c in checkov_report["results"]["skipped_checks"]}
    assert not skipped & set(NEVER_SKIPPED)


def render_pycep_json(stage: Path) -> None:
    """Write each Bicep file's pycep tree as JSON beside it: the doctor reads nested Flex settings
    (functionAppConfig.runtime, deployment.storage) only from JSON templates, and there is no Bicep
    CLI here to build the ARM JSON. The tree keeps the Bicep's literal values as they are."""
    from tests.deploy.conftest import parse_bicep

    for path in bicep_files():
        (stage / "infra" / f"{path.stem}.pycep.json").write_text(json.dumps(parse_bicep(path), indent=1))


def test_functions_doctor_deploy_profile_for_flex_consumption(tmp_path: Path) -> None:
    doctor = tool("doctor", "azure-functions-doctor")
    stage = tmp_path / "app"
    stage.mkdir()
    # The app as it deploys (what .funcignore keeps, minus the built dependencies) plus infra/.
    for name in ("function_app.py", "host.json", "requirements.txt", ".funcignore"):
        shutil.copy2(ROOT / name, stage / name)
    copy_tree(ROOT / "shared", stage / "shared")
    copy_tree(INFRA, stage / "infra")
    render_pycep_json(stage)
    report_path = tmp_path / "doctor.json"
    done = subprocess.run(
        [
            str(doctor), "doctor",
            "--path", str(stage),
            "--profile", "deploy",
            "--hosting-plan", "flex-consumption",
            "--deployment-mode", "local-prebuilt",  # scripts/package.sh builds the dependencies
            "--format", "json",
            "--output", str(report_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert report_path.exists(), f"doctor wrote no report (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    items = {item["rule_id"]: item for section in json.loads(report_path.read_text())["results"] for item in section["items"]}
    counts: dict[str, int] = {}
    for item in items.values():
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    print("\ndoctor:", ", ".join(f"{status} {count}" for status, count in sorted(counts.items())))
    for item in items.values():
        if item["status"] in ("warn", "fail"):
            print(f"  {item['status']} {item['rule_id']}: {str(item.get('value')).splitlines()[0]}")
    fails = [f"{rule}: {item.get('value')}" for rule, item in items.items() if item["status"] == "fail"]
    assert not fails, "\n".join(fails)
    required = ("check_flex_runtime_config", "check_flex_deployment_storage", "check_binding_connection_resolution")
    for rule in (*required, "check_flex_deprecated_settings"):
        assert items[rule]["status"] == "pass", f"{rule}: {items[rule]['status']}: {items[rule].get('value')}"
    # Warnings docs/deploy.md explains ("What is checked"); a new one must be looked at.
    explained = {"check_native_dependency_risk", "check_app_insights", "check_unpinned_requirements"}
    warned = {rule for rule, item in items.items() if item["status"] == "warn"}
    assert warned <= explained, f"unexplained doctor warnings: {sorted(warned - explained)}"
