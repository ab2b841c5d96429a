"""Blob and Queue clients built from :class:`~shared.settings.StorageConnection`.

Two profiles: the serving path gets short timeouts and few retries so that no request hangs
on a dead storage account; the refresh path keeps the SDK's patient retries.
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
from azure.storage.blob import BlobServiceClient, ContainerClient

from .errors import NotFoundError, QAError, StorageUnavailableError
from .settings import StorageConnection

# The SDK logs every request and response header at INFO; that is noise and may carry SAS tokens.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
logging.getLogger("azure.identity").setLevel(logging.WARNING)

log = logging.getLogger(__name__)

SERVING_OPTIONS: dict[str, Any] = {"connection_timeout": 5, "read_timeout": 20, "retry_total": 2, "retry_backoff_factor": 0.5}
REFRESH_OPTIONS: dict[str, Any] = {"connection_timeout": 20, "read_timeout": 120, "retry_total": 6}


def _credential(conn: StorageConnection) -> Any:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=conn.client_id) if conn.client_id else DefaultAzureCredential()


def blob_service_client(conn: StorageConnection, *, serving: bool = False) -> BlobServiceClient:
    """A :class:`BlobServiceClient` for a connection string or a managed identity.

    Args:
        conn: where the account is and how to authenticate.
        serving: use the short-timeout profile of the request path.
    """
    options = SERVING_OPTIONS if serving else REFRESH_OPTIONS
    if conn.connection_string:
        return BlobServiceClient.from_connection_string(conn.connection_string, **options)
    assert conn.blob_service_uri is not None
    return BlobServiceClient(conn.blob_service_uri, credential=_credential(conn), **options)


def queue_client(conn: StorageConnection, queue_name: str) -> Any:
    """A :class:`~azure.storage.queue.QueueClient` whose messages are base64, as the Functions
    queue trigger expects."""
    from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy, QueueClient

    options: dict[str, Any] = {
        "message_encode_policy": BinaryBase64EncodePolicy(),
        "message_decode_policy": BinaryBase64DecodePolicy(),
        **SERVING_OPTIONS,
    }
    if conn.connection_string:
        return QueueClient.from_connection_string(conn.connection_string, queue_name, **options)
    if not conn.queue_service_uri:
        raise StorageUnavailableError(f"Set {conn.setting}__queueServiceUri to reach the refresh queue with an identity")
    return QueueClient(conn.queue_service_uri, queue_name, credential=_credential(conn), **options)


def container_client(conn: StorageConnection, container: str, *, serving: bool = False) -> ContainerClient:
    """The model container's client (not created here; see ``ModelStore.ensure_container``)."""
    return blob_service_client(conn, serving=serving).get_container_client(container)


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
        raise StorageUnavailableError(f"Storage refused the credentials while {action}") from err
    except (ServiceRequestError, ServiceResponseError) as err:
        log.warning("Storage unreachable while %s: %s", action, type(err).__name__)
        raise StorageUnavailableError(f"Storage is unreachable while {action}") from err
    except HttpResponseError as err:
        log.warning("Storage error %s while %s: %s", err.status_code, action, getattr(err, "error_code", None))
        raise StorageUnavailableError(f"Storage answered {err.status_code} while {action}") from err
    except AzureError as err:
        log.warning("Storage failure while %s: %s", action, type(err).__name__)
        raise StorageUnavailableError(f"Storage failed while {action}") from err
