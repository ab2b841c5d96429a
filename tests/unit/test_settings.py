"""Settings: defaults, tiny parsers, and errors that name the bad setting."""

from __future__ import annotations

import pytest

from shared.errors import SettingsError
from shared.settings import DEFAULT_MODEL_ID, Settings, app_insights_from_env, parse_canary, parse_int, parse_storage


def test_defaults_without_any_setting() -> None:
    settings = Settings.from_env({})
    assert settings.storage is None
    assert settings.container == "models"
    assert settings.model_id == DEFAULT_MODEL_ID
    assert settings.model_revision == "main"
    assert settings.keep_versions == 3
    assert settings.load_mode == "memory"
    assert settings.reload == "replace"
    assert settings.poll_seconds == 60.0
    assert settings.quantize == "none"
    assert settings.batch_windows == "auto"
    with pytest.raises(SettingsError, match="MODEL_STORAGE"):
        settings.require_storage()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MODEL_KEEP_VERSIONS", "1"),
        ("MODEL_KEEP_VERSIONS", "three"),
        ("QA_MAX_WINDOWS", "0"),
        ("QA_DEADLINE_SECONDS", "nan"),
        ("MODEL_POLL_SECONDS", "-1"),
        ("MODEL_LOAD_MODE", "gpu"),
        ("MODEL_RELOAD", "sometimes"),
        ("QA_QUANTIZE", "int4"),
        ("MODEL_CONTAINER", "Bad_Name"),
        ("MODEL_REFRESH_QUEUE", "x"),
        ("MODEL_ID", "../etc"),
        ("MODEL_ID", "a/b/c"),
        ("MODEL_CANARY", "{not json"),
        ("MODEL_CANARY", '{"question": "q"}'),
        ("MODEL_TRANSFER_CONCURRENCY", "64"),
        ("QA_BATCH_WINDOWS", "0"),
        ("QA_BATCH_WINDOWS", "automatic"),
    ],
)
def test_bad_values_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_disk_mode_needs_a_cache_dir_and_defaults_to_overlap(tmp_path: object) -> None:
    with pytest.raises(SettingsError, match="MODEL_CACHE_DIR"):
        Settings.from_env({"MODEL_LOAD_MODE": "disk"})
    settings = Settings.from_env({"MODEL_LOAD_MODE": "disk", "MODEL_CACHE_DIR": str(tmp_path)})
    assert settings.reload == "overlap"
    assert Settings.from_env({"MODEL_LOAD_MODE": "disk", "MODEL_CACHE_DIR": "/x", "MODEL_RELOAD": "replace"}).reload == "replace"


