"""Which account ``adopt`` reads, and what of it a manifest keeps: never a key or a SAS token."""

from __future__ import annotations

import argparse

import pytest
from azure.storage.blob import ContainerClient

from shared.cli.isolate_commands import _adopt_connection, _container_name, _same_container
from shared.errors import InputError, SettingsError
from shared.refresh.container_source import ContainerSource
from shared.settings import Settings

KEY = "a2V5IG9mIHRoZSBvbGQgc2NyaXB0cw=="
OLD = f"DefaultEndpointsProtocol=https;AccountName=oldacct;AccountKey={KEY};EndpointSuffix=core.windows.net"
STORE = "UseDevelopmentStorage=true"


def args(account_url: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(account_url=account_url)


def test_the_source_account_is_the_url_given_else_the_old_scripts_setting_else_the_store() -> None:
    both = Settings.from_env({"MODEL_STORAGE": STORE, "AZURE_STORAGE_CONNECTION_STRING": OLD})
    identity = _adopt_connection(args("https://oldacct.blob.core.windows.net/"), both)
    assert (identity.setting, identity.blob_service_uri, identity.connection_string) == (
        "--account-url",
        "https://oldacct.blob.core.windows.net",
        None,
    )
    old = _adopt_connection(args(), both)
    assert (old.setting, old.connection_string) == ("AZURE_STORAGE_CONNECTION_STRING", OLD)
    same = _adopt_connection(args(), Settings.from_env({"MODEL_STORAGE": STORE}))
    assert (same.setting, same.connection_string) == ("MODEL_STORAGE", STORE)
    with pytest.raises(SettingsError, match="No storage configured"):
        _adopt_connection(args(), Settings.from_env({}))


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("https://oldacct.blob.core.windows.net/?sv=2024&sig=SECRET", "without a SAS token"),
        ("oldacct.blob.core.windows.net", "must be the account's blob endpoint"),
        ("ftp://oldacct", "must be the account's blob endpoint"),
    ],
)
def test_an_account_url_with_a_sas_or_no_scheme_is_refused(url: str, said: str) -> None:
    with pytest.raises(InputError, match=said) as raised:
        _adopt_connection(args(url), Settings.from_env({}))
    assert "SECRET" not in raised.value.message


def test_container_names_follow_azures_rules() -> None:
    assert _container_name("ml-poc-container") == "ml-poc-container"
    with pytest.raises(InputError, match="--container must be a valid container name"):
        _container_name("ML_POC")


def test_the_provenance_names_the_account_and_never_its_credentials() -> None:
    with_sas = ContainerClient.from_container_url("https://oldacct.blob.core.windows.net/ml-poc-container?sv=2024-01-01&sig=SECRET")
    source = ContainerSource(with_sas, prefix="/exports/squad/")
    assert source.provenance_base() == {
        "kind": "blob",
        "account": "oldacct",
        "endpoint": "https://oldacct.blob.core.windows.net",
        "container": "ml-poc-container",
        "prefix": "exports/squad/",
    }
    assert source.where == "container ml-poc-container/exports/squad of account oldacct" and source.name == "squad"
    keyed = ContainerSource(ContainerClient.from_connection_string(OLD, "ml-poc-container"))
    assert KEY not in repr(keyed.provenance_base()) and keyed.provenance_base()["prefix"] == "" and keyed.name == "ml-poc-container"


def test_the_container_adopted_is_never_the_one_versions_are_written_to() -> None:
    store = "http://127.0.0.1:10000/devstoreaccount1/models"
    assert _same_container("http://127.0.0.1:10000/devstoreaccount1/models?sv=x&sig=y", store)
    assert _same_container(
        "https://OldAcct.blob.core.windows.net/ml-poc-container/", "https://oldacct.blob.core.windows.net/ml-poc-container"
    )
    assert not _same_container("http://127.0.0.1:10000/devstoreaccount1/ml-poc-container", store)
    assert not _same_container("http://127.0.0.1:10001/devstoreaccount1/models", store)
