"""Process memory: handing freed heap pages back to the system after a large load or build."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_MAX = 32 << 20  # the most glibc's own sliding threshold reaches on 64-bit systems


@functools.cache
def _glibc(function: str, *argtypes: Any) -> Any:
    """A function of the C library that only glibc has (``None`` on musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        found = getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None
    if found is not None:
        found.argtypes = list(argtypes)
    return found


def resident_bytes() -> int | None:
    """This process's resident set now (``VmRSS``), in bytes; ``None`` where ``/proc`` has no such line."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def release_pages(buffer: bytearray | mmap.mmap, start: int, end: int, *, protect: bool = False) -> int:
    """Hand the whole pages of ``buffer[start:end]`` back to the system (``madvise(MADV_DONTNEED)``):
    they read as zeros afterwards, so only for bytes nobody will read again (a source already
    rewritten elsewhere). Partial pages at either end are kept. With ``protect`` (an ``mmap`` of
    one's own) the pages are also made inaccessible, so that a stray read crashes at once instead
    of reading zeros. A no-op (0) where ``madvise`` is missing.

    Returns:
        The number of bytes released.
    """
    madvise = _glibc("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    end = min(end, len(buffer))
    if madvise is None or end <= start or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    page = mmap.PAGESIZE
    first = (base + start + page - 1) // page * page
    last = (base + end) // page * page
    if last <= first:
        return 0
    madvise(first, last - first, mmap.MADV_DONTNEED)
    mprotect = _glibc("mprotect", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if protect and mprotect is not None:
        mprotect(first, last - first, 0)  # PROT_NONE
    return last - first


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``); ``False`` where the
    C library has no such call (musl, macOS, Windows).

    glibc keeps freed heap pages in the process. Building an ONNX Runtime session copies every
    initializer out of the weights buffer, packs most of them for its kernels and frees the
    copies: bert-large once loaded was 1,689 MiB resident before the trim and 1,358 after (fp32),
    700 and 498 (int8). The refresh calls it, through :func:`release_memory`, between its steps
    (torch canary, export, each artifact's canary).
    """
    trim = _glibc("malloc_trim", ctypes.c_size_t)
    if trim is None:
        return False
    trim(0)
    return True


def release_memory() -> None:
    """Between the steps of a large build or check: collect the Python objects just dropped (a
    model, an exported graph), then hand the heap's free pages back, so that the next step does
    not stack on the last one's leftovers."""
    gc.collect()
    release_free_heap()


@contextlib.contextmanager
def large_blocks_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """Inside the block, an allocation of ``threshold`` bytes or more that the heap's free chunks
    cannot serve gets pages of its own (``mmap``), which go back to the system the moment they
    are freed (glibc; a no-op elsewhere).

    glibc's threshold slides up to 32 MiB as big blocks are freed, after which such blocks come
    from the heap, whose freed pages stay resident: building an ONNX Runtime session of
    bert-large fp32 (copies of each initializer, packed, then freed) peaked at 2,741 MiB on
    some loads and 2,968-2,979 on others; with the threshold fixed during the build, 2,741
    every time. Setting it stops glibc's sliding for the life of the process, so on exit the
    threshold is left at the sliding one's ceiling, where a loaded process usually is.
    """
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
