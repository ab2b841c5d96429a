"""What exporting the app's events to Application Insights costs a cold start.

    .venv/bin/python bench/telemetry.py      # needs Azurite on 127.0.0.1:10000

Each variant runs in a fresh process, with telemetry OFF (no connection string: what local runs
and tests do) and ON (``APPLICATIONINSIGHTS_CONNECTION_STRING`` pointing at a loopback stand-in
for the ingestion endpoint, ``tests/fixtures/ingestion.py``; nothing leaves the machine), OFF and
ON alternating, nine times each; medians and the ON/OFF ratio in one table, in wall-clock seconds
and in CPU seconds of the process (every thread; steadier than wall time on a shared machine):

- ``import``: process start -> ``function_app`` imported (what the worker's indexing waits for;
  ON starts the export in a thread of its own: OpenTelemetry's SDK, Azure Monitor's exporter, a
  provider, while the app goes on).
- ``health``: process start -> the first ``/api/health`` answered (no model).
- ``first ask``: process start -> the first ``/api/ask`` answered by the tiny test model
  (tests/fixtures/models/bert), stored in Azurite with its ONNX fp32 artifact: the serving path of
  a cold instance, model load included, through the app's own functions.
- ``import, started in the foreground``: the design not taken, for comparison: the app imported
  without a connection string, then the export started on the calling thread.

ON also flushes the export and counts what the stand-in received (the ``event=model_load`` line of
the model-load thread among them). Then ``python -X importtime`` of the export's imports, once
``function_app`` is imported: the modules that cost the most.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, azurite_connection, cpu_line, measure, run_variant

MODEL = ROOT / "tests" / "fixtures" / "models" / "bert"
QUESTION = {"question": "Who won?", "context": "Super Bowl 50 was played in 2016. The Denver Broncos won the game."}
REPEATS = 9


def _since_process_start() -> float:
    """Seconds since this process started (its start time from the kernel, to 10 ms)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _call(function_app: Any, name: str, **request: Any) -> Any:
    import azure.functions as func

    functions = {f.get_function_name(): f for f in function_app.app.get_functions()}
    return functions[name].get_user_function()(func.HttpRequest(url=f"http://localhost/api/{name}", **request))


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _flushed(function_app: Any) -> int:
    export = function_app.events_export
    if export is None:
        return 0
    export.flush()
    return 1


def import_app() -> dict[str, Any]:
    import function_app

    seconds, cpu = _since_process_start(), _cpu_seconds()
    return {"seconds": seconds, "cpu": cpu, "exporting": _flushed(function_app), "modules": len(sys.modules)}


def import_then_start(connection_string: str) -> dict[str, Any]:
    import function_app
    from shared.settings import app_insights_from_env
    from shared.telemetry.export import start_export

    target = app_insights_from_env({"APPLICATIONINSIGHTS_CONNECTION_STRING": connection_string})
    assert function_app.events_export is None and target is not None
    export = start_export(target)
    seconds, cpu = _since_process_start(), _cpu_seconds()
    export.flush()
    return {"seconds": seconds, "cpu": cpu, "exporting": 1}


def health() -> dict[str, Any]:
    import function_app

    response = _call(function_app, "health", method="GET", body=b"")
    seconds, cpu = _since_process_start(), _cpu_seconds()
    assert response.status_code in (200, 503), response.status_code
    return {"seconds": seconds, "cpu": cpu, "exporting": _flushed(function_app)}


def first_ask() -> dict[str, Any]:
    import json

    import function_app

    response = _call(function_app, "ask", method="POST", body=json.dumps(QUESTION).encode())
    seconds, cpu = _since_process_start(), _cpu_seconds()
    assert response.status_code == 200, response.get_body()
    served = json.loads(response.get_body())
    backend = f"{served.get('backend')}/{served.get('variant')}"
    return {"seconds": seconds, "cpu": cpu, "exporting": _flushed(function_app), "backend": backend}


def publish(container: str) -> dict[str, Any]:
    """The tiny model in ``container`` with its fp32 ONNX artifact (as a refresh leaves a version)."""
    from shared.refresh.artifact_builds import build_artifacts
    from shared.refresh.isolation import LocalDirSource, isolate
    from shared.settings import Settings
    from shared.store.model_store import ModelStore

    settings = Settings.from_env(_model_env(container) | {"MODEL_ARTIFACTS": "fp32"})
    store = ModelStore.from_settings(settings)
    store.ensure_container()
    revision = isolate(store, LocalDirSource(str(MODEL)), explicit=True, keep_versions=3).revision
    assert revision is not None
    manifest = store.read_manifest(revision)
    assert manifest is not None
    return {"revision": revision, "artifacts": build_artifacts(store, manifest, settings)}


def drop(container: str) -> dict[str, Any]:
    from shared.settings import Settings
    from shared.store.model_store import ModelStore

    ModelStore.from_settings(Settings.from_env(_model_env(container))).container.delete_container()
    return {}


