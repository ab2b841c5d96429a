"""The first deploy and the days after it: what azd, ARM and the platform would accept or
do, checked offline against azure.yaml, infra/, host.json and the settings code. Each test names
the defect it guards against."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.errors import SettingsError
from shared.settings import Settings
from tests.deploy.conftest import INFRA, ROOT

pytestmark = pytest.mark.deploy

REFERENCE = "@Microsoft.KeyVault(VaultName=kv-x;SecretName=hf-token)"


@pytest.fixture(scope="module")
def azure_yaml() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "azure.yaml").read_text())
    return data


@pytest.fixture(scope="module")
def resources(bicep_trees: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = bicep_trees["resources.bicep"]["resources"]
    return tree


def body(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource's body, conditional (``= if (...) {...}``: {condition, config}) or not."""
    config: dict[str, Any] = resource["config"]
    return config["config"] if "condition" in config else config


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


# --- 1. the CPU-only package must not silently become a remote build ------------------------------


def test_azd_version_that_reads_remote_build_false_is_required(azure_yaml: dict[str, Any]) -> None:
    """azd reads `remoteBuild: false` only from 1.23.5 on (azure-dev #6748); an older azd would
    build remotely from requirements.txt (PyPI's CUDA torch). azure.yaml must refuse older azd."""
    assert azure_yaml["services"]["api"]["remoteBuild"] is False
    constraint = str((azure_yaml.get("requiredVersions") or {}).get("azd", ""))
    found = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)", constraint.strip())
    assert found, f"requiredVersions.azd must be '>= X.Y.Z', got {constraint!r}"
    assert version_tuple(found.group(1)) >= (1, 23, 5)
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text()
    assert "azd >= 1.23.5" in deploy_doc or "azd 1.23.5" in deploy_doc, "docs/deploy.md's prerequisites name the azd version"


# --- 2. Windows: every hook has a pwsh variant running the same script -----------------------------


