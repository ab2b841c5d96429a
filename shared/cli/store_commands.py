"""Commands that read or mend what is stored: ``status``, ``verify``, ``rollback`` and ``repair``.

Each works whatever record of the store is damaged: a damaged record is reported with the command
that repairs it, never turned into the command's own failure.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..settings import Settings
from ..wire import to_json
from .common import Add, BarProgress, open_store, revision_or_current


def cmd_status(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """Pointer, versions (with their artifacts), last refresh, and every damaged record with its repair."""
    from ..loading.onnx_artifacts import status

    data = to_json(status(open_store(settings, args), expected=settings.artifacts))
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
        lines.append(f"current: {pointer['revision'] or 'unknown'}{pin}, previous: {', '.join(pointer['previous']) or 'none'}")
        if pointer["state"] != "ok":
            lines.append(f"  POINTER {pointer['state'].upper()}: {pointer['problem']}; repair: {pointer['repair']}")
    for version in data["versions"]:
        state = {"complete": "complete", "damaged": "DAMAGED"}.get(
            version["state"], "INCOMPLETE (staged files, resumed by the next isolate)"
        )
        if (
            version["state"] == "incomplete"
            and last.get("revision") == version["revision"]
            and last.get("error_code") == "validation_failed"
        ):
            state = "INCOMPLETE (staged; the canary failed: set MODEL_CANARY or isolate --skip-canary)"
        when = f"isolated {version['isolated_at']}" if version["isolated_at"] else f"last written {version['last_modified']}"
        lines.append(f"  {version['revision']}  {state}  {version['files']} files  {version['bytes']} bytes  {when}")
        if version["state"] == "damaged":
            lines.append(f"    {version['problem']}; repair: {version['repair']}")
        for variant, artifact in version.get("artifacts", {}).items():
            if artifact["state"] == "ok":
                lines.append(f"    onnx {variant}: {artifact['size']} bytes, usable")
            else:
                lines.append(f"    onnx {variant}: {artifact['state'].upper()} ({artifact['reason']})")
    if last.get("outcome"):
        line = f"last refresh: {last.get('outcome')} at {last.get('finished')} ({last.get('error') or 'ok'})"
        if last.get("outcome") == "failed" and pointer is not None:
            line += f"; nothing changed: still serving {pointer['revision']}"
        lines.append(line)
    if last.get("last_skipped_at"):
        lines.append(f"last skipped: {last['last_skipped_at']} ({last.get('skipped_reason')})")
    if data["damage"]:
        lines.append(f"damaged records ({len(data['damage'])}):")
        lines += [f"  {d['record']}: {d['problem']}\n    repair: {d['repair']}" for d in data["damage"]]
    return 0, data, "\n".join(lines)


def cmd_verify(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """Check the store's records, re-hash one version's files against its manifest and its ONNX
    artifacts' blobs against their records; exit 1 when anything is damaged or an expected artifact missing."""
    from ..loading.onnx_artifacts import artifact_state, build_command, repair_command
    from ..settings import ARTIFACT_VARIANTS
    from ..store.model_files import version_repair

    store = open_store(settings, args)
    revision = revision_or_current(store, args.revision, "verify")
    records = _record_damage(store)
    manifest, manifest_damage = store.manifest_state(revision)
    data: dict[str, Any] = {"revision": revision, "ok": False, "files": 0, "problems": [], "artifacts": {}, "damage": records}
    lines: list[str] = []
    if manifest is None:
        if manifest_damage is None:
            lines.append(f"{revision}: not a complete version in this container (python -m shared status lists them)")
            return 1, data, _with_records("\n".join(lines), records)
        data["repair"] = manifest_damage.repair
        lines.append(
            f"{revision}: DAMAGED: {manifest_damage.message}\nRepair it (rewrites it from its source, verified): {manifest_damage.repair}"
        )
        return 1, data, _with_records("\n".join(lines), records)
    bar = BarProgress("verify")
    bar.plan(manifest.total_bytes)
    try:
        problems = store.verify_version(revision, progress=bar.advance)
    finally:
        bar.close()
    states = {variant: artifact_state(store, manifest, variant, verify_blobs=True) for variant in ARTIFACT_VARIANTS}
    damaged = [f"onnx {s.variant}/{s.blob}: {s.message}" for s in states.values() if s.state == "damaged"]
    missing = [s.variant for s in states.values() if s.state == "missing" and s.variant in settings.artifacts]
    data.update(
        ok=not problems and not damaged and not missing and not records,
        files=len(manifest.files),
        problems=problems + damaged + [f"onnx {variant}: missing (MODEL_ARTIFACTS expects it)" for variant in missing],
        artifacts={variant: state.to_dict() for variant, state in states.items()},
    )
    lines.append(f"{revision}: " + ("intact" if not problems else "CORRUPT\n" + "\n".join(problems)))
    for state in states.values():
        if state.state == "missing" and state.variant not in settings.artifacts:
            continue
        lines.append(
            f"  onnx {state.variant}: "
            + {
                "ok": "intact",
                "unusable": f"unusable ({state.message})",
                "missing": "MISSING (MODEL_ARTIFACTS expects it)",
            }.get(state.state, f"DAMAGED: {state.blob}: {state.message}")
        )
    if problems:
        data["repair"] = version_repair(
            revision, manifest.source, manifest.source_revision, model_id=manifest.model_id, provenance=manifest.provenance
        )
        lines.append(f"Repair it (re-copies only the damaged files, rebuilds damaged artifacts): {data['repair']}")
    elif damaged:
        data["repair"] = repair_command(revision)
        lines.append(f"Rebuild the damaged artifacts: {data['repair']}")
    elif missing:
        data["repair"] = build_command(revision)
        lines.append(f"Build the missing artifacts: {data['repair']}")
    return (0 if data["ok"] else 1), data, _with_records("\n".join(lines), records)


