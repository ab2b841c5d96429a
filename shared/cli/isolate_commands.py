"""Commands that write versions: ``isolate`` (from the Hub or a local folder), ``build-artifacts``
and ``refresh --enqueue`` (the function app's worker does the work)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..errors import InputError
from ..settings import ARTIFACT_VARIANTS, Settings, parse_model_id
from .common import Add, BarProgress, open_store, revision_or_current

log = logging.getLogger(__name__)


def cmd_isolate(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """The refresh from a terminal: from the Hub (as the queue worker does) or a local folder."""
    import dataclasses

    from ..errors import SourceUnavailableError
    from ..refresh.isolation import LocalDirSource, isolate
    from ..refresh.model_checks import CheckedSource, local_model_id
    from ..refresh.worker import artifact_builder, canary_validator, run_refresh
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
            result = isolate(
                ModelStore.from_settings(settings),
                source,
                explicit=True,  # a folder names its version
                keep_versions=settings.keep_versions,
                validate=canary_validator(settings),
                progress=bar,
                repair=args.repair,
                build=artifact_builder(settings),
                unpin=args.unpin,
            )
        else:
            revision = check_hub_revision(args.revision) if args.revision else None
            request = RefreshRequest(
                revision=revision, explicit=revision is not None or args.unpin, reason="cli", repair=args.repair, unpin=args.unpin
            )
            result = run_refresh(settings, request, progress=bar)
    except SourceUnavailableError as err:
        raise SourceUnavailableError(
            f"{err.message}. Offline? Isolate a local model folder instead: python -m shared isolate --from-dir DIR"
        ) from err
    finally:
        bar.close()
    return 0, {**result.to_dict(), "pointer_moved": result.pointer_moved, "pin": result.pin}, result.summary()


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
    iso.add_argument("--from-dir", help="isolate from this local model folder instead of the Hub (offline)")
    iso.add_argument("--skip-canary", action="store_true", help="publish without answering MODEL_CANARY first")
    iso.add_argument(
        "--repair",
        action="store_true",
        help="if the revision is already stored: re-hash its files and copy again each one whose bytes differ from the source, "
        "and rebuild its damaged or unusable ONNX artifacts",
    )
    iso.add_argument("--unpin", action="store_true", help="let a pinned pointer move (or lift the pin of the current version)")

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
