"""Building and loading the ONNX artifacts of a bert-large-shaped model: time, memory, temp disk.

    .venv/bin/python bench/onnx_build_load.py [--variants fp32,int8] [--load-only]

Each step runs in a fresh process. ``build``: ``build_onnx`` from the model folder (whole
process peak RSS, bytes written to disk during the build, which must stay under Flex
Consumption's temp budget); the artifact is then saved under ``bench/out/onnx-bert-large/``
for ``load`` and for ``bench/engine.py``. ``load``: the files are read into ``bytearray``s as a
download leaves them, then ``onnx_engine`` builds the session and releases them: load seconds,
peak RSS during the load (against the goal of 2.1x the artifact + 300 MB), steady RSS after the
load, after a first answer and after a 4-window batch (against 1.2x the artifact + runtime, the
runtime being the process with onnxruntime imported before any model byte is read).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fixtures import OUT, bert_large
from bench.harness import cpu_line, io_write_bytes, measure, peak_rss_mb, rss_mb, run_variant, table

ARTIFACTS = OUT / "onnx-bert-large"


def build(model_dir: str, variant: str) -> dict[str, Any]:
    from shared.refresh.onnx_export import build_onnx

    written = io_write_bytes()
    began = time.monotonic()
    artifact = build_onnx(Path(model_dir), variant)
    seconds = time.monotonic() - began
    result = {
        "seconds": seconds,
        "build_peak_rss_mb": peak_rss_mb(),
        "temp_written_mb": (io_write_bytes() - written) / 1e6,
        "artifact_mb": artifact.size / 1e6,
    }
    folder = ARTIFACTS / variant
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in artifact.files.items():
        (folder / name).write_bytes(data)
    (folder / "artifact.json").write_text(json.dumps(artifact.record, indent=1))
    return result


def load(model_dir: str, variant: str) -> dict[str, Any]:
    import onnxruntime  # noqa: F401 - part of the runtime: imported before the baseline is read
    import tokenizers  # noqa: F401

    from shared.engine.onnx_runner import default_threads, onnx_engine
    from shared.engine.question_answering import Limits, QAItem

    folder = ARTIFACTS / variant
    record = json.loads((folder / "artifact.json").read_text())
    tokenizer = {"tokenizer.json": (Path(model_dir) / "tokenizer.json").read_bytes()}
    runtime = rss_mb()  # interpreter, numpy, tokenizers, onnxruntime: the process before any model byte
    files = {}
    for name in ("model.onnx", "weights.bin"):  # as a download leaves them: one bytearray each
        path = folder / name
        files[name] = bytearray(path.stat().st_size)
        with path.open("rb") as handle:
            handle.readinto(files[name])
    artifact_mb = sum(len(v) for v in files.values()) / 2**20  # MiB, as RSS is counted
    before = rss_mb()
    began = time.monotonic()
    engine = onnx_engine(files, record, tokenizer, limits=Limits(max_windows=64), threads=default_threads(None, 1))
    load_seconds = time.monotonic() - began
    load_peak = peak_rss_mb()
    after_load = rss_mb()
    engine.answer([QAItem("Which team won Super Bowl 50?", "The Denver Broncos defeated the Carolina Panthers 24-10.")])
    after_answer = rss_mb()
    words = " ".join(f"word{i % 50} is here." for i in range(900))
    engine.answer([QAItem("Which word is here?", words)])  # 4 or more windows of 384 tokens in one pass
    after_batch = rss_mb()
    return {
        "seconds": load_seconds,
        "artifact_mb": artifact_mb,
        "runtime_mb": runtime,
        "rss_before_mb": before,
        "load_peak_mb": load_peak,  # MiB
        "steady_after_load_mb": after_load,
        "after_first_answer_mb": after_answer,
        "after_4_windows_mb": after_batch,
    }


VARIANTS = {"build": build, "load": load}


def ensure_artifacts(variants: tuple[str, ...] = ("fp32", "int8")) -> dict[str, dict[str, Any]]:
    """Build the artifacts that ``bench/out/onnx-bert-large/`` lacks; the build rows of those built."""
    model_dir = str(bert_large())
    rows = {}
    for variant in variants:
        if not (ARTIFACTS / variant / "artifact.json").exists():
            rows[variant] = measure(__file__, "build", model_dir=model_dir, variant=variant)
    return rows


def main() -> None:
    variants = tuple(sys.argv[sys.argv.index("--variants") + 1].split(",")) if "--variants" in sys.argv else ("fp32", "int8")
    model_dir = str(bert_large())
    if "--load-only" in sys.argv:
        builds = ensure_artifacts(variants)
    else:
        builds = {v: measure(__file__, "build", model_dir=model_dir, variant=v) for v in variants}
    loads = {v: measure(__file__, "load", model_dir=model_dir, variant=v) for v in variants}
    print(cpu_line())
    safetensors_mb = (Path(model_dir) / "model.safetensors").stat().st_size / 1e6
    print(f"bert-large-shaped model: model.safetensors {safetensors_mb:.0f} MB; RSS columns in MiB")
    print(
        table(
            [(f"build {v}", row) for v, row in builds.items()] or [("(builds: bench/out/onnx-bert-large/ kept)", {})],
            [
                ("seconds", "seconds", ".1f"),
                ("build_peak_rss_mb", "peak RSS MB", ".0f"),
                ("temp_written_mb", "written MB", ".1f"),
                ("artifact_mb", "artifact MB", ".0f"),
            ],
        )
    )
    print(
        table(
            [(f"load {v}", row) for v, row in loads.items()],
            [
                ("seconds", "load s", ".2f"),
                ("rss_before_mb", "before MB", ".0f"),
                ("load_peak_mb", "peak MB", ".0f"),
                ("steady_after_load_mb", "loaded MB", ".0f"),
                ("after_first_answer_mb", "1 answer MB", ".0f"),
                ("after_4_windows_mb", "4 windows MB", ".0f"),
            ],
        )
    )
    for variant, row in loads.items():
        size = row["artifact_mb"]
        runtime = row["runtime_mb"]
        print(
            f"{variant}: load peak {row['load_peak_mb']:.0f} MB vs goal {2.1 * size + 300:.0f} (2.1x artifact + 300 MB); "
            f"steady {row['steady_after_load_mb']:.0f} MB vs goal {1.2 * size + runtime:.0f} (1.2x artifact + runtime {runtime:.0f} MB); "
            f"after serving a 4-window batch {row['after_4_windows_mb']:.0f} MB"
        )


if __name__ == "__main__":
    if "--variant" in sys.argv:
        run_variant(VARIANTS)
    else:
        main()
