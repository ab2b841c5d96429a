"""Moving big files to and from Blob Storage in parallel blocks while hashing them in order.

Uploads stage fixed-size blocks from any stream of bytes (a local file or an HTTP response),
several at once, and commit the block list only when the sha256 of what flowed matches: a blob
under its final name always has the bytes it claims. Downloads fetch ranges in parallel and
hash them in order, into a file or straight into a preallocated buffer. Memory stays bounded
by ``block_size x (concurrency + 1)``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError
from azure.storage.blob import BlobBlock, BlobClient

from ..errors import IntegrityError, StorageUnavailableError
from .storage import RANGE_READ_TIMEOUT, storage_errors

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


def _noop(_: int) -> None:
    pass


def rechunk(chunks: Iterable[bytes], block_size: int) -> Iterator[bytes]:
    """Regroup a stream of byte chunks of any size into blocks of exactly ``block_size``
    (the last one shorter)."""
    buf = bytearray()
    for chunk in chunks:
        if not buf and len(chunk) == block_size:
            yield bytes(chunk)
            continue
        buf += chunk
        while len(buf) >= block_size:
            yield bytes(buf[:block_size])
            del buf[:block_size]
    if buf:
        yield bytes(buf)


def file_chunks(stream: BinaryIO, block_size: int) -> Iterator[bytes]:
    """Read an open binary file in blocks."""
    while True:
        block = stream.read(block_size)
        if not block:
            return
        yield block


def upload_blocks(
    blob: BlobClient,
    chunks: Iterable[bytes],
    *,
    name: str,
    expected_size: int,
    expected_sha256: str,
    block_size: int,
    concurrency: int,
    metadata: dict[str, str] | None = None,
    progress: Progress = _noop,
) -> int:
    """Stage ``chunks`` as blocks of ``blob`` and commit them if size and sha256 match.

    Args:
        blob: the destination (overwritten on commit).
        chunks: the file's bytes, in order, in pieces of any size.
        name: the file's name, for messages.
        expected_size, expected_sha256: what the bytes must add up to.
        block_size: bytes per staged block.
        concurrency: blocks in flight at once.
        metadata: blob metadata to set on commit (``sha256`` is added).
        progress: called with the number of bytes of each staged block.

    Returns:
        The number of bytes sent.

    Raises:
        IntegrityError: the bytes that flowed differ from the expected size or sha256; nothing
            is committed.
    """
    digest = hashlib.sha256()
    sent = 0
    block_ids: list[str] = []
    in_flight: deque[Future[object]] = deque()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="stage") as pool:
        try:
            for index, block in enumerate(rechunk(chunks, block_size)):
                digest.update(block)
                sent += len(block)
                if sent > expected_size:
                    raise IntegrityError(f"{name} is larger than its recorded size {expected_size}")
                block_id = base64.b64encode(f"{index:08d}".encode()).decode()
                block_ids.append(block_id)
                in_flight.append(pool.submit(_stage, blob, block_id, block, progress))
                while len(in_flight) >= concurrency:
                    in_flight.popleft().result()
            while in_flight:
                in_flight.popleft().result()
        finally:
            for pending in in_flight:
                pending.cancel()
    actual = digest.hexdigest()
    if sent != expected_size or actual != expected_sha256:
        raise IntegrityError(
            f"{name}: the bytes read ({sent} B, sha256 {actual[:12]}...) differ from the expected "
            f"({expected_size} B, sha256 {expected_sha256[:12]}...); the file changed or was corrupted in transit"
        )
    with storage_errors(f"committing {name}"):
        blob.commit_block_list(
            [BlobBlock(block_id=b) for b in block_ids],
            metadata={**(metadata or {}), "sha256": actual},
        )
    return sent


def _stage(blob: BlobClient, block_id: str, block: bytes, progress: Progress) -> None:
    with storage_errors(f"uploading a block of {blob.blob_name}"):
        blob.stage_block(block_id, block, length=len(block))
    progress(len(block))


class PlacedUpload:
    """A blob written piece by piece, the pieces coming in any order (and a piece possibly again):
    each is staged as blocks of its own as it comes (at most ``concurrency`` in flight, so memory
    stays bounded by about ``block_size x (concurrency + 1)``), and :meth:`commit` puts them in
    their order. The sha256 of a file whose bytes do not flow in order cannot be taken as they
    flow: :meth:`commit` reads the committed blob back and hashes it, so the size and sha256 it
    returns are those of what storage holds.

    Args:
        blob: the destination (overwritten on commit).
        name: the file's name, for messages.
        block_size, concurrency: as for :func:`upload_blocks`.
    """

    def __init__(self, blob: BlobClient, *, name: str, block_size: int, concurrency: int) -> None:
        self.blob, self.name = blob, name
        self._blocks: dict[int, list[str]] = {}
        self._sizes: dict[int, int] = {}
        self._block_size, self._concurrency = block_size, concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="place")
        self._in_flight: deque[Future[object]] = deque()

    def put(self, index: int, data: memoryview, pad: int = 0) -> None:
        """Stage piece ``index``: ``data`` followed by ``pad`` zero bytes (returns once its last
        block is in flight; ``data`` may be reused then)."""
        view = memoryview(data).cast("B")
        blocks: list[str] = []
        total = len(view) + pad
        if not 0 <= index < 10**5 or total > 999 * self._block_size:
            raise ValueError(f"piece {index} of {self.name} ({total} bytes): at most 100,000 pieces of 999 blocks each")
        for number, first in enumerate(range(0, total, self._block_size)):
            block = bytes(view[first : first + self._block_size])
            block += bytes(min(self._block_size, total - first) - len(block))  # the zero padding, if it falls here
            # as long as upload_blocks' ids (Blob Storage wants one length for a blob's blocks)
            block_id = base64.b64encode(f"{index:05d}{number:03d}".encode()).decode()
            blocks.append(block_id)
            self._in_flight.append(self._pool.submit(_stage, self.blob, block_id, block, _noop))
            while len(self._in_flight) >= self._concurrency:
                self._in_flight.popleft().result()
        self._blocks[index], self._sizes[index] = blocks, total

    def commit(self, size: int, metadata: dict[str, str] | None = None) -> str:
        """Commit the pieces in order (numbered from 0, none missing, ``size`` bytes in all), then
        read the blob back and hash it: the sha256 of what storage holds.

        Raises:
            IntegrityError: a piece is missing, or the sizes differ; nothing is committed then.
        """
        try:
            while self._in_flight:
                self._in_flight.popleft().result()
        finally:
            self.close()
        pieces = len(self._blocks)
        missing = [k for k in range(pieces) if k not in self._blocks]
        if missing or sum(self._sizes.values()) != size:
            raise IntegrityError(
                f"{self.name}: {pieces} pieces of {sum(self._sizes.values())} bytes arrived for {size} bytes"
                f"{f' (piece {missing[0]} missing)' if missing else ''}; nothing committed"
            )
        with storage_errors(f"committing {self.name}"):
            in_order = [BlobBlock(block_id=b) for k in range(pieces) for b in self._blocks[k]]
            etag = str(self.blob.commit_block_list(in_order, metadata=metadata)["etag"])
            stored = self.blob.get_blob_properties(etag=etag, match_condition=MatchConditions.IfNotModified).size
        if stored != size:
            raise IntegrityError(f"{self.name} is {stored} bytes in storage after its commit, {size} were sent")
        digest = hashlib.sha256()
        block_size, concurrency = self._block_size, self._concurrency
        for view in read_ranges(self.blob, name=self.name, size=size, etag=etag, block_size=block_size, concurrency=concurrency):
            digest.update(view)
        actual = digest.hexdigest()
        with storage_errors(f"recording the sha256 of {self.name}"):
            self.blob.set_blob_metadata({**(metadata or {}), "sha256": actual}, etag=etag, match_condition=MatchConditions.IfNotModified)
        return actual

    def close(self) -> None:
        """Stop staging (blocks never committed are dropped by storage after a week)."""
        for pending in self._in_flight:
            pending.cancel()
        self._in_flight.clear()
        self._pool.shutdown(wait=True)


class BlobChangedError(IntegrityError):
    """The blob was rewritten (its ETag changed) while its ranges were read: start the file over."""


class _ViewWriter:
    """A write-only stream over a slice of a buffer, for ``StorageStreamDownloader.readinto``."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def write(self, data: bytes) -> int:
        end = self._pos + len(data)
        if end > len(self._view):
            raise IntegrityError("blob is larger than its recorded size")
        self._view[self._pos : end] = data
        self._pos = end
        return len(data)

    def writable(self) -> bool:
        return True

    @property
    def written(self) -> int:
        return self._pos