VARIANTS = {
    "import_app": import_app,
    "import_then_start": import_then_start,
    "health": health,
    "first_ask": first_ask,
    "publish": publish,
    "drop": drop,
}


def _model_env(container: str) -> dict[str, str]:
    return {
        "MODEL_STORAGE": azurite_connection(),
        "MODEL_CONTAINER": container,
        "MODEL_ID": "bench/tiny-bert",
        "MODEL_POLL_SECONDS": "0",
        "QA_BACKEND": "onnx",
        "QA_QUANTIZE": "none",
    }


def _run(name: str, env: dict[str, str], **args: Any) -> dict[str, Any]:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return measure(__file__, name, **args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def importtime(env: dict[str, str]) -> list[tuple[int, str]]:
    """``-X importtime`` of what starting the export imports once the app is imported: the
    top-level entries, slowest first (microseconds, cumulative)."""
    code = (
        "import function_app\n"
        "import opentelemetry.sdk._logs, opentelemetry.sdk._logs.export, opentelemetry.sdk.resources\n"
        "import azure.monitor.opentelemetry.exporter, azure.identity\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APPLICATIONINSIGHTS_")}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, check=True
    )
    rows: list[tuple[int, str]] = []
    after_app = False
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if not cumulative.isdigit():
            continue
        if name == "function_app":
            after_app = True  # the app's own imports are the baseline
            continue
        if after_app and not line.split("|")[2].startswith("  "):  # top level only (two spaces: nested)
            rows.append((int(cumulative), name))
    return sorted(rows, reverse=True)


def main() -> None:
    container = f"bench{uuid.uuid4().hex[:12]}"
    from tests.fixtures.ingestion import QUIET, Ingestion

    sink = Ingestion().start()
    base = {k: "" for k in os.environ if k.startswith("APPLICATIONINSIGHTS_")} | _model_env(container)
    modes = {"off": base, "on": {**base, **QUIET, "APPLICATIONINSIGHTS_CONNECTION_STRING": sink.connection_string}}
    try:
        published = _run("publish", base, container=container)
        rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for _ in range(REPEATS):
            for name in ("import_app", "health", "first_ask"):
                for mode, env in modes.items():
                    rows.setdefault((name, mode), []).append(_run(name, env))
            foreground = _run("import_then_start", base, connection_string=sink.connection_string)
            rows.setdefault(("import_app", "foreground"), []).append(foreground)
        slowest = importtime(modes["off"])  # OFF: function_app itself imports none of them
    finally:
        _run("drop", base, container=container)
        time.sleep(1)  # the last exports of the ON runs have reached the stand-in
        sink.stop()
    print(cpu_line())
    print(f"tiny model {published['revision']}, artifacts {published['artifacts']}; {REPEATS} runs of each, OFF and ON alternating")
    columns = ("OFF s", "ON s", "ON-OFF", "ON/OFF", "OFF cpu", "ON cpu", "ON/OFF", "RSS +MB")
    print(f"{'from process start to':<36}" + "".join(f"{c:>9}" for c in columns))
    lines = [(name, name, "on") for name in ("import_app", "health", "first_ask")]
    lines.append(("import, started in the foreground", "import_app", "foreground"))
    for label, name, mode in lines:
        off, on = rows[(name, "off")], rows[(name, mode)]
        wall_off, wall_on = (statistics.median(r["seconds"] for r in runs) for runs in (off, on))
        cpu_off, cpu_on = (statistics.median(r["cpu"] for r in runs) for runs in (off, on))
        rss = statistics.median(r["peak_rss_mb"] for r in on) - statistics.median(r["peak_rss_mb"] for r in off)
        cells = (wall_off, wall_on, wall_on - wall_off, wall_on / wall_off, cpu_off, cpu_on, cpu_on / cpu_off, rss)
        print(f"{label:<36}" + "".join(f"{c:>9.3f}" for c in cells))
    exporting = {mode: sum(r["exporting"] for name in ("import_app", "health", "first_ask") for r in rows[(name, mode)]) for mode in modes}
    print(f"processes exporting: OFF {exporting['off']}, ON {exporting['on']}; served by {rows[('first_ask', 'on')][0]['backend']}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores shared: wall times are as steady as the machine)")
    messages = sink.messages()
    loads = [m for m in messages if m.startswith("event=model_load ") and " outcome=ok " in m]
    asks = [m for m in messages if m.startswith("event=ask ")]
    print(f"the stand-in received {len(sink.items)} items: {len(loads)} event=model_load outcome=ok, {len(asks)} event=ask")
    print("-X importtime of the export's imports after function_app (cumulative ms, top level):")
    for micros, module in slowest[:8]:
        print(f"  {micros / 1000:8.1f}  {module}")


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    else:
        main()
