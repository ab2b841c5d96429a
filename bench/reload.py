"""Peak memory through a hot reload of a bert-large-sized model: ``MODEL_RELOAD=replace`` against ``overlap``.

    .venv/bin/python bench/reload.py           # needs Azurite on 127.0.0.1:10000

For each mode a fresh serving process loads version 1 through the holder, the parent publishes
version 2 (same weights, another config, so another revision), and the child's poller reloads it.
The child prints its RSS and peak RSS (``VmHWM``) before and after: ``replace`` must never hold
two copies (the 4 GB Flex case), ``overlap`` does by design.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fixtures import bert_large
from bench.harness import azurite_connection, peak_rss_mb, rss_mb


def _env(container: str, mode: str = "replace") -> dict[str, str]:
    return {
        "MODEL_STORAGE": azurite_connection(),
        "MODEL_CONTAINER": container,
        "MODEL_ID": "bench/reload",
        "MODEL_POLL_SECONDS": "0.5",
        "MODEL_RELOAD": mode,
    }


def child(mode: str, container: str) -> None:
    from shared.serving.holder import ModelHolder
    from shared.settings import Settings

    settings = Settings.from_env(_env(container, mode))
    holder = ModelHolder(lambda: settings)
    with holder.model(time.monotonic() + 300) as loaded:
        first = loaded.revision
    del loaded  # a finished request holds no reference
    print(json.dumps({"stage": "loaded", "rss": rss_mb(), "peak": peak_rss_mb()}), flush=True)
    sys.stdin.readline()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and holder.health().get("revision") in (None, first):
        time.sleep(0.2)
    print(
        json.dumps({"stage": "reloaded", "rss": rss_mb(), "peak": peak_rss_mb(), "revision": holder.health().get("revision")}), flush=True
    )


def main() -> None:
    from shared.refresh.isolation import LocalDirSource, isolate
    from shared.settings import Settings
    from shared.store.model_store import ModelStore

    source = bert_large()
    model_mb = (source / "model.safetensors").stat().st_size / 1e6
    second = Path(tempfile.mkdtemp(prefix="reload-v2-"))
    for path in source.iterdir():
        if path.name != "config.json":
            os.link(path, second / path.name)  # same bytes, no copy
    config = json.loads((source / "config.json").read_text())
    (second / "config.json").write_text(json.dumps({**config, "bench_variant": 2}))
    print(f"model.safetensors: {model_mb:.0f} MB")
    print(f"{'mode':<10}{'RSS loaded':>12}{'RSS after':>12}{'peak':>10}{'peak - model':>14}")
    try:
        for mode in ("replace", "overlap"):
            container = f"reload{uuid.uuid4().hex[:10]}"
            store = ModelStore.from_settings(Settings.from_env(_env(container)))
            store.ensure_container()
            try:
                isolate(store, LocalDirSource(source), explicit=True, keep_versions=3)
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--child", mode, container], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
                assert proc.stdin is not None and proc.stdout is not None
                loaded = json.loads(proc.stdout.readline())
                isolate(store, LocalDirSource(second), explicit=True, keep_versions=3)
                proc.stdin.write("go\n")
                proc.stdin.flush()
                after = json.loads(proc.stdout.readline())
                proc.wait()
            finally:
                store.container.delete_container()
            print(f"{mode:<10}{loaded['rss']:>11.0f}M{after['rss']:>11.0f}M{after['peak']:>9.0f}M{after['peak'] - model_mb:>13.0f}M")
    finally:
        shutil.rmtree(second)


if __name__ == "__main__":
    if "--child" in sys.argv:
        child(sys.argv[sys.argv.index("--child") + 1], sys.argv[sys.argv.index("--child") + 2])
    else:
        main()