def test_storage_precedence_and_identity() -> None:
    assert parse_storage({}) is None
    conn = parse_storage({"MODEL_STORAGE": "UseDevelopmentStorage=true", "AzureWebJobsStorage": "other"})
    assert conn is not None and conn.setting == "MODEL_STORAGE" and conn.connection_string == "UseDevelopmentStorage=true"
    fallback = parse_storage({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    assert fallback is not None and fallback.setting == "AzureWebJobsStorage"
    identity = parse_storage({"MODEL_STORAGE__blobServiceUri": "https://acct.blob.core.windows.net", "MODEL_STORAGE__clientId": "abc"})
    assert identity is not None and identity.connection_string is None
    assert identity.blob_service_uri == "https://acct.blob.core.windows.net"
    assert identity.client_id == "abc"
    host = parse_storage({"AzureWebJobsStorage__accountName": "hostacct"})
    assert host is not None and host.blob_service_uri == "https://hostacct.blob.core.windows.net"
    with pytest.raises(SettingsError, match="blobServiceUri"):
        parse_storage({"MODEL_STORAGE__blobServiceUri": "acct"})


def test_storage_repr_hides_the_key() -> None:
    conn = parse_storage({"MODEL_STORAGE": "AccountName=a;AccountKey=SECRETKEYXYZ"})
    assert "SECRETKEY" not in repr(conn)
    assert "SECRETKEY" not in repr(Settings.from_env({"MODEL_STORAGE": "AccountName=a;AccountKey=SECRETKEYXYZ", "HF_TOKEN": "hf_x"}))
    assert "hf_x" not in repr(Settings.from_env({"HF_TOKEN": "hf_x"}))


def test_the_adopted_containers_account_is_read_as_the_old_scripts_did() -> None:
    assert Settings.from_env({}).adopt_storage is None
    settings = Settings.from_env({"AZURE_STORAGE_CONNECTION_STRING": " AccountName=old;AccountKey=SECRETKEYXYZ "})
    assert settings.adopt_storage is not None and settings.adopt_storage.setting == "AZURE_STORAGE_CONNECTION_STRING"
    assert settings.adopt_storage.connection_string == "AccountName=old;AccountKey=SECRETKEYXYZ"
    assert settings.storage is None  # the model store's account is another setting
    assert "SECRETKEY" not in repr(settings)
    with pytest.raises(SettingsError, match="AZURE_STORAGE_CONNECTION_STRING: AccountKey is not valid base64"):
        Settings.from_env({"AZURE_STORAGE_CONNECTION_STRING": "AccountName=old;AccountKey=cut-off"})


def test_queue_storage_is_the_host_account() -> None:
    from shared.settings import parse_queue_storage

    assert parse_queue_storage({"MODEL_STORAGE": "UseDevelopmentStorage=true"}) is None
    with pytest.raises(SettingsError, match="AzureWebJobsStorage"):
        Settings.from_env({"MODEL_STORAGE": "UseDevelopmentStorage=true"}).require_queue_storage()
    conn = parse_queue_storage({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    assert conn is not None and conn.connection_string == "UseDevelopmentStorage=true"
    identity = parse_queue_storage({"AzureWebJobsStorage__accountName": "hostacct", "AzureWebJobsStorage__clientId": "c"})
    assert identity is not None and identity.queue_service_uri == "https://hostacct.queue.core.windows.net"
    assert identity.client_id == "c"


def test_parsers() -> None:
    assert parse_int("N", None, 5) == 5
    assert parse_int("N", " 7 ", 5) == 7
    canary = parse_canary("MODEL_CANARY", '{"question": "q?", "context": "c."}')
    assert canary.answer is None and canary.question == "q?"
    assert parse_canary("MODEL_CANARY", None).answer == "Paris"


def test_backend_artifacts_and_threads() -> None:
    from shared.settings import parse_artifacts

    default = Settings.from_env({})
    assert (default.backend, default.artifacts, default.threads) == ("onnx", ("fp32", "int8"), None)
    chosen = Settings.from_env({"QA_BACKEND": "Torch", "MODEL_ARTIFACTS": "int8, fp32", "QA_THREADS": "3"})
    assert (chosen.backend, chosen.artifacts, chosen.threads) == ("torch", ("fp32", "int8"), 3)
    assert parse_artifacts("MODEL_ARTIFACTS", "none") == ()
    assert parse_artifacts("MODEL_ARTIFACTS", "int8") == ("int8",)
    for bad in ("fp16", "none,int8", ","):
        with pytest.raises(SettingsError, match="MODEL_ARTIFACTS"):
            parse_artifacts("MODEL_ARTIFACTS", bad)
    with pytest.raises(SettingsError, match="QA_BACKEND"):
        Settings.from_env({"QA_BACKEND": "tensorrt"})
    with pytest.raises(SettingsError, match="QA_THREADS"):
        Settings.from_env({"QA_THREADS": "0"})


def test_batch_windows_is_auto_or_a_fixed_count() -> None:
    assert Settings.from_env({"QA_BATCH_WINDOWS": " Auto "}).batch_windows == "auto"
    assert Settings.from_env({"QA_BATCH_WINDOWS": ""}).batch_windows == "auto"
    assert Settings.from_env({"QA_BATCH_WINDOWS": "8"}).batch_windows == 8
    assert Settings.from_env({"QA_BATCH_WINDOWS": "1"}).batch_windows == 1
    with pytest.raises(SettingsError, match="QA_BATCH_WINDOWS must be auto or a whole number"):
        Settings.from_env({"QA_BATCH_WINDOWS": "many"})


# --- Application Insights (telemetry starts on import, apart from Settings) -------------------

CONNECTION = (
    "InstrumentationKey=00000000-0000-0000-0000-000000000001;IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/"
)


def test_no_connection_string_no_telemetry() -> None:
    assert app_insights_from_env({}) is None
    assert app_insights_from_env({"APPLICATIONINSIGHTS_CONNECTION_STRING": "  ", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "x"}) is None


@pytest.mark.parametrize(
    ("raw", "identity", "client_id"),
    [
        ("", False, None),
        ("Authorization=AAD", True, None),
        ("Authorization=AAD;ClientId=1111-2222", True, "1111-2222"),  # as infra/ writes it, either order
        ("ClientId=1111-2222;Authorization=AAD", True, "1111-2222"),
        (" authorization = aad ; clientid = abc ; ", True, "abc"),
    ],
)
def test_authentication_string_as_the_platform_defines_it(raw: str, identity: bool, client_id: str | None) -> None:
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION, "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": raw}
    target = app_insights_from_env({**env, "WEBSITE_SITE_NAME": "func-x"})
    assert target is not None
    assert (target.identity, target.client_id, target.role_name) == (identity, client_id, "func-x")
    assert target.connection_string == CONNECTION


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("APPLICATIONINSIGHTS_CONNECTION_STRING", "not a connection string"),
        ("APPLICATIONINSIGHTS_CONNECTION_STRING", "IngestionEndpoint=https://x.in.applicationinsights.azure.com/"),
        ("APPLICATIONINSIGHTS_CONNECTION_STRING", "InstrumentationKey=abc;IngestionEndpoint=westeurope"),
        ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "Authorization=Key"),
        ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "ClientId=abc"),
        ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "Authorization=AAD;ClientId="),
        ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "Authorization=AAD;TenantId=abc"),
        ("APPLICATIONINSIGHTS_CONNECTION_STRING", "@Microsoft.KeyVault(SecretName=ai)"),
    ],
)
def test_bad_telemetry_settings_name_the_setting(name: str, value: str) -> None:
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION, name: value}
    with pytest.raises(SettingsError, match=name):
        app_insights_from_env(env)


def test_telemetry_target_repr_hides_the_instrumentation_key() -> None:
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION, "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "Authorization=AAD"}
    target = app_insights_from_env(env)
    assert "00000000-0000-0000-0000-000000000001" not in repr(target)
    assert "westeurope-5.in.applicationinsights.azure.com" in repr(target) and "system-assigned" in repr(target)
