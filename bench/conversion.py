"""Peak memory of isolating a bert-large-shaped model that ships only ``pytorch_model.bin``, against
the same model as safetensors (the refresh's own budget).

    .venv/bin/python bench/conversion.py        # needs Azurite on 127.0.0.1:10000; builds bench/out/ once (about 4 GB)

Variants, each in a fresh process: the conversion alone (read, check, hash, stream the converted
file into nothing) of the zip ``.bin`` and of a legacy (pre-zip) one; then the whole isolate into
Azurite (copy, canary, no ONNX artifacts) of the safetensors folder and of both ``.bin`` ones.
"peak RSS" is ``VmHWM``; "+ memfd" also counts the in-memory file while it is not mapped (sampled).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fixtures import OUT, bert_large
from bench.harness import azurite_connection, measure, run_variant, table


def bin_folder(*, legacy: bool) -> Path:
    """bert-large with its weights saved as ``pytorch_model.bin`` (built on first use)."""
    import shutil

    dest = OUT / ("bert-large-random-bin-legacy" if legacy else "bert-large-random-bin")
    if (dest / "pytorch_model.bin").exists():
        return dest
    import torch
    from safetensors.torch import load_file

    source = bert_large()
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy2(path, dest / path.name)
    tensors = load_file(str(source / "model.safetensors"))
    torch.save(tensors, dest / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return dest


class MemorySampler:
    """Peak of RssAnon + RssFile + the size of this process's in-memory files (``memfd``), sampled
    every 20 ms: an in-memory file's pages count against the instance's memory whether or not they
    are mapped, and ``VmRSS`` counts them only while mapped (a legacy pickle is read, not mapped)."""

    def __init__(self) -> None:
        import threading

        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import os

        while not self._stop.wait(0.02):
            status = {k: v for k, _, v in (line.partition(":") for line in Path("/proc/self/status").read_text().splitlines())}
            kib = sum(int(status.get(key, "0 kB").split()[0]) for key in ("RssAnon", "RssFile"))
            files = {}  # an in-memory file opened twice (torch maps it through a path of its own) counts once
            for fd in os.listdir("/proc/self/fd"):
                try:
                    if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                        stat = os.fstat(int(fd))
                        files[(stat.st_dev, stat.st_ino)] = stat.st_size
                except OSError:
                    continue
            self.peak_mb = max(self.peak_mb, kib / 1024 + sum(files.values()) / (1 << 20))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def convert_only(folder: str) -> dict[str, Any]:
    from bench.harness import rss_mb
    from shared.refresh.isolation import LocalDirSource
    from shared.refresh.model_checks import CheckedSource

    sampler = MemorySampler()
    checked = CheckedSource(LocalDirSource(folder))
    snapshot = checked.snapshot()
    after_convert = rss_mb()
    entry = next(e for e in snapshot.files if e.name == "model.safetensors")
    streamed = sum(len(chunk) for chunk in checked.open(entry))
    assert streamed == entry.size
    checked.release()
    return {
        "mb": entry.size / 1e6,
        "peak_with_memfd_mb": sampler.stop(),
        "rss_after_convert_mb": after_convert,
        "rss_after_release_mb": rss_mb(),
    }


def isolate_folder(folder: str, container: str) -> dict[str, Any]:
    from bench.harness import rss_mb
    from shared.refresh.isolation import LocalDirSource, isolate
    from shared.refresh.worker import canary_validator
    from shared.settings import Settings
    from shared.store.model_store import ModelStore

    settings = Settings.from_env(
        {"MODEL_STORAGE": azurite_connection(), "MODEL_CONTAINER": container, "MODEL_ID": "bench/bert-large", "MODEL_ARTIFACTS": "none"}
    )
    store = ModelStore.from_settings(settings)
    sampler = MemorySampler()
    try:
        result = isolate(store, LocalDirSource(folder), explicit=True, keep_versions=3, validate=canary_validator(settings))
        assert result.outcome == "published", result
    finally:
        store.container.delete_container()
    return {"mb": result.bytes_moved / 1e6, "peak_with_memfd_mb": sampler.stop(), "rss_after_mb": rss_mb()}


VARIANTS = {"convert_only": convert_only, "isolate_folder": isolate_folder}


def main() -> None:
    zip_bin, legacy_bin = bin_folder(legacy=False), bin_folder(legacy=True)

    def isolated(folder: Path) -> dict[str, Any]:
        return measure(__file__, "isolate_folder", folder=str(folder), container=f"b{uuid.uuid4().hex[:12]}")

    rows = [
        ("convert pytorch_model.bin (zip)", measure(__file__, "convert_only", folder=str(zip_bin))),
        ("convert pytorch_model.bin (legacy)", measure(__file__, "convert_only", folder=str(legacy_bin))),
        ("isolate safetensors (canary)", isolated(bert_large())),
        ("isolate .bin, converted (canary)", isolated(zip_bin)),
        ("isolate legacy .bin (canary)", isolated(legacy_bin)),
    ]
    columns = [
        ("mb", "MB", ".0f"),
        ("seconds", "seconds", ".1f"),
        ("peak_rss_mb", "peak RSS MB", ".0f"),
        ("peak_with_memfd_mb", "+ memfd MB", ".0f"),
        ("written_mb", "written MB", ".1f"),
    ]
    print(table(rows, columns))
    for label, row in rows:
        extra = {k: round(v) for k, v in row.items() if k.startswith("rss_")}
        print(f"{label}: {extra}")


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    else:
        main()
