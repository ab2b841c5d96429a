"""The Hugging Face Hub as a model source: resolve a revision to a commit and stream its files.

Nothing here writes to local disk. LFS files (the weights) stream straight from the Hub's HTTP
response into Blob blocks, checked against the sha256 the Hub advertises; small non-LFS files
(config, tokenizer) are read into memory, checked against their git blob id, and hashed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import IntegrityError, NotFoundError, SettingsError, SourceUnavailableError
from ..settings import Settings
from ..store.model_files import FileEntry, check_config, check_file_name, select_files
from .isolation import Snapshot

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
SMALL_FILE_LIMIT = 64 << 20
CHUNK = 1 << 20


class HubSource:
    """One model repo at one revision (branch, tag or commit).

    Args:
        model_id: ``owner/name``.
        revision: what to resolve (default branch ``main``).
        endpoint: the Hub (``HF_ENDPOINT``; tests point it at a local fake).
        token: ``HF_TOKEN`` for gated or private repos; never logged.
    """

    def __init__(self, model_id: str, *, revision: str = "main", endpoint: str | None = None, token: str | None = None) -> None:
        self.model_id = model_id
        self.requested = revision
        self.endpoint = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self._token = token
        self._info: Any = None
        self._snapshot: Snapshot | None = None
        self._small: dict[str, bytes] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, model_id: str | None = None, revision: str | None = None) -> HubSource:
        return cls(
            model_id or settings.model_id,
            revision=revision or settings.model_revision,
            endpoint=settings.hf_endpoint,
            token=settings.hf_token,
        )

    def __repr__(self) -> str:
        return f"HubSource({self.model_id}@{self.requested} from {self.endpoint})"

    # --- Source protocol --------------------------------------------------------------------

    def revision(self) -> str:
        """The 40-hex commit the requested revision points at (one API call)."""
        return str(self._model_info().sha)

    def snapshot(self) -> Snapshot:
        if self._snapshot is not None:
            return self._snapshot
        info = self._model_info()
        commit = str(info.sha)
        siblings = {s.rfilename: s for s in (info.siblings or [])}
        names = select_files(list(siblings), where=f"repo {self.model_id}@{commit[:12]}", convert=True)
        files = []
        for name in names:
            sibling = siblings[check_file_name(name)]
            if sibling.lfs is not None:
                files.append(FileEntry(name=name, size=int(sibling.lfs.size), sha256=str(sibling.lfs.sha256).lower()))
            else:
                data = self._fetch_small(name, commit, sibling)
                if name == "config.json":
                    check_config(data, where=f"of {self.model_id}@{commit[:12]}")
                files.append(FileEntry(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
        self._snapshot = Snapshot(
            revision=commit,
            source=self.endpoint,
            files=tuple(files),
            source_revision=self.requested,
            label=f"repo {self.model_id}@{commit[:12]}",
        )
        log.info("Resolved %s@%s to %s: %d files, %d bytes", self.model_id, self.requested, commit, len(files), self._snapshot.total_bytes)
        return self._snapshot

    def open(self, entry: FileEntry) -> Iterator[bytes]:
        if entry.name in self._small:
            yield self._small[entry.name]
            return
        assert self._snapshot is not None, "snapshot() first"
        yield from self._stream(entry.name, self._snapshot.revision)

    # --- HTTP -------------------------------------------------------------------------------

    def _model_info(self) -> Any:
        if self._info is None:
            from huggingface_hub import HfApi

            api = HfApi(endpoint=self.endpoint, token=self._token or False)
            with hub_errors(f"resolving {self.model_id}@{self.requested}", endpoint=self.endpoint, model_id=self.model_id):
                self._info = api.model_info(self.model_id, revision=self.requested, files_metadata=True)
            if not isinstance(getattr(self._info, "sha", None), str) or len(self._info.sha) != 40:
                raise SourceUnavailableError(f"The Hub gave no commit for {self.model_id}@{self.requested}")
        return self._info

    def _url(self, name: str, commit: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.model_id, name, revision=commit, endpoint=self.endpoint)

    def _stream(self, name: str, commit: str) -> Iterator[bytes]:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers(token=self._token or False, library_name="isolated-qa")
        headers["Accept-Encoding"] = "identity"  # hash the bytes as stored, never a re-encoding
        with hub_errors(f"downloading {name}", endpoint=self.endpoint, model_id=self.model_id):
            with get_session().stream("GET", self._url(name, commit), headers=headers, timeout=60.0, follow_redirects=True) as response:
                hf_raise_for_status(response)
                yield from response.iter_bytes(chunk_size=CHUNK)

    def _fetch_small(self, name: str, commit: str, sibling: Any) -> bytes:
        if sibling.size is not None and sibling.size > SMALL_FILE_LIMIT:
            raise IntegrityError(f"{name} is {sibling.size} bytes but not stored with LFS; refusing to hold it in memory")
        data = b"".join(self._stream(name, commit))
        if sibling.blob_id:
            git_id = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
            if git_id != sibling.blob_id:
                raise IntegrityError(f"{name} from the Hub does not match its git blob id {sibling.blob_id[:12]}...")
        self._small[name] = data
        return data


@contextmanager
def hub_errors(action: str, *, endpoint: str, model_id: str) -> Iterator[None]:
    """Translate huggingface_hub and HTTP errors raised inside into the project's errors:
    unreachable or broken transfers are transient; a model the Hub refuses (401, 403, 404: missing,
    private or gated without access, a bad token) and a missing revision are permanent."""
    import httpx2
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    refused = (
        f"Model {model_id} not found or not accessible on the Hub at {endpoint} while {action}: "
        "check MODEL_ID and HF_TOKEN (a private or gated model needs a token with access)"
    )
    try:
        yield
    except GatedRepoError as exc:
        raise SettingsError(f"The repo is gated or private while {action}: set HF_TOKEN to a token with access") from exc
    except RevisionNotFoundError as exc:
        raise NotFoundError(f"No such revision on the Hub while {action}") from exc
    except RepositoryNotFoundError as exc:
        raise NotFoundError(refused) from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        log.warning("Hub answered %s while %s", status, action)
        if status in (401, 403, 404):
            raise NotFoundError(refused) from exc
        raise SourceUnavailableError(f"The Hub at {endpoint} answered {status} while {action}") from exc
    except (httpx2.HTTPError, httpx2.StreamError, OSError) as exc:
        log.warning("Hub transfer failed while %s: %s", action, type(exc).__name__)
        what = "is unreachable" if isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout)) else "broke off the connection"
        raise SourceUnavailableError(f"The Hub at {endpoint} {what} ({type(exc).__name__}) while {action}") from exc