def _record_damage(store: Any) -> list[dict[str, str]]:
    """The damaged records of the store other than a version's artifacts: the pointer, every
    manifest, last-refresh.json, a lease nobody releases (each with its repair); a few KB per version."""
    state = store.read_pointer_state()
    found = [] if state.damage is None else [to_json(state.damage)]
    if state.pointer is not None and state.pointer.revision not in {m.revision for m in store.intact_versions()}:
        found.append(
            {
                "record": "current.json",
                "problem": f"current.json points at {state.pointer.revision}, which is not an intact complete version",
                "repair": "python -m shared repair (moves it to the newest intact version of its history), or repair that version",
            }
        )
    for revision in store.complete_revisions():
        damage = store.manifest_state(revision)[1]
        if damage is not None:
            found.append(to_json(damage))
    for damage in (store.last_refresh_state()[1], store.lock_damage()):
        if damage is not None:
            found.append(to_json(damage))
    return found


def _with_records(text: str, records: list[dict[str, str]]) -> str:
    if not records:
        return text
    listed = "\n".join(f"  {d['record']}: {d['problem']}\n    repair: {d['repair']}" for d in records)
    return f"{text}\ndamaged records of the store ({len(records)}):\n{listed}"


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """What ``POST /api/model/rollback`` does, with the command profile (also the way to rewrite a
    damaged ``current.json`` at a chosen version); ``--json`` prints its body."""
    from ..serving.shapes import RollbackResult
    from ..wire import to_json

    pointer = open_store(settings, args).rollback(args.to)
    text = f"current: {pointer.revision} (pinned; a scheduled refresh leaves it until a refresh names a revision)"
    return 0, to_json(RollbackResult.of(pointer)), text


def cmd_repair(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, Any], str]:
    """Mend the store's records that need no source: a damaged, missing or dangling ``current.json``
    (from its history), a damaged ``last-refresh.json`` (removed), and with ``--break-lock`` a lease
    on ``refresh.lock`` nobody will release. Names the repair of what remains (manifests, artifacts)."""
    store = open_store(settings, args)
    done: list[str] = []
    if args.break_lock:
        done.append(store.break_lock())
    with store.lock():
        pointer, what = store.repair_pointer()
        done.append(what)
        done.append(store.repair_last_refresh())
    remaining = _record_damage(store)
    data = {
        "revision": None if pointer is None else pointer.revision,
        "done": done,
        "remaining": remaining,
        "ok": not remaining,
    }
    text = "\n".join(done)
    if remaining:
        text = _with_records(text, remaining) + "\nThose need their source (see each repair)."
    return (0 if not remaining else 1), data, text


def add_parsers(add: Add) -> None:
    """Register this module's commands (``add`` makes a sub-parser with ``--json``)."""
    status = add("status", cmd_status, "show the pointer, the stored versions, the last refresh, and damaged records with their repair")
    status.add_argument("--model-id")

    verify = add(
        "verify",
        cmd_verify,
        "check the store's records and re-hash a stored version against its manifest and its ONNX artifacts (exit 1 on any damage)",
    )
    verify.add_argument("--revision", help="default: the current one")
    verify.add_argument("--model-id")

    rollback = add("rollback", cmd_rollback, "point back at an earlier version and pin it (also rewrites a damaged current.json)")
    rollback.add_argument("--to", help="revision (default: the newest earlier complete version)")
    rollback.add_argument("--model-id")

    repair = add(
        "repair",
        cmd_repair,
        "rewrite a damaged, missing or dangling current.json from its history and remove a damaged last-refresh.json; "
        "name the repair of anything else (exit 1 while something remains)",
    )
    repair.add_argument("--break-lock", action="store_true", help="first break a lease on refresh.lock that nobody will release")
    repair.add_argument("--model-id")
