"""Freed heap pages go back to the system (``shared.memory.release_free_heap``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from pathlib import Path

import pytest

from shared.memory import release_free_heap

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@glibc
def test_freed_heap_chunks_leave_the_resident_set() -> None:
    """Chunks below the mmap threshold stay resident after free() until the heap is trimmed; a
    chunk kept at the end stops glibc's own trimming of the heap's top."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunk, count = 64 * 1024, 1600  # 100 MiB in chunks glibc serves from the heap, not by mmap
    chunks = [libc.malloc(chunk) for _ in range(count)]
    keeper = libc.malloc(chunk)
    assert all(chunks) and keeper
    for address in chunks:
        ctypes.memset(address, 1, chunk)  # resident
    for address in chunks:
        libc.free(address)
    freed = rss_bytes()
    assert release_free_heap() is True
    trimmed = rss_bytes()
    libc.free(keeper)
    assert freed - trimmed > 0.5 * chunk * count, (freed, trimmed)


def test_the_onnx_engine_hands_the_heap_back_after_building_its_session(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import onnx_runner

    from .test_onnx import artifact, tokenizer_files

    calls: list[int] = []
    built = artifact("bert", "int8")
    files = {name: bytearray(data) for name, data in built.files.items()}
    monkeypatch.setattr(onnx_runner, "release_free_heap", lambda: calls.append(sum(len(b) for b in files.values())) or True)
    onnx_runner.onnx_engine(files, built.record, tokenizer_files("bert"), threads=1)
    assert calls == [0]  # once, after the download buffers were emptied