def download_ranges(
    blob: BlobClient,
    *,
    name: str,
    size: int,
    expected_sha256: str,
    block_size: int,
    concurrency: int,
    into: memoryview | None = None,
    sink: Callable[[memoryview], object] | None = None,
    progress: Progress = _noop,
    recorded_in: str = "the manifest",
) -> None:
    """Fetch ``blob`` in parallel ranges and check its sha256 while the ranges arrive in order.

    ``recorded_in`` names where ``size`` and ``expected_sha256`` come from, for messages.
    Either ``into`` (a writable buffer of exactly ``size`` bytes: ranges land in place, no
    extra copy) or ``sink`` (called with each range in order, for example a file's ``write``).
    Every range is read with If-Match on the ETag seen first, so a concurrent rewrite (a repair)
    can never produce a file mixed from two writes.

    Raises:
        BlobChangedError: the blob changed during the read; the caller may start over.
        IntegrityError: a size or sha256 mismatch; the message names the file.
    """
    if (into is None) == (sink is None):
        raise ValueError("give exactly one of into= or sink=")
    if into is not None and len(into) != size:
        raise ValueError("buffer size differs from the file size")
    with storage_errors(f"reading the properties of {name}"):
        properties = blob.get_blob_properties(read_timeout=RANGE_READ_TIMEOUT)
    actual_size, etag = properties.size, properties.etag
    if actual_size != size:
        raise IntegrityError(f"{name} is {actual_size} bytes in storage, {recorded_in} says {size}")
    digest = hashlib.sha256()
    for view in read_ranges(blob, name=name, size=size, etag=etag, block_size=block_size, concurrency=concurrency, into=into):
        digest.update(view)
        if sink is not None:
            sink(view)
        progress(len(view))
    actual = digest.hexdigest()
    if actual != expected_sha256:
        raise IntegrityError(f"{name}: sha256 in storage is {actual[:12]}..., {recorded_in} says {expected_sha256[:12]}...")


