"""infra/ and the code agree: every setting the code reads is set in Bicep or reviewed as a
default, every trigger's %SETTING% and connection resolves, and no key or deprecated setting."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from shared.settings import Settings, app_insights_from_env, parse_app_insights_authentication
from tests.conftest import registered_functions
from tests.deploy.conftest import INFRA

pytestmark = pytest.mark.deploy

# Settings read by shared/settings.py that infra/ leaves unset on purpose: the default is right
# on Flex Consumption (reviewed; docs/settings.md). A name the code reads that is in neither this
# list nor the Bicep app settings fails the test, so a new setting gets a decision.
DEFAULT_IS_RIGHT = {
    "AzureWebJobsStorage": "no connection string: identity-based AzureWebJobsStorage__* instead",
    "AzureWebJobsStorage__accountName": "the service URIs are set instead (a sovereign cloud needs them)",
    "MODEL_STORAGE": "no connection string: MODEL_STORAGE__blobServiceUri + __clientId instead",
    "MODEL_KEEP_VERSIONS": "3 versions of 1.34 GB: a few GB of Hot blob storage",
    "MODEL_CACHE_DIR": "memory mode on Flex: 0.8 GB of temp disk cannot hold bert-large",
    "MODEL_POLL_SECONDS": "60 s: a new version reaches every instance within a minute",
    "MODEL_CANARY": "the bert-large-squad canary; set your own for another model",
    "MODEL_TRANSFER_CONCURRENCY": "4 ranges in flight: the bounded-memory copy of docs/refresh.md",
    "MODEL_BLOCK_SIZE_MB": "8 MB blocks: 41 MB copy buffers with the default concurrency",
    "MODEL_ARTIFACTS": "fp32,int8 ONNX artifacts, so QA_QUANTIZE can switch without a refresh",
    "QA_THREADS": "derived from the instance's CPU quota and QA_MAX_CONCURRENT",
    "QA_MAX_CONTEXT_CHARS": "request limits: the defaults of docs/settings.md",
    "QA_MAX_QUESTION_CHARS": "request limits: the defaults of docs/settings.md",
    "QA_MAX_QUESTION_TOKENS": "request limits: the defaults of docs/settings.md",
    "QA_MAX_ITEMS": "request limits: the defaults of docs/settings.md",
    "QA_MAX_WINDOWS": "request limits: the defaults of docs/settings.md",
    "QA_BATCH_WINDOWS": "auto: runs sized for the instance's CPU (an integer overrides)",
    "QA_DEADLINE_SECONDS": "60 s, well under the 230 s HTTP limit",
    "HF_ENDPOINT": "the Hub itself",
    "AZURE_STORAGE_CONNECTION_STRING": "read by python -m shared adopt on an operator's machine; the app never uses it",
    "WEBSITE_SITE_NAME": "set by the platform: the app's name, the exported events' cloud_RoleName",
}
# Settings Flex Consumption deprecates or ignores (Microsoft Learn, "Flex Consumption plan
# deprecations", and azure-functions-doctor's list).
FLEX_DEPRECATED = {
    "FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_WORKER_RUNTIME_VERSION", "FUNCTIONS_EXTENSION_VERSION",
    "FUNCTIONS_WORKER_PROCESS_COUNT", "FUNCTIONS_MAX_HTTP_CONCURRENCY", "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "ENABLE_ORYX_BUILD", "WEBSITE_CONTENTSHARE", "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTOVERVNET", "WEBSITE_RUN_FROM_PACKAGE", "WEBSITE_SKIP_CONTENTSHARE_VALIDATION",
    "WEBSITE_VNET_ROUTE_ALL", "WEBSITE_MAX_DYNAMIC_APPLICATION_SCALE_OUT", "WEBSITE_NODE_DEFAULT_VERSION",
    "WEBSITE_DNS_SERVER", "PYTHON_THREADPOOL_THREAD_COUNT", "linuxFxVersion",
}  # fmt: skip


class RecordingEnv(dict[str, str]):
    """An empty environment that records every name the settings code asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)


