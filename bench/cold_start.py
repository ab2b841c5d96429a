"""Cold start of a serving instance: from "no model in this process" to the first answer.

    .venv/bin/python bench/cold_start.py           # needs Azurite on 127.0.0.1:10000
    .venv/bin/python bench/cold_start.py --local   # from local files: torch fp32 vs the ONNX artifacts

``--local`` times each backend from PROCESS START (interpreter and imports included) to the first
answer, the files read from local disk into buffers as a memory-mode download leaves them (no
storage in the way): the torch fp32 path (``engine_from_files``) against the ONNX fp32 and int8
artifacts (``onnx_engine``, built by ``bench/onnx_build_load.py`` on first use), and whether torch was
imported.

A bert-large-shaped model (random fp32 weights, 1.34 GB) is published to Azurite once, and its
fp32 and int8 ONNX artifacts built into the version (``build_artifacts``, as a refresh does); then
each variant runs in a fresh process: the seed's way (every blob ``readall()`` into a temp folder,
load from there), the project's memory mode, and disk mode with a cold and a warm cache (these
four timed after the torch import, as the seed's baseline was). Then the serving path itself
(``ModelHolder`` with ``load_artifact``, as ``function_app`` makes it) timed from PROCESS START,
interpreter and imports included: ``QA_BACKEND=torch`` (today's fp32 torch path, memory mode)
against ``QA_BACKEND=onnx`` with ``QA_QUANTIZE=none`` and ``int8``, with the RSS once answered.
Bytes written to disk come from ``write_bytes`` in ``/proc/self/io``. Azurite shares the 2 cores.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fixtures import bert_large
from bench.harness import azurite_connection, measure, rss_mb, run_variant, table

QUESTION = "Which team won Super Bowl 50?"
CONTEXT = "Super Bowl 50 was played in 2016. The Denver Broncos defeated the Carolina Panthers to win the title."


def _settings(container: str, **extra: str) -> Any:
    from shared.settings import Settings

    env = {"MODEL_STORAGE": azurite_connection(), "MODEL_CONTAINER": container, "MODEL_ID": "bench/bert-large", **extra}
    return Settings.from_env(env)


def _clock_after_imports() -> float:
    import torch  # noqa: F401 - imports are not part of the cold start being compared
    import transformers  # noqa: F401

    return time.monotonic()


def simple(container: str, revision: str) -> dict[str, Any]:
    from shared.engine.question_answering import QAItem
    from shared.engine.torch_model import engine_from_dir
    from shared.store.model_store import ModelStore

    began = _clock_after_imports()
    store = ModelStore.from_settings(_settings(container))
    folder = Path(tempfile.mkdtemp(prefix="seed-"))
    try:
        for blob in store.container.list_blobs(name_starts_with=store.version_prefix(revision)):
            name = blob.name.rsplit("/", 1)[-1]
            (folder / name).write_bytes(store.container.get_blob_client(blob.name).download_blob().readall())
        engine = engine_from_dir(folder)
        answer = engine.answer([QAItem(QUESTION, CONTEXT)])[0][0]
    finally:
        shutil.rmtree(folder)
    return {"seconds": time.monotonic() - began, "answer": answer.answer}


def project(container: str, revision: str, mode: str, cache_dir: str = "") -> dict[str, Any]:
    from shared.engine.question_answering import QAItem
    from shared.loading.versions import load_version
    from shared.store.model_store import ModelStore

    began = _clock_after_imports()
    settings = _settings(container, MODEL_LOAD_MODE=mode, MODEL_CACHE_DIR=cache_dir)
    loaded = load_version(ModelStore.from_settings(settings, serving=True), revision, settings)
    answer = loaded.engine.answer([QAItem(QUESTION, CONTEXT)])[0][0]
    return {"seconds": time.monotonic() - began, "answer": answer.answer}


def publish(folder: str, container: str) -> dict[str, Any]:
    from shared.refresh.isolation import LocalDirSource, isolate
    from shared.store.model_store import ModelStore

    store = ModelStore.from_settings(_settings(container))
    store.ensure_container()
    result = isolate(store, LocalDirSource(folder), explicit=True, keep_versions=3)
    return {"revision": result.revision}


def build(container: str, revision: str) -> dict[str, Any]:
    """The version's ONNX artifacts, as ``python -m shared build-artifacts`` builds them (no canary:
    random weights have no right answer to check)."""
    from shared.refresh.artifact_builds import build_artifacts
    from shared.store.model_store import ModelStore

    settings = _settings(container, MODEL_ARTIFACTS="fp32,int8")
    store = ModelStore.from_settings(settings)
    manifest = store.read_manifest(revision)
    assert manifest is not None
    return {"outcomes": build_artifacts(store, manifest, settings)}


def serving(container: str, backend: str, quantize: str) -> dict[str, Any]:
    """The first answer of a serving process, from process start, through the app's own holder."""
    from shared.engine.question_answering import QAItem
    from shared.loading.onnx_artifacts import load_artifact
    from shared.serving.holder import ModelHolder

    settings = _settings(container, MODEL_LOAD_MODE="memory", QA_BACKEND=backend, QA_QUANTIZE=quantize)
    holder = ModelHolder(lambda: settings, artifact_loader=load_artifact)
    try:
        with holder.model(time.monotonic() + 600) as loaded:
            answer = loaded.engine.answer([QAItem(QUESTION, CONTEXT)])[0][0]
            seconds = _since_process_start()
            served_by = f"{loaded.backend} {loaded.variant}"
        fallbacks = holder.describe()["fallbacks"]
    finally:
        holder.close()
    return {
        "seconds": seconds,
        "answer": answer.answer,
        "served_by": served_by,
        "fallbacks": fallbacks,
        "rss_answered_mb": rss_mb(),
        "torch_imported": "torch" in sys.modules,
    }