def hooks(azure_yaml: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {f"service {name}": hook for name, hook in azure_yaml["services"]["api"].get("hooks", {}).items()}
    found.update({f"project {name}": hook for name, hook in azure_yaml.get("hooks", {}).items()})
    return found


def test_every_hook_runs_on_windows_and_posix_through_the_same_python_script(azure_yaml: dict[str, Any]) -> None:
    all_hooks = hooks(azure_yaml)
    assert {"service prepackage", "project postdeploy"} <= set(all_hooks)
    for name, hook in all_hooks.items():
        assert set(hook) >= {"posix", "windows"}, f"{name}: no windows (or posix) variant: azd up cannot run there"
        assert hook["windows"]["shell"] == "pwsh" and hook["posix"]["shell"] == "sh", name
        assert hook["windows"]["continueOnError"] == hook["posix"]["continueOnError"], name
        targets = []
        for variant in ("posix", "windows"):
            script = ROOT / hook[variant]["run"]
            assert script.is_file(), f"{name} ({variant}): {hook[variant]['run']} does not exist"
            called = sorted(set(re.findall(r"scripts/(\w+\.py)", script.read_text())))
            assert len(called) == 1, f"{script.name} must run one scripts/*.py, found {called}"
            targets.append(called[0])
        assert targets[0] == targets[1], f"{name}: posix runs {targets[0]}, windows runs {targets[1]}"
        python = ROOT / "scripts" / targets[0]
        imports = re.findall(r"^(?:from|import) (\w+)", python.read_text(), re.M)
        assert not {"shared", "azure", "requests", "yaml"} & set(imports), f"{python.name} must need only the standard library"
    # the PowerShell side finds an interpreter without the project's .venv
    finder = (ROOT / "scripts" / "python.ps1").read_text()
    assert "py" in finder and ".venv" in finder


# --- 3. the Key Vault reference race -------------------------------------------------------------


def test_site_waits_for_the_secret_and_every_role_of_its_identity(resources: dict[str, Any]) -> None:
    """ARM starts the site as soon as its own inputs exist; the Key Vault reference is resolved
    then (and retried only about daily), so the secret and the role must exist first."""
    site = body(resources["functionApp"])
    depends = set(site.get("dependsOn") or [])
    assert {"hfTokenSecret", "keyVaultSecretsUser"} <= depends, f"dependsOn: {sorted(depends)}"
    identity_roles = {
        name
        for name, resource in resources.items()
        if resource["type"] == "Microsoft.Authorization/roleAssignments"
        and "identity" in json.dumps(body(resource)["properties"]["principalId"])
    }
    assert identity_roles, "no role assignment of the app's identity found"
    assert identity_roles <= depends, f"the site does not wait for {sorted(identity_roles - depends)}"


def test_settings_refuse_an_unresolved_key_vault_reference_naming_the_setting_and_the_cause() -> None:
    """An unresolved reference leaves the literal `@Microsoft.KeyVault(...)` in the setting: it is
    refused with the setting's name and the causes to check, never sent to the Hub as a token."""
    settings = Settings.from_env({"HF_TOKEN": REFERENCE, "MODEL_STORAGE": "UseDevelopmentStorage=true"})
    assert REFERENCE not in repr(settings)
    with pytest.raises(SettingsError) as caught:
        _ = settings.hf_token
    message = caught.value.message
    assert message.startswith("HF_TOKEN ") and REFERENCE not in message
    for cause in ("identity", "role", "network"):
        assert cause in message, f"the message does not name the {cause}"
    # other settings are refused at once (a reference is never a connection string or a name)
    for name in ("MODEL_STORAGE", "MODEL_ID", "AzureWebJobsStorage__queueServiceUri"):
        with pytest.raises(SettingsError, match=f"^{name} holds an unresolved Key Vault reference"):
            Settings.from_env({name: f"  {REFERENCE}"})
    # a real token and no token are unchanged
    assert Settings.from_env({"HF_TOKEN": " hf_abc "}).hf_token == "hf_abc"
    assert Settings.from_env({}).hf_token is None


# --- 4. the host's Table endpoint ----------------------------------------------------------------


def test_host_storage_table_endpoint_and_role(resources: dict[str, Any]) -> None:
    """The host keeps its diagnostic events in Table storage: identity-based like blob and queue."""
    settings = {e["name"]: e["value"] for e in body(resources["functionApp"])["properties"]["siteConfig"]["appSettings"]}
    assert "AzureWebJobsStorage__tableServiceUri" in settings
    assert "table" in json.dumps(settings["AzureWebJobsStorage__tableServiceUri"])
    table_role = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"  # Storage Table Data Contributor
    bicep = (INFRA / "resources.bicep").read_text()
    assert table_role in bicep
    assigned = [
        r for r in resources.values()
        if r["type"] == "Microsoft.Authorization/roleAssignments"
        and "storageTableDataContributor" in json.dumps(body(r)["properties"]["roleDefinitionId"])
    ]  # fmt: skip
    assert len(assigned) == 1 and body(assigned[0])["scope"] == "hostStorage"
    assert "identity" in json.dumps(body(assigned[0])["properties"]["principalId"])


# --- 6. sampling must not drop the lines the alerts and the workbook read --------------------------


def test_alerts_and_workbook_read_telemetry_that_is_not_sampled(resources: dict[str, Any]) -> None:
    sampling = json.loads((ROOT / "host.json").read_text())["logging"]["applicationInsights"]["samplingSettings"]
    excluded = {t.strip().lower() for t in str(sampling.get("excludedTypes", "")).split(";") if t.strip()}
    sampled_off = sampling.get("isEnabled") is False
    table_type = {"traces": "trace", "requests": "request", "exceptions": "exception", "customevents": "event"}
    alerts = [r for r in resources.values() if r["type"] == "Microsoft.Insights/scheduledQueryRules"]
    queries = [body(r)["properties"]["criteria"]["allOf"][0]["query"] for r in alerts]
    queries += workbook_queries()
    assert len(queries) >= 2 + 8
    for query in queries:
        table = query.split("|", 1)[0].strip().lower()
        assert table in table_type, f"unknown table {table!r}"
        assert sampled_off or table_type[table] in excluded, f"{table} is sampled (host.json), so this query can miss events: {query[:80]}"


# --- 7. the smaller defects ----------------------------------------------------------------------


def test_key_vault_only_with_a_token(resources: dict[str, Any]) -> None:
    for name in ("keyVault", "hfTokenSecret", "keyVaultSecretsUser"):
        assert resources[name]["config"].get("condition") == "useKeyVault", f"{name} is created without a token"
    assert "Empty: no Key Vault is created" in (INFRA / "main.bicep").read_text()


def test_region_is_limited_to_flex_consumption_regions(bicep_trees: dict[str, dict[str, Any]]) -> None:
    decorators = bicep_trees["main.bicep"]["parameters"]["location"]["decorators"]
    allowed = next((d["argument"] for d in decorators if d["type"] == "allowed"), None)
    assert allowed, "no @allowed list: ARM would fail late, at the plan, in a region without Flex Consumption"
    assert {"eastus", "westeurope", "swedencentral"} <= set(allowed)
    assert not [r for r in allowed if r.endswith("euap")], "a canary region is not for users"


def test_no_preview_api_where_a_ga_one_exists(resources: dict[str, Any]) -> None:
    """Preview API versions in use, each with the reason no GA version fits (none today)."""
    previews = {name: r["api_version"] for name, r in resources.items() if "preview" in r["api_version"]}
    assert previews == {}, f"preview API versions: {previews}"


def test_no_diagnostic_logs_without_a_reader() -> None:
    """Queue diagnostic logs fed nothing (no alert, query or workbook read StorageQueueLogs)."""
    text = "\n".join(path.read_text() for path in INFRA.glob("*.bicep"))
    if "Microsoft.Insights/diagnosticSettings" in text:
        readers = json.dumps(workbook_queries()) + text
        assert "StorageQueueLogs" in readers, "diagnostic settings whose logs nothing reads"


def test_docs_are_current_on_easyauth_and_secrets() -> None:
    every_doc = "\n".join(path.read_text() for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    assert "EasyAuth is not supported on Flex Consumption" not in every_doc
    assert "azd env set HF_TOKEN" not in every_doc, "the token would sit in plain text in .azure/<env>/.env"
    assert "azd env set-secret HF_TOKEN" in (ROOT / "docs" / "deploy.md").read_text()


# --- every user setting is an azd parameter from an environment variable --------------------------

USER_SETTINGS = {
    # Bicep parameter: (azd environment variable, the app setting or Flex property it drives)
    "qaQuantize": ("QA_QUANTIZE", "QA_QUANTIZE"),
    "qaBackend": ("QA_BACKEND", "QA_BACKEND"),
    "modelId": ("MODEL_ID", "MODEL_ID"),
    "modelRevision": ("MODEL_REVISION", "MODEL_REVISION"),
    "modelRefreshSchedule": ("MODEL_REFRESH_SCHEDULE", "MODEL_REFRESH_SCHEDULE"),
    "instanceMemoryMB": ("INSTANCE_MEMORY_MB", "instanceMemoryMB"),
    "maximumInstanceCount": ("MAXIMUM_INSTANCE_COUNT", "maximumInstanceCount"),
    "alwaysReadyHttpInstances": ("ALWAYS_READY_HTTP_INSTANCES", "alwaysReady"),
    "qaMaxConcurrent": ("QA_MAX_CONCURRENT", "QA_MAX_CONCURRENT"),
    "hfToken": ("HF_TOKEN", "HF_TOKEN"),
    "alertEmail": ("ALERT_EMAIL", "emailReceivers"),
}


def test_every_user_setting_is_an_azd_parameter_with_its_documented_default(bicep_trees: dict[str, dict[str, Any]]) -> None:
    """Set with `azd env set NAME value`, kept in .azure/<env>/.env, applied on every provision."""
    params = bicep_trees["main.bicep"]["parameters"]
    mapped = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text()
    resources_text = (INFRA / "resources.bicep").read_text()
    for param, (variable, drives) in USER_SETTINGS.items():
        assert param in params, param
        value = mapped.get(param, {}).get("value")
        assert isinstance(value, str), f"{param} is not in main.parameters.json: a provision resets it"
        found = re.fullmatch(r"\$\{(\w+)(?:=(.*))?\}", value)
        assert found and found.group(1) == variable, f"{param}: {value!r} should read ${{{variable}=...}}"
        default = params[param].get("default")
        assert found.group(2) == ("" if default is None else str(default)), f"{param}: default {found.group(2)!r} vs Bicep {default!r}"
        assert f"`{variable}`" in deploy_doc, f"docs/deploy.md does not document {variable}"
        assert drives in resources_text, f"{param} drives nothing named {drives}"


# --- the workbook --------------------------------------------------------------------------------


def workbook() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((INFRA / "workbook.json").read_text())
    return data


def workbook_queries() -> list[str]:
    return [item["content"]["query"] for item in workbook()["items"] if item["type"] == 3]


# The event-line contract (shared/telemetry/events.py, log_event; docs/operations.md, "Event lines"): the
# fields a query may parse from each event.
EVENT_FIELDS = {
    "ask": {"status", "error_code", "items", "windows", "seconds", "model_ms", "model_id", "revision", "backend", "variant"},
    "model_load": {"model_id", "revision", "backend", "variant", "mode", "bytes", "seconds", "outcome", "error_code"},
    "refresh": {"outcome", "model_id", "revision", "bytes", "seconds", "error_code", "reason"},
}


def logged_fields() -> dict[str, set[str]]:
    """event name -> the fields the code passes to log_event (every call in shared/, by its AST)."""
    import ast

    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "shared").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "log_event":
                name = node.args[1] if len(node.args) > 1 else None
                assert isinstance(name, ast.Constant), f"{path.name}:{node.lineno}: an event name must be a literal"
                found.setdefault(name.value, set()).update(k.arg for k in node.keywords if k.arg not in (None, "level"))
    return found


def test_the_event_contract_is_what_the_code_logs() -> None:
    """The queries are checked against EVENT_FIELDS; EVENT_FIELDS is what the code sends (the
    exported records carry the same fields as the line, tests/integration/test_event_delivery.py)."""
    assert logged_fields() == EVENT_FIELDS


def parsed_fields(query: str) -> set[str]:
    found = re.search(r"parse-kv message as \((.*?)\)\s*with", query, re.S)
    return {part.split(":")[0].strip() for part in found.group(1).split(",")} if found else set()


def test_workbook_charts_read_the_event_lines_of_the_contract(resources: dict[str, Any]) -> None:
    doc = workbook()
    assert doc["version"] == "Notebook/1.0"
    charts = {item["name"]: item["content"] for item in doc["items"] if item["type"] == 3}
    # what the issue asks the workbook to show
    wanted = ("asks-per-minute-by-status", "model-time-by-backend", "busy-and-not-ready", "load-seconds", "fallbacks", "refresh-outcomes")
    for name in (*wanted, "refreshes"):
        assert name in charts, f"no {name} chart"
    assert "bin(timestamp, 1m)" in charts["asks-per-minute-by-status"]["query"]
    assert {"p50_ms", "p95_ms"} <= set(re.findall(r"(p\d+_ms)", charts["model-time-by-backend"]["query"]))
    assert '"busy"' in charts["busy-and-not-ready"]["query"] and '"model_not_ready"' in charts["busy-and-not-ready"]["query"]
    for name, chart in charts.items():
        query = chart["query"]
        event = re.search(r'startswith "event=(\w+) "', query)
        if event is None:
            assert name == "poison", f"{name} reads no event line"
            continue
        unknown = parsed_fields(query) - EVENT_FIELDS[event.group(1)]
        assert not unknown, f"{name} parses {sorted(unknown)}, not fields of event={event.group(1)}"
        assert chart["resourceType"] == "microsoft.insights/components" and chart["queryType"] == 0
    # shipped with the app: a workbook resource loading this file, on the app's Application Insights
    wb = body(resources["workbook"])
    source = {"operator": {"type": "property_accessor", "operands": {"operand_1": "applicationInsights", "operand_2": "id"}}}
    assert wb["properties"]["sourceId"] == source


def test_workbook_opened_from_azure_monitor_queries_the_apps_application_insights(resources: dict[str, Any]) -> None:
    """``fallbackResourceIds`` is what a workbook opened outside its resource (Azure Monitor >
    Workbooks) queries: the app's Application Insights (set by Bicep, the id being known only
    there), not the placeholder "Azure Monitor", under which every query had no resource."""
    assert "fallbackResourceIds" not in workbook(), "set by infra/resources.bicep from the resource id"
    serialized = body(resources["workbook"])["properties"]["serializedData"]["function"]
    assert serialized["type"] == "string"
    merged = serialized["parameters"]["value_to_convert"]["function"]
    assert merged["type"] == "union"
    loaded, added = merged["parameters"]["arg_1"]["function"], merged["parameters"]["arg_2"]
    assert loaded["type"] == "load_json_content" and loaded["parameters"]["file_path"] == "workbook.json"
    app_insights = {"operator": {"type": "property_accessor", "operands": {"operand_1": "applicationInsights", "operand_2": "id"}}}
    assert added == {"fallbackResourceIds": [app_insights]}


def test_alerts_read_the_event_lines_of_the_contract(resources: dict[str, Any]) -> None:
    alerts = [body(r) for r in resources.values() if r["type"] == "Microsoft.Insights/scheduledQueryRules"]
    events = 0
    for alert in alerts:
        query = alert["properties"]["criteria"]["allOf"][0]["query"]
        event = re.search(r'startswith "event=(\w+) "', query)
        if event:
            events += 1
            unknown = parsed_fields(query) - EVENT_FIELDS[event.group(1)]
            assert not unknown, f"{alert['properties']['displayName']} parses {sorted(unknown)}, not fields of event={event.group(1)}"
    assert events >= 1, "no alert reads an event line"


def test_documented_queries_are_the_workbooks() -> None:
    """The saved queries of docs/operations.md are the workbook's, word for word (no second copy to drift)."""
    operations_doc = (ROOT / "docs" / "operations.md").read_text()
    saved = operations_doc.split("## Workbook and saved queries", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```kusto\n(.*?)```", saved, re.S)
    assert blocks, "no query in docs/operations.md, Workbook and saved queries"
    queries = {q.strip() for q in workbook_queries()}
    for block in blocks:
        for query in re.split(r"\n\s*\n", block.strip()):
            query = "\n".join(line for line in query.splitlines() if not line.startswith("//")).strip()
            assert query in queries, f"docs/operations.md query not in infra/workbook.json:\n{query}"


def test_local_settings_example_names_every_azd_setting() -> None:
    example = json.loads((ROOT / "local.settings.json.example").read_text())["Values"]
    for _param, (variable, drives) in USER_SETTINGS.items():
        if drives == variable:
            assert variable in example, f"{variable} is missing from local.settings.json.example"


def test_paths_in_this_file_exist() -> None:
    for path in (ROOT / "scripts" / "smoke", INFRA / "workbook.json", ROOT / "requirements.lock"):
        assert Path(path).is_file(), path
