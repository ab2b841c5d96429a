"""Blob and Queue clients built from :class:`~shared.settings.StorageConnection`.

Three profiles. ``serving`` (HTTP routes, the holder's loads, the CLI's probe) fails fast: an
explicit retry policy of one retry after one second, short connect and read timeouts, and longer
read timeouts only for model ranges (:data:`RANGE_READ_TIMEOUT`), so that a request facing a dead
or silent account answers within seconds. ``command`` (the command line's writes: isolate,
build-artifacts, rollback) retries a little, then stops: a terminal is waiting. ``worker`` (the
queue-triggered refresh) keeps patient retries: minutes of waiting are cheaper there than a failed
1.3 GB copy. Whatever the profile, once storage has failed, the writes that only record the outcome
(``last-refresh.json``, the lease's release) make one quick attempt (:data:`QUICK`).

The storage SDK ignores azure-core's ``retry_backoff_factor``: its own ``ExponentialRetry``
defaults wait 15 s then 18 s, hence the explicit ``retry_policy`` of each profile.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobServiceClient, ContainerClient, ExponentialRetry, LinearRetry

from ..errors import NotFoundError, QAError, SettingsError, StorageCredentialsError, StorageUnavailableError
from ..settings import StorageConnection

# The SDK logs every request and response header at INFO; that is noise and may carry SAS tokens.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
logging.getLogger("azure.identity").setLevel(logging.WARNING)

log = logging.getLogger(__name__)

# Serving: at worst 2 attempts x 3 s + 1 s of backoff for a small read against a silent endpoint.
SERVING_CONNECT_TIMEOUT = 3
SERVING_READ_TIMEOUT = 3
SERVING_RETRIES = 1
SERVING_BACKOFF = 1
# An 8 MB range on a slow link needs longer than a small JSON read; passed per operation.
RANGE_READ_TIMEOUT = 30
REFRESH_OPTIONS: dict[str, Any] = {"connection_timeout": 20, "read_timeout": 120}
# The command line: 3 attempts, 2 s apart; an unreachable account fails in about 5 s.
COMMAND_CONNECT_TIMEOUT = 5
COMMAND_READ_TIMEOUT = 10
COMMAND_RETRIES = 2
COMMAND_BACKOFF = 2
# Per-operation options of a write made after storage already failed: one attempt, short timeouts.
QUICK: dict[str, Any] = {"retry_total": 0, "connection_timeout": 3, "read_timeout": 3}
PROFILES = ("serving", "command", "worker")


def serving_budget_seconds() -> int:
    """Worst case of one small serving-profile operation against a silent endpoint."""
    attempts = SERVING_RETRIES + 1
    return attempts * max(SERVING_CONNECT_TIMEOUT, SERVING_READ_TIMEOUT) + SERVING_RETRIES * SERVING_BACKOFF


def _options(profile: str) -> dict[str, Any]:
    if profile == "serving":
        return {
            "connection_timeout": SERVING_CONNECT_TIMEOUT,
            "read_timeout": SERVING_READ_TIMEOUT,
            # linear: ExponentialRetry adds increment_base**count to its initial backoff (1 + 2 = 3 s)
            "retry_policy": LinearRetry(backoff=SERVING_BACKOFF, retry_total=SERVING_RETRIES, random_jitter_range=0),
        }
    if profile == "command":
        return {
            "connection_timeout": COMMAND_CONNECT_TIMEOUT,
            "read_timeout": COMMAND_READ_TIMEOUT,
            "retry_policy": LinearRetry(backoff=COMMAND_BACKOFF, retry_total=COMMAND_RETRIES, random_jitter_range=0),
        }
    if profile != "worker":
        raise ValueError(f"unknown storage profile {profile!r}; one of {', '.join(PROFILES)}")
    return {**REFRESH_OPTIONS, "retry_policy": ExponentialRetry(initial_backoff=2, increment_base=3, retry_total=6)}


def endpoint(conn: StorageConnection, service: str = "blob") -> str:
    """Where the account's ``service`` (``blob`` or ``queue``) is, for messages: ``host:port`` of a
    local endpoint, else the account URL."""
    from urllib.parse import urlparse

    parsed = urlparse(_service_url(conn, service))
    if is_local(conn, service):
        return f"{parsed.hostname}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"
    return f"{parsed.scheme}://{parsed.hostname}"


def is_local(conn: StorageConnection, service: str = "blob") -> bool:
    """Whether the account is on this machine (Azurite)."""
    from urllib.parse import urlparse

    return urlparse(_service_url(conn, service)).hostname in ("127.0.0.1", "localhost", "::1")


def _service_url(conn: StorageConnection, service: str) -> str:
    if service == "queue":
        return conn.queue_service_uri or str(queue_client(conn, "probe").url)
    return conn.blob_service_uri or str(blob_service_client(conn, profile="serving").url)


AZURITE_HINT = "Is Azurite running? Start it in another terminal with: npm run azurite (after npm ci), or ./scripts/test starts one"


def _credential(conn: StorageConnection) -> Any:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=conn.client_id) if conn.client_id else DefaultAzureCredential()


def blob_service_client(conn: StorageConnection, *, profile: str = "worker") -> BlobServiceClient:
    """A :class:`BlobServiceClient` for a connection string or a managed identity.

    Args:
        conn: where the account is and how to authenticate.
        profile: ``serving``, ``command`` or ``worker`` (see the module's docstring).
    """
    options = _options(profile)
    if conn.connection_string:
        try:
            return BlobServiceClient.from_connection_string(conn.connection_string, **options)
        except ValueError as err:
            raise SettingsError(
                f"{conn.setting} is not a storage connection string (like DefaultEndpointsProtocol=https;AccountName=...;"
                "AccountKey=...; or UseDevelopmentStorage=true for Azurite)"
            ) from err
    assert conn.blob_service_uri is not None
    return BlobServiceClient(conn.blob_service_uri, credential=_credential(conn), **options)


def queue_client(conn: StorageConnection, queue_name: str) -> Any:
    """A :class:`~azure.storage.queue.QueueClient` whose messages are base64, as the Functions
    queue trigger expects."""
    from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy, QueueClient
    from azure.storage.queue import LinearRetry as QueueRetry

    options: dict[str, Any] = {
        "message_encode_policy": BinaryBase64EncodePolicy(),
        "message_decode_policy": BinaryBase64DecodePolicy(),
        "connection_timeout": SERVING_CONNECT_TIMEOUT,
        "read_timeout": SERVING_READ_TIMEOUT,
        "retry_policy": QueueRetry(backoff=SERVING_BACKOFF, retry_total=SERVING_RETRIES, random_jitter_range=0),
    }
    if conn.connection_string:
        try:
            return QueueClient.from_connection_string(conn.connection_string, queue_name, **options)
        except ValueError as err:
            raise SettingsError(f"{conn.setting} is not a storage connection string") from err
    if not conn.queue_service_uri:
        raise StorageUnavailableError(f"Set {conn.setting}__queueServiceUri to reach the refresh queue with an identity", service="queue")
    return QueueClient(conn.queue_service_uri, queue_name, credential=_credential(conn), **options)


def container_client(conn: StorageConnection, container: str, *, profile: str = "worker") -> ContainerClient:
    """The model container's client (not created here; see ``ModelStore.ensure_container``)."""
    return blob_service_client(conn, profile=profile).get_container_client(container)


# 403 error codes that mean "these credentials are refused" (a wrong or truncated key signs
# requests the account cannot verify)
_CREDENTIAL_CODES = frozenset({"AuthenticationFailed", "AuthorizationFailure", "InvalidAuthenticationInfo"})


@contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Translate SDK exceptions raised inside the block into the project's errors.

    Args:
        action: what was being done, for the message ("reading current.json").
    """
    try:
        yield
    except QAError:
        raise
    except ResourceNotFoundError as err:
        raise NotFoundError(f"Not found while {action}") from err
    except ClientAuthenticationError as err:
        log.warning("Storage refused credentials while %s: %s", action, type(err).__name__)
        raise StorageCredentialsError(f"Storage refused the credentials while {action}") from err
    except (ServiceRequestError, ServiceResponseError) as err:
        log.warning("Storage unreachable while %s: %s", action, type(err).__name__)
        raise StorageUnavailableError(f"Storage is unreachable while {action}") from err
    except HttpResponseError as err:
        code = getattr(err, "error_code", None)
        code = getattr(code, "value", code)  # a StorageErrorCode member, or the service's plain string
        log.warning("Storage error %s while %s: %s", err.status_code, action, code)
        if err.status_code == 401 or (err.status_code == 403 and code in _CREDENTIAL_CODES):
            raise StorageCredentialsError(
                f"Storage refused the credentials ({err.status_code} {code}) while {action}: check the account key "
                "(or the identity's role on the account)"
            ) from err
        raise StorageUnavailableError(f"Storage answered {err.status_code} while {action}") from err
    except AzureError as err:
        log.warning("Storage failure while %s: %s", action, type(err).__name__)
        raise StorageUnavailableError(f"Storage failed while {action}") from err


def probe(conn: StorageConnection, container: str) -> bool:
    """A quick reachability check (serving profile): whether ``container`` exists.

    Raises:
        StorageUnavailableError: the account cannot be reached or refuses us; the message names
            the endpoint and, for a local one, how to start Azurite.
    """
    client = container_client(conn, container, profile="serving")
    try:
        with storage_errors(f"checking the container {container!r}"):
            return bool(client.exists())
    except StorageUnavailableError as err:
        raise with_endpoint(err, conn) from err.__cause__


def with_endpoint(err: StorageUnavailableError, conn: StorageConnection, service: str = "blob") -> StorageUnavailableError:
    """``err`` with the endpoint (and, for a local one that did not answer, the Azurite hint) in its message."""
    if "(storage at " in err.message:
        return err
    where = endpoint(conn, service)
    # a refused key comes from a running Azurite: starting one is not the fix
    hint = f" {AZURITE_HINT}." if is_local(conn, service) and not isinstance(err, StorageCredentialsError) else ""
    return type(err)(f"{err.message} (storage at {where}, from {conn.setting}).{hint}", service=service)
