"""Both ways of reaching storage: connection strings (full and UseDevelopmentStorage) and identity."""

from __future__ import annotations

import pytest

from shared.settings import Settings, parse_storage
from shared.store.storage import blob_service_client, container_client


@pytest.mark.integration
def test_full_connection_string_reaches_azurite(azurite: str) -> None:
    client = blob_service_client(parse_storage({"MODEL_STORAGE": azurite}))  # type: ignore[arg-type]
    client.get_service_properties()


@pytest.mark.integration
def test_use_development_storage_reaches_azurite_on_default_ports(azurite: str) -> None:
    if "127.0.0.1:10000" not in azurite:
        pytest.skip("Azurite is not on its default ports; UseDevelopmentStorage=true means 10000-10002")
    client = blob_service_client(parse_storage({"AzureWebJobsStorage": "UseDevelopmentStorage=true"}))  # type: ignore[arg-type]
    client.get_service_properties()


def test_identity_connection_uses_default_azure_credential() -> None:
    from azure.identity import DefaultAzureCredential

    settings = Settings.from_env(
        {"MODEL_STORAGE__blobServiceUri": "https://acct.blob.core.windows.net", "MODEL_STORAGE__clientId": "client-1"}
    )
    container = container_client(settings.require_storage(), settings.container)
    assert container.url == "https://acct.blob.core.windows.net/models"
    assert isinstance(container.credential, DefaultAzureCredential)


def test_serving_profile_has_short_timeouts() -> None:
    conn = parse_storage({"MODEL_STORAGE": "UseDevelopmentStorage=true"})
    assert conn is not None
    serving = blob_service_client(conn, profile="serving")
    policy = serving._pipeline._impl_policies  # type: ignore[attr-defined]
    retry = next(p for p in policy if type(p).__name__ == "ExponentialRetry" or "Retry" in type(p).__name__)
    assert retry.total_retries <= 2