def _since_process_start() -> float:
    """Seconds since this process started (``/proc/self/stat`` field 22, in clock ticks since boot)."""
    import os

    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _read_into_memory(path: Path) -> bytearray:
    buffer = bytearray(path.stat().st_size)
    with path.open("rb") as handle:
        handle.readinto(buffer)
    return buffer


def local_torch(model_dir: str) -> dict[str, Any]:
    from shared.engine.question_answering import QAItem
    from shared.engine.torch_model import engine_from_files

    files = {p.name: _read_into_memory(p) for p in Path(model_dir).iterdir() if p.is_file()}
    engine = engine_from_files(files)
    del files
    answer = engine.answer([QAItem(QUESTION, CONTEXT)])[0][0]
    return {"seconds": _since_process_start(), "answer": answer.answer, "torch_imported": "torch" in sys.modules}


def local_onnx(model_dir: str, variant: str) -> dict[str, Any]:
    from bench.onnx_build_load import ARTIFACTS
    from shared.engine.onnx_runner import default_threads, onnx_engine
    from shared.engine.question_answering import QAItem

    folder = ARTIFACTS / variant
    files = {name: _read_into_memory(folder / name) for name in ("model.onnx", "weights.bin")}
    record = json.loads((folder / "artifact.json").read_text())
    tokenizer = {"tokenizer.json": _read_into_memory(Path(model_dir) / "tokenizer.json")}
    engine = onnx_engine(files, record, tokenizer, threads=default_threads(None, 1))
    answer = engine.answer([QAItem(QUESTION, CONTEXT)])[0][0]
    return {"seconds": _since_process_start(), "answer": answer.answer, "torch_imported": "torch" in sys.modules}


VARIANTS = {
    "simple": simple,
    "project": project,
    "publish": publish,
    "build": build,
    "serving": serving,
    "local_torch": local_torch,
    "local_onnx": local_onnx,
}