def read_ranges(
    blob: BlobClient,
    *,
    name: str,
    size: int,
    etag: str,
    block_size: int,
    concurrency: int,
    into: memoryview | None = None,
) -> Iterator[memoryview]:
    """The ``size`` bytes of ``blob`` as it is at ``etag``, in order, one range at a time, while up to
    ``concurrency`` ranges are fetched ahead: memory stays bounded by ``block_size x (concurrency + 1)``
    (ranges land in ``into``, a buffer of ``size`` bytes, when given).

    Raises:
        BlobChangedError: the blob no longer has ``etag`` (it was rewritten).
        IntegrityError: storage returned a range of another length.
    """
    ranges = [(offset, min(block_size, size - offset)) for offset in range(0, size, block_size)]
    in_flight: deque[tuple[int, int, Future[memoryview]]] = deque()

    def fetch(offset: int, length: int) -> memoryview:
        target = into[offset : offset + length] if into is not None else memoryview(bytearray(length))
        writer = _ViewWriter(target)
        try:
            with storage_errors(f"downloading {name}"):
                blob.download_blob(
                    offset=offset,
                    length=length,
                    max_concurrency=1,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                    read_timeout=RANGE_READ_TIMEOUT,
                ).readinto(writer)  # type: ignore[arg-type]
        except StorageUnavailableError as err:
            if isinstance(err.__cause__, ResourceModifiedError):  # 412: the ETag no longer matches
                raise BlobChangedError(f"{name} was rewritten while it was read") from err
            raise
        if writer.written != length:
            raise IntegrityError(f"{name}: storage returned {writer.written} bytes for a {length}-byte range")
        return target

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fetch") as pool:
        pending = iter(ranges)
        try:
            for offset, length in pending:
                in_flight.append((offset, length, pool.submit(fetch, offset, length)))
                if len(in_flight) >= concurrency:
                    break
            while in_flight:
                _offset, _length, future = in_flight.popleft()
                view = future.result()
                nxt = next(pending, None)
                if nxt is not None:
                    in_flight.append((nxt[0], nxt[1], pool.submit(fetch, *nxt)))
                yield view
        finally:
            for _, _, future in in_flight:
                future.cancel()