def settings_read_by_code() -> set[str]:
    env = RecordingEnv()
    Settings.from_env(env)
    telemetry = RecordingEnv()  # with a connection string, so that every telemetry setting is read
    telemetry["APPLICATIONINSIGHTS_CONNECTION_STRING"] = "InstrumentationKey=00000000-0000-0000-0000-000000000001"
    app_insights_from_env(telemetry)
    return env.read | telemetry.read


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


@pytest.fixture(scope="module")
def site(bicep_trees: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sites = [r for r in bicep_trees["resources.bicep"]["resources"].values() if r["type"] == "Microsoft.Web/sites"]
    assert len(sites) == 1
    return sites[0]["config"]


@pytest.fixture(scope="module")
def app_settings(site: dict[str, Any]) -> dict[str, Any]:
    entries = site["properties"]["siteConfig"]["appSettings"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), "an app setting is set twice"
    return {entry["name"]: entry["value"] for entry in entries}


def test_every_setting_the_code_reads_is_set_in_bicep_or_reviewed(app_settings: dict[str, Any]) -> None:
    read = settings_read_by_code()
    assert {"MODEL_ID", "MODEL_REFRESH_QUEUE", "MODEL_STORAGE__blobServiceUri"} <= read, "the recording saw too little"
    undecided = sorted(read - set(app_settings) - set(DEFAULT_IS_RIGHT))
    assert not undecided, f"set these in infra/resources.bicep or review their defaults in DEFAULT_IS_RIGHT: {undecided}"
    both = sorted(set(app_settings) & set(DEFAULT_IS_RIGHT))
    assert not both, f"set in Bicep and listed as default: {both}"
    stale = sorted(set(DEFAULT_IS_RIGHT) - read)
    assert not stale, f"no longer read by shared/settings.py: {stale}"


def test_triggers_resolve_in_the_app_settings(app_settings: dict[str, Any]) -> None:
    used: set[str] = set()
    connections: set[str] = set()
    for function in registered_functions().values():
        for binding in function.get_bindings():
            data = binding.get_dict_repr()
            for value in data.values():
                if isinstance(value, str):
                    used.update(re.findall(r"%([A-Za-z0-9_]+)%", value))
            if data.get("connection"):
                connections.add(data["connection"])
    assert {"MODEL_REFRESH_SCHEDULE", "MODEL_REFRESH_QUEUE"} <= used
    missing = sorted(name for name in used if not isinstance(app_settings.get(name), str) and name not in app_settings)
    assert not missing, f"%SETTING% of a trigger with no app setting: {missing}"
    for connection in connections:
        # An identity-based connection: credential + service URIs, no connection string.
        assert connection not in app_settings, f"{connection} must be identity-based, not a connection string"
        assert app_settings.get(f"{connection}__credential") == "managedidentity"
        for key in ("clientId", "blobServiceUri", "queueServiceUri"):
            assert f"{connection}__{key}" in app_settings, f"{connection}__{key} is not set"


def test_identity_based_prefixes_are_configured(app_settings: dict[str, Any]) -> None:
    read = settings_read_by_code()
    prefixes = {name.split("__", 1)[0] for name in read if "__" in name}
    assert prefixes == {"MODEL_STORAGE", "AzureWebJobsStorage"}
    for prefix in prefixes:
        assert f"{prefix}__blobServiceUri" in app_settings, prefix
        assert f"{prefix}__clientId" in app_settings, f"{prefix}: a user-assigned identity needs its client id"


def test_http_concurrency_follows_qa_max_concurrent(site: dict[str, Any], app_settings: dict[str, Any]) -> None:
    scale = site["properties"]["functionAppConfig"]["scaleAndConcurrency"]
    assert scale["triggers"]["http"]["perInstanceConcurrency"] == "qaMaxConcurrent"
    assert "qaMaxConcurrent" in str(app_settings["QA_MAX_CONCURRENT"])
    assert site["properties"]["functionAppConfig"]["runtime"] == {"name": "python", "version": "3.11"}


def test_bicep_literal_settings_parse_with_the_apps_settings_code(
    app_settings: dict[str, Any], bicep_trees: dict[str, dict[str, Any]]
) -> None:
    """The values Bicep sets (parameters at their defaults) are accepted by Settings.from_env."""
    params = {**bicep_trees["main.bicep"]["parameters"]}
    variables = bicep_trees["resources.bicep"]["variables"]
    env: dict[str, str] = {}
    for name, value in app_settings.items():
        if isinstance(value, str) and value in params and "default" in params[value]:
            value = params[value]["default"]
        elif isinstance(value, str) and value in variables:
            value = variables[value]["value"]
        if isinstance(value, (str, int)) and "$" not in str(value):
            env[name] = str(value)
    env["AzureWebJobsStorage__blobServiceUri"] = "https://host.blob.core.windows.net/"
    env["AzureWebJobsStorage__queueServiceUri"] = "https://host.queue.core.windows.net/"
    env["MODEL_STORAGE__blobServiceUri"] = "https://model.blob.core.windows.net/"
    assert {"MODEL_ID", "MODEL_REFRESH_SCHEDULE", "QA_BACKEND"} <= set(env)
    settings = Settings.from_env(env)
    assert settings.refresh_queue == "model-refresh" and settings.container == "models"
    assert settings.storage is not None and settings.storage.connection_string is None


def test_no_keys_connection_strings_or_deprecated_settings_in_infra(app_settings: dict[str, Any]) -> None:
    text = "\n".join(path.read_text() for path in sorted(INFRA.glob("*")) if path.is_file())
    forbidden_words = ("listKeys(", "listkeys(", "AccountKey=", "DefaultEndpointsProtocol=", "SharedAccessSignature", "primaryKey")
    for forbidden in (*forbidden_words, "InstrumentationKey="):
        assert forbidden not in text, f"{forbidden} in infra/"
    assert "allowSharedKeyAccess: true" not in text and text.count("allowSharedKeyAccess: false") == 2
    assert re.search(r"output\s+\S+\s+\S+\s*=\s*.*(hfToken|secret|key)", text, re.IGNORECASE) is None, "a secret in outputs"
    deprecated = sorted(name for name in FLEX_DEPRECATED if re.search(rf"\b{name}\b", text))
    assert not deprecated, f"Flex Consumption deprecates {deprecated}"
    bare = ("AzureWebJobsStorage", "MODEL_STORAGE")
    connection_strings = [name for name in app_settings if name.endswith("CONNECTION_STRING") or name in bare]
    assert connection_strings == ["APPLICATIONINSIGHTS_CONNECTION_STRING"]
    assert app_settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"].endswith("Authorization=AAD")


def test_the_apps_event_export_signs_in_as_the_apps_identity_with_the_role_to_publish(
    app_settings: dict[str, Any], bicep_trees: dict[str, dict[str, Any]]
) -> None:
    """The exporter in the app (shared/telemetry/export.py) reads the authentication string Bicep
    writes as a user-assigned identity's, and that identity may publish to Application Insights."""
    written = str(app_settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"])
    assert "identity.properties.clientId" in written
    resolved = re.sub(r"\$\{[^}]*\}", "11111111-2222-3333-4444-555555555555", written)
    assert parse_app_insights_authentication("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", resolved) == (
        True,
        "11111111-2222-3333-4444-555555555555",
    )
    publishers = [
        r["config"]
        for r in bicep_trees["resources.bicep"]["resources"].values()
        if r["type"] == "Microsoft.Authorization/roleAssignments" and "monitoringMetricsPublisher" in str(r["config"])
    ]
    assert len(publishers) == 1 and publishers[0]["scope"] == "applicationInsights"
    assert "identity" in str(publishers[0]["properties"]["principalId"])


def test_hf_token_is_a_key_vault_reference_through_the_identity(site: dict[str, Any], bicep_trees: dict[str, dict[str, Any]]) -> None:
    accessor = {"type": "property_accessor", "operands": {"operand_1": "identity", "operand_2": "id"}}
    assert site["properties"]["keyVaultReferenceIdentity"] == {"operator": accessor}
    reference = str(bicep_trees["resources.bicep"]["variables"]["hfTokenReference"]["value"])
    assert "@Microsoft.KeyVault(VaultName=" in reference
    hf_param = bicep_trees["main.bicep"]["parameters"]["hfToken"]
    assert any(d.get("type") == "secure" for d in hf_param["decorators"])
