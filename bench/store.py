"""Publish and download a bert-large-sized model to Azurite: the project's way against the simple way.

    .venv/bin/python bench/store.py            # needs Azurite on 127.0.0.1:10000 (scripts/run starts one)

The simple way is the seed's: ``upload_blob`` with defaults per file; ``download_blob().readall()``
then write. The project's way: ``isolate`` (hash, parallel blocks, sha256 on the fly, manifest,
pointer) and ``download_version`` (parallel ranges hashed in order, temp name, rename).
Numbers measure Azurite sharing the same 2 cores, not Azure.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fixtures import bert_large
from bench.harness import azurite_connection, measure, run_variant, table


def _store(container: str) -> Any:
    from shared.settings import Settings
    from shared.store.model_store import ModelStore

    return ModelStore.from_settings(
        Settings.from_env({"MODEL_STORAGE": azurite_connection(), "MODEL_CONTAINER": container, "MODEL_ID": "bench/bert-large"})
    )


def project_publish(folder: str, container: str) -> dict[str, Any]:
    from shared.refresh.isolation import LocalDirSource, isolate

    store = _store(container)
    result = isolate(store, LocalDirSource(folder), explicit=True, keep_versions=3)
    return {"mb": result.bytes_moved / 1e6, "revision": result.revision}


def project_download(container: str, revision: str) -> dict[str, Any]:
    store = _store(container)
    dest = Path(tempfile.mkdtemp(prefix="bench-dl-"))
    try:
        manifest = store.download_version(revision, dest)
    finally:
        shutil.rmtree(dest)
    return {"mb": manifest.total_bytes / 1e6}


def simple_publish(folder: str, container: str) -> dict[str, Any]:
    store = _store(container)
    total = 0
    for path in sorted(Path(folder).iterdir()):
        with path.open("rb") as data:
            store.container.upload_blob(f"simple/{path.name}", data, overwrite=True)
        total += path.stat().st_size
    return {"mb": total / 1e6}


def simple_download(container: str) -> dict[str, Any]:
    store = _store(container)
    dest = Path(tempfile.mkdtemp(prefix="bench-dl-"))
    total = 0
    try:
        for blob in store.container.list_blobs(name_starts_with="simple/"):
            data = store.container.get_blob_client(blob.name).download_blob().readall()
            (dest / blob.name.split("/")[-1]).write_bytes(data)
            total += len(data)
    finally:
        shutil.rmtree(dest)
    return {"mb": total / 1e6}


VARIANTS = {f.__name__: f for f in (project_publish, project_download, simple_publish, simple_download)}


def main() -> None:
    folder = str(bert_large())
    container = f"bench{uuid.uuid4().hex[:12]}"
    store = _store(container)
    store.ensure_container()
    try:
        results = {}
        results["simple_publish"] = measure(__file__, "simple_publish", folder=folder, container=container)
        results["project_publish"] = measure(__file__, "project_publish", folder=folder, container=container)
        revision = results["project_publish"]["revision"]
        results["simple_download"] = measure(__file__, "simple_download", container=container)
        results["project_download"] = measure(__file__, "project_download", container=container, revision=revision)
    finally:
        store.container.delete_container()
    for row in results.values():
        row["mb_s"] = row["mb"] / row["seconds"]
    rows = [
        ("publish, simple (upload_blob)", results["simple_publish"]),
        ("publish, project (isolate)", results["project_publish"]),
        ("download, simple (readall)", results["simple_download"]),
        ("download, project (ranges)", results["project_download"]),
    ]
    print(table(rows, [("seconds", "seconds", ".1f"), ("mb_s", "MB/s", ".0f"), ("peak_rss_mb", "peak RSS MB", ".0f")]))
    for op in ("publish", "download"):
        simple, project = results[f"simple_{op}"], results[f"project_{op}"]
        print(
            f"{op}: project is {simple['seconds'] / project['seconds']:.2f}x the speed of the simple way, "
            f"peak RSS {project['peak_rss_mb'] / simple['peak_rss_mb']:.2f}x"
        )


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    else:
        main()
