"""Reused output buffers for the methods that write into a caller's tensor (MergeMethod.writes_into).

A fresh output tensor per merged tensor costs fresh anonymous pages: the kernel zeroes each one at its first touch
(clear_page, 13% of a weight-average merge's CPU samples on the 4 x 1.08 GB set) and unmaps it at the free. Here
the output of a tensor is a view of a buffer that comes back once the writer is done with its bytes (the
writer's on_written), and the next tensor that fits reuses it, already faulted in.

Memory: a buffer is in use while its tensor (or piece of a tensor: the elementwise merges hand large tensors to the
writer in pieces, engine/pipeline.py) is merged, waits in the writer's queue or is written, so at most
`write_queue + 2` are in use at once; the pool keeps at most that many buffers in all (in use or free), dropping
the smallest free one when a larger one is needed. So it holds at most (write_queue + 2) x (the largest output
tensor or piece + one block), whatever the number of tensors.

Direct I/O (io/direct.py) takes a tensor's whole blocks straight from its memory only when that memory and the
file offset are aligned alike: the first byte at an aligned file offset must sit at an aligned address. A tensor's
file offset is rarely a multiple of 4096 (a header of any length comes first, then the tensors, packed), so
`take` places the view at the same offset modulo 4096 in its buffer as the tensor has in its file (`phase`):
its whole blocks then go to disk without the writer's staging copy. Measured on the 4 x 1.08 GB set, task
arithmetic: with views at the buffer's start, that copy was 7.4% of the merge's CPU samples (memmove on the
writer thread), and the main thread waited 0.21-0.29 s for room in the writer's queue.

Thread safety: `take` runs on the main thread, `give_back` on the writer thread; one lock guards both.
"""
from __future__ import annotations

import math
import threading
from typing import Dict, Hashable, List

import torch

from ..io.direct import BLOCK


def _aligned(nbytes: int) -> torch.Tensor:
    """nbytes of uint8 starting on a BLOCK boundary, so the writer sends them to disk straight from here (direct
    I/O, io/direct.py) instead of through its staging copy; torch's allocator aligns to 64 bytes only."""
    raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8)
    pad = (-raw.data_ptr()) % BLOCK
    return raw[pad:pad + nbytes]


class OutputPool:
    def __init__(self, max_buffers: int):
        self.max_buffers = max(1, int(max_buffers))
        self._free: List[torch.Tensor] = []  # uint8 buffers, none in use
        self._used: Dict[Hashable, torch.Tensor] = {}  # token -> the buffer its output is a view of
        self._lock = threading.Lock()
        self.allocated = 0  # buffers made (for tests and the benchmark's notes)

    def take(self, token: Hashable, shape, dtype: torch.dtype, phase: int = 0) -> torch.Tensor:
        """A contiguous CPU tensor of `shape` and `dtype` (contents undefined), a view of a pooled buffer, held
        for `token` (a tensor's name, or (name, first byte) of a piece) until give_back(token). phase: where the
        bytes go in their file; the view starts at an address equal to it modulo BLOCK."""
        nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
        phase %= BLOCK
        room = nbytes + BLOCK  # every buffer has room for its view at any phase, so any buffer that fits is reusable
        with self._lock:
            if token in self._used:
                raise RuntimeError(f"output pool: {token!r} taken twice (engine bug)")
            fits = [i for i, b in enumerate(self._free) if b.numel() >= room]  # by index: tensors' == is elementwise
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            else:
                if self._free and len(self._free) + len(self._used) >= self.max_buffers:
                    smallest = min(range(len(self._free)), key=lambda i: self._free[i].numel())
                    del self._free[smallest]  # its memory goes back
                buf = _aligned(room)
                self.allocated += 1
            self._used[token] = buf
        return buf[phase:phase + nbytes].view(dtype).view(tuple(int(s) for s in shape))

    def give_back(self, token: Hashable) -> None:
        """The writer is done with `token`'s bytes: its buffer may be reused. Tokens never taken are ignored
        (tensors copied through, empty ones)."""
        with self._lock:
            buf = self._used.pop(token, None)
            if buf is not None:
                self._free.append(buf)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free) + sum(b.numel() for b in self._used.values())