def main_local() -> None:
    from bench.harness import cpu_line
    from bench.onnx_build_load import ensure_artifacts

    folder = str(bert_large())
    ensure_artifacts()
    rows = {}
    for repeat in (1, 2):
        rows[f"torch fp32 (safetensors), run {repeat}"] = measure(__file__, "local_torch", model_dir=folder)
        rows[f"onnx fp32 artifact, run {repeat}"] = measure(__file__, "local_onnx", model_dir=folder, variant="fp32")
        rows[f"onnx int8 artifact, run {repeat}"] = measure(__file__, "local_onnx", model_dir=folder, variant="int8")
    print(cpu_line())
    print("from process start (interpreter, imports, read into memory, load, first answer); files in the page cache")
    print(table(list(rows.items()), [("seconds", "1st answer s", ".2f"), ("peak_rss_mb", "peak RSS MB", ".0f")]))
    for name, row in rows.items():
        print(f"{name}: torch imported: {row['torch_imported']}")
    for repeat in (1, 2):
        base = rows[f"torch fp32 (safetensors), run {repeat}"]["seconds"]
        for variant in ("fp32", "int8"):
            row = rows[f"onnx {variant} artifact, run {repeat}"]
            print(f"run {repeat}: onnx {variant} is {base / row['seconds']:.2f}x faster to the first answer than torch fp32")


def main() -> None:
    folder = bert_large()
    model_mb = (folder / "model.safetensors").stat().st_size / 1e6
    container = f"bench{uuid.uuid4().hex[:12]}"
    cache = tempfile.mkdtemp(prefix="bench-cache-")
    try:
        revision = measure(__file__, "publish", folder=str(folder), container=container)["revision"]
        rows = {
            "seed's way (readall, temp dir)": measure(__file__, "simple", container=container, revision=revision),
            "memory mode": measure(__file__, "project", container=container, revision=revision, mode="memory"),
            "disk mode, cold cache": measure(__file__, "project", container=container, revision=revision, mode="disk", cache_dir=cache),
            "disk mode, warm cache": measure(__file__, "project", container=container, revision=revision, mode="disk", cache_dir=cache),
        }
        # the artifacts after the seed's way: it downloads every blob of the version
        built = measure(__file__, "build", container=container, revision=revision)
        serve_rows: dict[str, dict[str, Any]] = {}
        for repeat in (1, 2):
            for label, backend, quantize in (("torch fp32", "torch", "none"), ("onnx fp32", "onnx", "none"), ("onnx int8", "onnx", "int8")):
                serve_rows[f"{label}, run {repeat}"] = measure(__file__, "serving", container=container, backend=backend, quantize=quantize)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        from shared.store.model_store import ModelStore

        ModelStore.from_settings(_settings(container)).container.delete_container()
    answers = {row["answer"] for row in rows.values()}
    print(f"model.safetensors: {model_mb:.0f} MB; every variant answered {json.dumps(sorted(answers))}")
    print(
        table(
            list(rows.items()),
            [("seconds", "1st answer s", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"), ("written_mb", "written MB", ".1f")],
        )
    )
    base = rows["seed's way (readall, temp dir)"]
    for name, row in rows.items():
        if row is not base:
            print(f"{name}: {base['seconds'] / row['seconds']:.2f}x faster to first answer than the seed's way")
    memory = rows["memory mode"]
    print(f"memory mode peak RSS over the model size: {memory['peak_rss_mb'] - model_mb:.0f} MB (target: at most 600)")
    print()
    from bench.harness import cpu_line

    print(cpu_line())
    print(f"artifacts built in {built['seconds']:.0f} s (peak RSS {built['peak_rss_mb']:.0f} MiB): {built['outcomes']}")
    print("serving path (ModelHolder, memory mode) from PROCESS START to the first answer, imports included; RSS in MiB")
    print(
        table(
            list(serve_rows.items()),
            [("seconds", "1st answer s", ".2f"), ("peak_rss_mb", "peak RSS", ".0f"), ("rss_answered_mb", "RSS answered", ".0f")],
        )
    )
    for name, row in serve_rows.items():
        print(f"{name}: served by {row['served_by']}, torch imported: {row['torch_imported']}, fallbacks: {row['fallbacks']}")
    for repeat in (1, 2):
        base = serve_rows[f"torch fp32, run {repeat}"]["seconds"]
        for label in ("onnx fp32", "onnx int8"):
            row = serve_rows[f"{label}, run {repeat}"]
            print(f"run {repeat}: {label} artifact is {base / row['seconds']:.2f}x faster to the first answer than torch fp32")


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    elif "--local" in sys.argv:
        main_local()
    else:
        main()
