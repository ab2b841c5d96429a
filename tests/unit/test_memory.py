"""Freed heap pages go back to the system (``shared.memory.release_free_heap``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from shared.memory import M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX, large_blocks_mapped, release_free_heap

ROOT = Path(__file__).resolve().parents[2]

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c"))
    lib.malloc.restype = ctypes.c_void_p
    lib.malloc.argtypes = [ctypes.c_size_t]
    lib.free.argtypes = [ctypes.c_void_p]
    lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return lib


def allocate_touch_free(lib: ctypes.CDLL, chunk: int, count: int) -> tuple[int, int]:
    """RSS (bytes) with ``count`` resident chunks allocated, and right after they are freed; a
    chunk kept after them stops glibc's own trimming of the heap's top."""
    chunks = [lib.malloc(chunk) for _ in range(count)]
    keeper = lib.malloc(chunk)
    assert all(chunks) and keeper
    for address in chunks:
        ctypes.memset(address, 1, chunk)
    held = rss_bytes()
    for address in chunks:
        lib.free(address)
    freed = rss_bytes()
    lib.free(keeper)
    return held, freed


@glibc
def test_freed_heap_chunks_leave_the_resident_set() -> None:
    """Chunks below the mmap threshold stay resident after free() until the heap is trimmed."""
    lib = libc()
    chunk, count = 64 * 1024, 1600  # 100 MiB in chunks glibc serves from the heap, not by mmap
    held, freed = allocate_touch_free(lib, chunk, count)
    assert release_free_heap() is True
    trimmed = rss_bytes()
    assert freed - trimmed > 0.5 * chunk * count, (held, freed, trimmed)


def mapped_blocks_scenario() -> None:
    """In a fresh process (a serving instance before its load: no free chunks in the heap, which
    malloc would hand out first whatever the threshold)."""
    lib = libc()
    lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)  # where glibc's sliding threshold ends up in a loaded process
    chunk, count = 2 << 20, 50
    held, freed = allocate_touch_free(lib, chunk, count)
    assert held - freed < 0.2 * chunk * count, "outside, 2 MiB blocks come from the heap and stay resident"
    release_free_heap()
    with large_blocks_mapped():
        held, freed = allocate_touch_free(lib, chunk, count // 2)
    assert held - freed > 0.8 * chunk * (count // 2), (held, freed)


@glibc
def test_inside_large_blocks_mapped_big_blocks_leave_the_resident_set_when_freed() -> None:
    code = "from tests.unit.test_memory import mapped_blocks_scenario; mapped_blocks_scenario()"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_onnx_engine_hands_the_heap_back_after_building_its_session(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.engine import onnx_runner

    from .test_onnx import artifact, tokenizer_files

    calls: list[int] = []
    built = artifact("bert", "int8")
    files = {name: bytearray(data) for name, data in built.files.items()}
    monkeypatch.setattr(onnx_runner, "release_free_heap", lambda: calls.append(sum(len(b) for b in files.values())) or True)
    onnx_runner.onnx_engine(files, built.record, tokenizer_files("bert"), threads=1)
    assert calls == [0]  # once, after the download buffers were emptied
