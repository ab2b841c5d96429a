"""A Blob container holding a model folder's files flat, as a source to adopt into the store.

The scripts this app replaces saved a model with transformers and uploaded the folder's files
flat into a container (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...). Adopting
such a container reads it twice and never writes to it: a first pass hashes every file as it
streams (no local disk, memory bounded by the ranges in flight) and records each blob's ETag, so
the version is named like a local folder of the same files (``local-`` + 16 hex) before anything is
copied; the copy then reads each blob with If-Match on that ETag, so a blob rewritten in between
fails the publish instead of mixing two writes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient

from ..errors import IntegrityError, NotFoundError, StorageUnavailableError, UnsafeModelError
from ..settings import StorageConnection
from ..store.model_files import FileEntry, check_config, select_files
from ..store.storage import RANGE_READ_TIMEOUT, container_client, storage_errors, with_endpoint
from ..store.transfer import BlobChangedError, read_ranges
from .isolation import Snapshot, TransferProgress, local_revision

log = logging.getLogger(__name__)

SOURCE = "blob"  # Manifest.source of an adopted version
_CONFIG_LIMIT = 16 << 20


class ContainerSource:
    """The files directly under ``prefix`` in one container (sub-folders are ignored); only read.

    Args:
        client: the container (any account; its credentials are the client's).
        prefix: a folder inside the container (``""``: the container's top level).
        block_size: bytes per range read.
        concurrency: ranges in flight at once.
        connection: how the account was reached, for messages (the endpoint and the setting);
            storage errors of this source name it rather than the model store's account.
        progress: told the bytes of the hashing pass, then each range hashed.
    """

    def __init__(
        self,
        client: ContainerClient,
        *,
        prefix: str = "",
        block_size: int = 8 << 20,
        concurrency: int = 4,
        connection: StorageConnection | None = None,
        progress: TransferProgress | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.block_size = block_size
        self.concurrency = concurrency
        self.connection = connection
        self.progress = progress
        self._listing: dict[str, Any] | None = None
        self._chosen: list[str] | None = None
        self._snapshot: Snapshot | None = None
        self._etags: dict[str, str] = {}

    @classmethod
    def from_connection(cls, conn: StorageConnection, container: str, *, profile: str = "command", **options: Any) -> ContainerSource:
        """The container ``container`` of the account ``conn`` describes, through a storage ``profile``
        (``command``: a terminal's, which gives up soon after the account stops answering)."""
        return cls(container_client(conn, container, profile=profile), connection=conn, **options)

    @property
    def where(self) -> str:
        """The source, for messages: ``container NAME[/PREFIX] of account ACCOUNT``."""
        inside = f"/{self.prefix.rstrip('/')}" if self.prefix else ""
        return f"container {self.client.container_name}{inside} of account {self.client.account_name}"

    @property
    def name(self) -> str:
        """A short name of the source: the prefix's last folder, else the container's name."""
        return self.prefix.rstrip("/").rsplit("/", 1)[-1] or self.client.container_name

    def provenance_base(self) -> dict[str, Any]:
        """Where the files are, without credentials (no key, no SAS: the URL loses its query)."""
        url = urlsplit(str(self.client.url))
        path = url.path.rstrip("/")
        endpoint = urlunsplit((url.scheme, url.netloc, path[: path.rfind("/")], "", ""))  # the account's, without the container
        return {
            "kind": SOURCE,
            "account": self.client.account_name,
            "endpoint": endpoint,
            "container": self.client.container_name,
            "prefix": self.prefix,
        }

    # --- Source protocol --------------------------------------------------------------------

    def revision(self) -> str:
        """``local-`` + 16 hex over the files' names and sha256: a folder of the same files has the same."""
        return self.snapshot().revision

    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            self._snapshot = self._describe()
        return self._snapshot

    def open(self, entry: FileEntry) -> Iterator[bytes]:
        """The bytes of ``entry`` as they were hashed: read with If-Match on the ETag of the hashing pass.

        Raises:
            IntegrityError: the blob changed since it was hashed; nothing of it is published.
        """
        etag = self._etags.get(entry.name)
        if etag is None:
            raise IntegrityError(f"{entry.name} was not hashed from {self.where}")
        blob = self.client.get_blob_client(self.prefix + entry.name)
        try:
            with _named(self.connection):
                for view in read_ranges(
                    blob, name=entry.name, size=entry.size, etag=etag, block_size=self.block_size, concurrency=self.concurrency
                ):
                    yield bytes(view)  # one block-sized copy, which the upload's blocks then reuse
        except BlobChangedError as err:
            raise BlobChangedError(
                f"{entry.name} in {self.where} changed after it was hashed (its ETag is no longer {etag}); "
                "nothing of this version is published: run adopt again"
            ) from err
        except NotFoundError as err:
            raise IntegrityError(f"{entry.name} was deleted from {self.where} after it was hashed: run adopt again") from err

    # --- the passes ---------------------------------------------------------------------------

    def config_json(self) -> bytes:
        """``config.json`` (for the model id), after the checks of the file names, before any file is hashed."""
        self._choose()
        if int(self._list()["config.json"].size) > _CONFIG_LIMIT:
            raise UnsafeModelError(f"config.json in {self.where} is {self._list()['config.json'].size} bytes: not a model's config")
        blob = self.client.get_blob_client(self.prefix + "config.json")
        with _named(self.connection), storage_errors(f"reading config.json from {self.where}"):
            return blob.download_blob(read_timeout=RANGE_READ_TIMEOUT).readall()  # a few KB

    def _choose(self) -> list[str]:
        if self._chosen is None:
            listing = self._list()
            self._chosen = select_files(sorted(listing), where=self.where, convert=True)
        return self._chosen

    def _list(self) -> dict[str, Any]:
        if self._listing is None:
            found: dict[str, Any] = {}
            with _named(self.connection), storage_errors(f"listing {self.where}"):
                try:
                    for blob in self.client.list_blobs(name_starts_with=self.prefix or None):
                        rest = blob.name[len(self.prefix) :]
                        if rest and "/" not in rest:  # a sub-folder's blobs are not the model's files
                            found[rest] = blob
                except ResourceNotFoundError:
                    raise NotFoundError(f"There is no {self.where}: check the container name and the account") from None
            if not found:
                raise NotFoundError(f"{self.where} holds no files (a model folder's files are expected directly under it)")
            self._listing = found
        return self._listing

    def _describe(self) -> Snapshot:
        chosen = self._choose()
        listing = self._list()
        total = sum(int(listing[name].size) for name in chosen)
        if self.progress is not None:
            self.progress.plan(total)
        began = time.monotonic()
        files, blobs = [], {}
        for name in chosen:  # sorted: config.json comes before the weights (model*, pytorch_model*) and is checked first
            entry, facts = self._hash(name)
            if name == "config.json":
                check_config(b"".join(self.open(entry)), where=f"in {self.where}")
            files.append(entry)
            blobs[name] = facts
        took = max(time.monotonic() - began, 1e-6)
        log.info("Hashed %d file(s) of %s, %d bytes in %.1fs, %.1f MB/s", len(files), self.where, total, took, total / took / 1e6)
        entries = tuple(files)
        return Snapshot(
            revision=local_revision(entries),
            source=SOURCE,
            files=entries,
            label=self.where,
            provenance={**self.provenance_base(), "blobs": blobs},
        )

    def _hash(self, name: str) -> tuple[FileEntry, dict[str, Any]]:
        """sha256 of one blob as it streams, with If-Match on the ETag its properties gave."""
        blob = self.client.get_blob_client(self.prefix + name)
        with _named(self.connection), storage_errors(f"reading the properties of {name} in {self.where}"):
            properties = blob.get_blob_properties(read_timeout=RANGE_READ_TIMEOUT)
        size, etag = int(properties.size), str(properties.etag)
        digest = hashlib.sha256()
        try:
            with _named(self.connection):
                for view in read_ranges(blob, name=name, size=size, etag=etag, block_size=self.block_size, concurrency=self.concurrency):
                    digest.update(view)
                    if self.progress is not None:
                        self.progress.advance(len(view))
        except BlobChangedError as err:
            raise BlobChangedError(f"{name} in {self.where} changed while it was hashed: run adopt again once it is written") from err
        self._etags[name] = etag
        modified = properties.last_modified
        facts = {"etag": etag, "last_modified": modified.isoformat() if modified is not None else None, "size": size}
        return FileEntry(name=name, size=size, sha256=digest.hexdigest()), facts


@contextmanager
def _named(connection: StorageConnection | None) -> Iterator[None]:
    """Storage errors inside name this source's endpoint and setting (not the model store's)."""
    try:
        yield
    except StorageUnavailableError as err:
        if connection is None:
            raise
        raise with_endpoint(err, connection) from err.__cause__
