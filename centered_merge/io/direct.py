"""Writing tensors' bytes past the page cache (O_DIRECT), for the writer (io/writer.py).

Why: a buffered pwrite copies every output byte into page-cache pages, and on this project's VM (a Firecracker
guest) fresh pages are expensive: 984 MiB written from a reused buffer into a new file took 2.4-2.5 CPU-s
when the page cache had to grow, 0.22 CPU-s when it reused pages just freed, then 0.3-0.7 s of fdatasync. The same
bytes written with O_DIRECT from a page-aligned buffer took 0.50-0.60 s in all, of which 0.034-0.041 CPU-s, in each
of four runs (docs/engine.md, "Writing past the page cache", 2026-12-01). On a 2-core machine the CPU the copy no
longer takes goes to the merge, and the output never occupies the page cache that the inputs need.

Direct I/O needs the file offset, the length and the memory address of each write aligned to the device's logical
block (512 or 4096 bytes; BLOCK covers both). A tensor's bytes are split three ways:
- the head, up to the first aligned file offset, and the tail, after the last whole block: a usual (buffered)
  pwrite, because those blocks may be shared with the neighbouring tensors, which another thread or rank may be
  writing; buffered writes of one block from several writers are coherent in the page cache, direct ones are not;
- the whole blocks between them: one direct pwrite straight from the tensor's memory when that is aligned too (the
  engine's output buffers are, buffers.OutputPool), else through a small reused aligned staging buffer (a
  user-space copy of already-faulted memory, 7-8 GB/s here, against the kernel's copy into fresh pages).
A file system that refuses O_DIRECT at open (tmpfs, some FUSE and network file systems) or at a write (EINVAL: an
alignment the device wants larger than BLOCK) gets buffered writes for that file from then on; the bytes on disk are
the same either way. Durability is unchanged: the writer's fdatasync still covers the metadata (block allocation,
file size) and the device's write cache.
"""
from __future__ import annotations

import errno
import mmap
import os
from typing import Dict, List, Optional, Tuple

BLOCK = 4096  # a multiple of every logical block size Linux devices use (512, 4096)
STAGE_BYTES = 8 << 20  # the staging buffer; 1 to 128 MiB chunks wrote 984 MiB equally fast here (0.39-0.9 s, noise)
CHUNK = 1 << 26  # bytes per pwrite call, as the buffered path


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (os-level writes may be short)."""
    pos = 0
    while pos < len(data):
        pos += os.pwrite(fd, data[pos:pos + CHUNK], offset + pos)


def open_direct(path) -> Optional[int]:
    """A write-only O_DIRECT descriptor of `path`, or None where the platform or file system has no direct I/O."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


class DirectWrites:
    """Per file (a key: the shard index), its direct descriptor if it has one; `write` puts a tensor's bytes at
    their offset, the aligned part past the cache. One thread writes (the writer's); not thread-safe."""

    def __init__(self) -> None:
        self._fds: Dict[int, Optional[int]] = {}
        self._stage: Optional[mmap.mmap] = None
        self.direct_bytes = 0  # bytes written past the cache (for tests and the benchmark's notes)

    def open(self, key: int, path) -> None:
        self._fds[key] = open_direct(path)

    def write(self, key: int, fd: int, data: memoryview, address: int, offset: int) -> List[Tuple[int, int]]:
        """Write `data` (whose first byte is at memory `address`) at `offset` of the file whose buffered
        descriptor is `fd`. Returns the (offset, length) ranges that went through the page cache."""
        n = len(data)
        head = min((-offset) % BLOCK, n)
        body = (n - head) // BLOCK * BLOCK
        dfd = self._fds.get(key)
        if dfd is None or body == 0:
            pwrite_all(fd, data, offset)
            return [(offset, n)] if n else []
        cached = []
        if head:
            pwrite_all(fd, data[:head], offset)
            cached.append((offset, head))
        try:
            self._write_body(dfd, data[head:head + body], address + head, offset + head)
            self.direct_bytes += body
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._fds[key] = None  # this device or file system wants more than BLOCK: buffered from now on
            os.close(dfd)
            pwrite_all(fd, data[head:head + body], offset + head)
            cached.append((offset + head, body))
        if head + body < n:
            pwrite_all(fd, data[head + body:], offset + head + body)
            cached.append((offset + head + body, n - head - body))
        return cached

    def _write_body(self, dfd: int, data: memoryview, address: int, offset: int) -> None:
        if address % BLOCK == 0:
            pwrite_all(dfd, data, offset)  # a short write leaves an unaligned rest: EINVAL, and the rest is rewritten
            return
        if self._stage is None:
            self._stage = mmap.mmap(-1, STAGE_BYTES)  # anonymous mappings start on a page boundary
        stage = memoryview(self._stage)
        try:
            for pos in range(0, len(data), STAGE_BYTES):
                k = min(STAGE_BYTES, len(data) - pos)
                stage[:k] = data[pos:pos + k]
                pwrite_all(dfd, stage[:k], offset + pos)
        finally:
            stage.release()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for dfd in fds.values():
            if dfd is not None:
                try:
                    os.close(dfd)
                except OSError:
                    pass
        if self._stage is not None:
            self._stage.close()
            self._stage = None
