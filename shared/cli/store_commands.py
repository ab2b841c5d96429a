"""Commands that read or move what is stored: ``status``, ``verify`` and ``rollback``."""

from __future__ import annotations

import argparse
from typing import Any

from ..settings import Settings
from .common import Add, BarProgress, open_store, revision_or_current


def cmd_status(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    from ..loading.onnx_artifacts import status

    data = status(open_store(settings, args))
    pointer = data["pointer"]
    last = data["last_refresh"] or {}
    lines = [f"model: {data['model_id']} in container {data['container']}"]
    if pointer is None:
        lines.append(
            "current: nothing isolated yet (run: python -m shared isolate, or --from-dir DIR offline, "
            "or adopt --container C for files uploaded flat)"
        )
    else:
        pin = " (pinned)" if pointer["pinned"] else ""
        lines.append(f"current: {pointer['revision']}{pin}, previous: {', '.join(pointer['previous']) or 'none'}")
    for version in data["versions"]:
        state = "complete" if version["complete"] else "INCOMPLETE (staged files, resumed by the next isolate)"
        if not version["complete"] and last.get("revision") == version["revision"] and last.get("error_code") == "validation_failed":
            state = "INCOMPLETE (staged; the canary failed: set MODEL_CANARY or isolate --skip-canary)"
        lines.append(f"  {version['revision']}  {state}  {version['files']} files  {version['bytes']} bytes  {version['last_modified']}")
        for variant, artifact in version.get("artifacts", {}).items():
            reason = str(artifact["reason"])
            usable = "usable" if artifact["usable"] else ("DAMAGED" if reason.startswith("damaged") else "UNUSABLE") + f" ({reason})"
            lines.append(f"    onnx {variant}: {artifact['size']} bytes, {usable}")
    if last.get("outcome"):
        line = f"last refresh: {last.get('outcome')} at {last.get('finished')} ({last.get('error') or 'ok'})"
        if last.get("outcome") == "failed" and pointer is not None:
            line += f"; nothing changed: still serving {pointer['revision']}"
        lines.append(line)
    if last.get("last_skipped_at"):
        lines.append(f"last skipped: {last['last_skipped_at']} ({last.get('skipped_reason')})")
    return 0, data, "\n".join(lines)


def cmd_verify(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """Re-hash a version's files against its manifest and its ONNX artifacts' blobs against their records."""
    from ..loading.onnx_artifacts import artifact_state, repair_command
    from ..settings import ARTIFACT_VARIANTS

    store = open_store(settings, args)
    revision = revision_or_current(store, args.revision, "verify")
    bar = BarProgress("verify")
    manifest = store.require_manifest(revision)
    bar.plan(manifest.total_bytes)
    try:
        problems = store.verify_version(revision, progress=bar.advance)
    finally:
        bar.close()
    states = {variant: artifact_state(store, manifest, variant, verify_blobs=True) for variant in ARTIFACT_VARIANTS}
    damaged = [f"onnx {s.variant}/{s.blob}: {s.message}" for s in states.values() if s.state == "damaged"]
    data: dict[str, Any] = {
        "revision": revision,
        "ok": not problems and not damaged,
        "files": len(manifest.files),
        "problems": problems + damaged,
        "artifacts": {variant: state.to_dict() for variant, state in states.items()},
    }
    text = f"{revision}: " + ("intact" if not problems else "CORRUPT\n" + "\n".join(problems))
    for state in states.values():
        if state.state != "missing":
            text += f"\n  onnx {state.variant}: " + {"ok": "intact", "unusable": f"unusable ({state.message})"}.get(
                state.state, f"DAMAGED: {state.blob}: {state.message}"
            )
    if problems:
        how = files_repair_command(manifest)
        data["repair"] = how
        text += f"\nRepair it (re-copies only the damaged files, rebuilds damaged artifacts): {how}"
    elif damaged:
        data["repair"] = repair_command(revision)
        text += f"\nRebuild the damaged artifacts: {data['repair']}"
    return (0 if data["ok"] else 1), data, text


def files_repair_command(manifest: Any) -> str:
    """The command that copies a version's damaged files again from where they came from (its source)."""
    if manifest.source == "local":
        return f"python -m shared isolate --repair --from-dir DIR --model-id {manifest.model_id} (DIR: the folder it was isolated from)"
    if manifest.source == "blob":
        where = manifest.provenance
        prefix = f" --prefix {where['prefix'].rstrip('/')}" if where.get("prefix") else ""
        return (
            f"python -m shared adopt --repair --container {where.get('container', 'CONTAINER')}{prefix} --model-id {manifest.model_id} "
            f"(reading account {where.get('account', '?')}: AZURE_STORAGE_CONNECTION_STRING or --account-url)"
        )
    return f"python -m shared isolate --repair --revision {manifest.source_revision or manifest.revision}"


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    pointer = open_store(settings, args).rollback(args.to)
    data = {"revision": pointer.revision, "previous": list(pointer.previous), "pinned": pointer.pinned}
    return 0, data, f"current: {pointer.revision} (pinned; a scheduled refresh leaves it until a refresh names a revision)"


def add_parsers(add: Add) -> None:
    """Register this module's commands (``add`` makes a sub-parser with ``--json``)."""
    status = add("status", cmd_status, "show the pointer, the stored versions and the last refresh")
    status.add_argument("--model-id")

    verify = add("verify", cmd_verify, "re-hash a stored version against its manifest and its ONNX artifacts (exit 1 on mismatch)")
    verify.add_argument("--revision", help="default: the current one")
    verify.add_argument("--model-id")

    rollback = add("rollback", cmd_rollback, "point back at an earlier version and pin it")
    rollback.add_argument("--to", help="revision (default: the newest earlier complete version)")
    rollback.add_argument("--model-id")
