"""Commands that write versions: ``isolate`` (from the Hub or a local folder), ``adopt`` (a container
holding a model folder's files flat), ``build-artifacts`` and ``refresh --enqueue`` (the function
app's worker does the work)."""

from __future__ import annotations

import argparse
import logging
from typing import Any
from urllib.parse import urlsplit

from ..errors import InputError, NotFoundError, SettingsError
from ..settings import ARTIFACT_VARIANTS, Settings, StorageConnection, parse_container, parse_model_id
from .common import Add, BarProgress, nonempty, open_store, revision_or_current

log = logging.getLogger(__name__)


def cmd_isolate(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """The refresh from a terminal: from the Hub (as the queue worker does) or a local folder."""
    import dataclasses

    from ..errors import SourceUnavailableError
    from ..refresh.isolation import LocalDirSource
    from ..refresh.model_checks import CheckedSource, local_model_id
    from ..refresh.worker import run_refresh
    from ..store.model_store import ModelStore
    from ..store.refresh_queue import RefreshRequest, check_hub_revision
    from ..store.storage import probe

    if args.from_dir and args.revision:
        raise InputError("--revision names a Hub revision; a --from-dir version is named by its files' hashes")
    source = None
    if args.from_dir:
        folder = LocalDirSource(args.from_dir, block_size=settings.block_size)
        where, name = f"folder {args.from_dir}", folder.folder.resolve().name
        model_id = local_model_id(folder.config_json, given=args.model_id, where=where, name=name)
        settings = dataclasses.replace(settings, model_id=model_id)
        source = CheckedSource(folder)
        source.check()  # a missing or unusable folder fails before storage is touched (weights are converted under the lock)
    elif args.model_id:
        settings = dataclasses.replace(settings, model_id=parse_model_id("--model-id", args.model_id, settings.model_id))
    if args.skip_canary:
        settings = dataclasses.replace(settings, canary=None)
    probe(settings.require_storage(), settings.container)  # quick; the copy itself keeps patient retries
    bar = BarProgress("isolate")
    try:
        if source is not None:
            result = isolate_local(ModelStore.from_settings(settings, profile="command"), source, settings, args, bar)
        else:
            revision = check_hub_revision(args.revision) if args.revision else None
            request = RefreshRequest(
                revision=revision, explicit=revision is not None or args.unpin, reason="cli", repair=args.repair, unpin=args.unpin
            )
            result = run_refresh(settings, request, progress=bar, profile="command")
    except SourceUnavailableError as err:
        raise SourceUnavailableError(
            f"{err.message}. Offline? Isolate a local model folder instead: python -m shared isolate --from-dir DIR"
        ) from err
    finally:
        bar.close()
    return outcome(result)


def isolate_local(store: Any, source: Any, settings: Settings, args: argparse.Namespace, bar: BarProgress) -> Any:
    """Isolate a local source (a folder, a container's files) as the command line does: the source
    names its version (it may move a pinned pointer), with the canary and the artifacts of the settings."""
    from ..refresh.isolation import isolate
    from ..refresh.worker import artifact_builder, canary_validator

    return isolate(
        store,
        source,
        explicit=True,
        keep_versions=settings.keep_versions,
        validate=canary_validator(settings),
        progress=bar,
        repair=args.repair,
        build=artifact_builder(settings),
        unpin=args.unpin,
    )


def outcome(result: Any) -> tuple[int, dict[str, Any], str]:
    """What ``isolate`` and ``adopt`` print: the outcome record, what happened to the pointer, one line."""
    return 0, {**result.to_dict(), "pointer_moved": result.pointer_moved, "pin": result.pin}, result.summary()


def cmd_adopt(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """Publish the model files a container holds flat (as the scripts this app replaces uploaded them)
    as a verified version: the checks, the canary and the artifacts of ``isolate --from-dir``."""
    import dataclasses

    from ..refresh.container_source import ContainerSource
    from ..refresh.model_checks import CheckedSource, local_model_id
    from ..store.model_store import ModelStore
    from ..store.storage import probe

    conn = _adopt_connection(args, settings)
    container = _container_name(args.container)
    if not probe(conn, container):  # quick (a few seconds against a dead account), naming the account's endpoint
        raise NotFoundError(f"There is no container {container} in the account of {conn.setting}: check --container and the account")
    hashing = BarProgress("hash")
    source = ContainerSource.from_connection(
        conn,
        container,
        prefix=args.prefix or "",
        block_size=settings.block_size,
        concurrency=settings.transfer_concurrency,
        progress=hashing,
    )
    log.info("Adopting the model files of %s (from %s)", source.where, conn.setting)
    model_id = local_model_id(source.config_json, given=args.model_id, where=source.where, name=source.name)
    settings = dataclasses.replace(settings, model_id=model_id, canary=None if args.skip_canary else settings.canary)
    store = ModelStore.from_settings(settings, profile="command")
    if _same_container(source.client.url, store.container.url):
        raise InputError(
            f"{source.where} is also where versions are stored (MODEL_CONTAINER): the container adopted is only read, "
            "so store the versions in a container of their own (MODEL_CONTAINER=models, the default)"
        )
    probe(settings.require_storage(), settings.container)  # the model store answers, before the source is hashed
    checked = CheckedSource(source)
    try:
        checked.check()  # hashed and checked before the lock; weights are converted under it, before any byte is copied
    finally:
        hashing.close()
    bar = BarProgress("adopt")
    try:
        result = isolate_local(store, checked, settings, args, bar)
    finally:
        bar.close()
    return outcome(result)


def _adopt_connection(args: argparse.Namespace, settings: Settings) -> StorageConnection:
    """The source container's account: ``--account-url`` (this machine's identity), else
    ``AZURE_STORAGE_CONNECTION_STRING`` (as the old scripts read it), else the model store's own."""
    if args.account_url:
        url = args.account_url.strip()
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise InputError(f"--account-url must be the account's blob endpoint, like https://ACCOUNT.blob.core.windows.net, got {url!r}")
        if parts.query:
            raise InputError(
                "--account-url takes the endpoint without a SAS token (it would be kept in your shell history); "
                "put a SAS in AZURE_STORAGE_CONNECTION_STRING (BlobEndpoint=...;SharedAccessSignature=...) instead"
            )
        return StorageConnection(setting="--account-url", blob_service_uri=url.rstrip("/"))
    if settings.adopt_storage is not None:
        return settings.adopt_storage
    return settings.require_storage()


def _same_container(a: str, b: str) -> bool:
    """Whether two container URLs (their queries, a SAS, aside) name the same container."""
    first, second = urlsplit(a), urlsplit(b)
    return (first.netloc.lower(), first.path.rstrip("/")) == (second.netloc.lower(), second.path.rstrip("/"))


def _container_name(raw: str) -> str:
    """``--container`` checked against Azure's naming rules (a bad one is the user's input, not a setting)."""
    try:
        return parse_container("--container", raw, raw)
    except SettingsError as err:
        raise InputError(err.message) from None


def cmd_build_artifacts(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """Build the ONNX artifacts an existing complete version lacks (new versions get them from the refresh)."""
    import dataclasses

    from ..refresh.artifact_builds import build_artifacts
    from ..refresh.worker import artifact_canary

    if args.skip_canary:
        settings = dataclasses.replace(settings, canary=None)
    store = open_store(settings, args)
    revision = revision_or_current(store, args.revision, "build artifacts for")
    manifest = store.require_manifest(revision)
    variants = tuple(args.variant) if args.variant else settings.artifacts or ARTIFACT_VARIANTS
    with store.lock():  # one writer at a time, as for a refresh
        outcomes = build_artifacts(
            store,
            manifest,
            settings,
            variants=variants,
            canary=artifact_canary(settings),
            progress=lambda step: log.info("%s", step),
            rebuild=args.rebuild,
            verify_blobs=True,  # an artifact that "exists" but does not verify is not one
        )
    failed = any(outcome.startswith(("unusable", "damaged")) for outcome in outcomes.values())
    text = "\n".join(f"{revision} {variant}: {outcome}" for variant, outcome in outcomes.items())
    return (1 if failed else 0), {"revision": revision, "artifacts": outcomes}, text


def cmd_refresh(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """Queue a refresh for the function app's worker (as ``POST /api/model/refresh`` does), with
    this machine's identity or connection string: no function key needed."""
    from ..store.refresh_queue import RefreshRequest, check_hub_revision, enqueue

    revision = check_hub_revision(args.revision) if args.revision else None
    request = RefreshRequest(
        revision=revision,
        explicit=revision is not None or args.unpin,
        reason="cli",
        repair=args.repair,
        build_artifacts=args.build_artifacts,
        unpin=args.unpin,
    )
    message_id = enqueue(settings, request)
    data = {"status": "queued", "message_id": message_id, "queue": settings.refresh_queue, **request.__dict__}
    text = (
        f"Queued a refresh of {settings.model_id} on {settings.refresh_queue} (message {message_id}). "
        "Watch it: GET /api/model (last_refresh), or python -m shared status"
    )
    return 0, data, text


def add_parsers(add: Add) -> None:
    """Register this module's commands (``add`` makes a sub-parser with ``--json``)."""
    iso = add("isolate", cmd_isolate, "copy the model (from the Hub, or a local folder) into Blob Storage as a verified version")
    iso.add_argument(
        "--model-id",
        help="Hub model id (default: MODEL_ID); with --from-dir, the id the folder is stored and reported under "
        "(default: the Hub id its config.json names)",
    )
    iso.add_argument("--revision", help="branch, tag or commit (default: MODEL_REVISION); naming one moves a pinned pointer")
    iso.add_argument("--from-dir", type=nonempty, help="isolate from this local model folder instead of the Hub (offline)")
    iso.add_argument("--skip-canary", action="store_true", help="publish without answering MODEL_CANARY first")
    iso.add_argument(
        "--repair",
        action="store_true",
        help="if the revision is already stored: re-hash its files and copy again each one whose bytes differ from the source, "
        "and rebuild its damaged or unusable ONNX artifacts",
    )
    iso.add_argument("--unpin", action="store_true", help="let a pinned pointer move (or lift the pin of the current version)")

    adopt = add(
        "adopt",
        cmd_adopt,
        "publish the model files a container holds flat (as uploaded by a save_pretrained script) as a verified version; "
        "the container is only read",
    )
    adopt.add_argument("--container", required=True, help="the container the files are in (for example ml-poc-container)")
    adopt.add_argument("--prefix", help="the folder inside the container that holds the files (default: its top level)")
    adopt.add_argument(
        "--account-url",
        help="the source account's blob endpoint, reached with this machine's identity (default: AZURE_STORAGE_CONNECTION_STRING, "
        "else the model store's account)",
    )
    adopt.add_argument(
        "--model-id", help="the id it is stored and reported under (default: the Hub id its config.json names; required if none)"
    )
    adopt.add_argument("--skip-canary", action="store_true", help="publish without answering MODEL_CANARY first")
    adopt.add_argument(
        "--repair", action="store_true", help="if its version is already stored: copy again each file whose stored bytes differ"
    )
    adopt.add_argument("--unpin", action="store_true", help="let a pinned pointer move (or lift the pin of the current version)")

    refresh = add("refresh", cmd_refresh, "queue a refresh for the function app's worker (needs --enqueue)")
    refresh.add_argument("--enqueue", action="store_true", required=True, help="put the request on MODEL_REFRESH_QUEUE")
    refresh.add_argument("--revision", help="branch, tag or commit (moves a pinned pointer)")
    refresh.add_argument("--unpin", action="store_true", help="let the refresh move a pinned pointer")
    refresh.add_argument("--repair", action="store_true", help="re-copy the stored files of the revision that differ from the Hub")
    refresh.add_argument("--build-artifacts", action="store_true", help="build the ONNX serving artifacts the version lacks")

    build = add("build-artifacts", cmd_build_artifacts, "build the ONNX artifacts an existing version lacks (exit 1 if one is unusable)")
    build.add_argument("--revision", help="default: the current one")
    build.add_argument("--variant", action="append", choices=ARTIFACT_VARIANTS, help="repeat for both (default: MODEL_ARTIFACTS)")
    build.add_argument("--skip-canary", action="store_true", help="record the artifacts without answering MODEL_CANARY")
    build.add_argument("--rebuild", action="store_true", help="build again the damaged or unusable artifacts (their records are replaced)")
    build.add_argument("--model-id")
