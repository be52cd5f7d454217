"""Stable seeds derived from (global seed, tensor name, extra parts).

Python's hash() is salted per process, so we hash with blake2b: the same tensor gets the same random sketch
whatever the order of tensors, the process or the rank that handles it. content_order puts the T models' copies
of one tensor in an order that depends on their contents only, so a merge that sums over models can add them in
the same order however the caller listed them.
"""
import hashlib
from collections import abc
from typing import List, Sequence

import torch


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from a global seed and any printable parts (tensor name, task index, ...)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(seed)).encode())
    for p in parts:
        h.update(b"\x00")
        h.update(str(p).encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def generator(seed: int, *parts) -> torch.Generator:
    """A CPU torch.Generator seeded from derive_seed(seed, *parts)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *parts))
    return g


SAMPLE = 4096  # entries of each tensor hashed for content_order


def _digest(x: torch.Tensor) -> bytes:
    flat = x.detach().reshape(-1)
    return hashlib.blake2b(flat.contiguous().view(torch.uint8).cpu().numpy().tobytes(), digest_size=16).digest()


def content_order(tensors: Sequence[torch.Tensor]) -> List[int]:
    """Indices that sort same-shape tensors by their contents: the same sequence of tensors whatever order
    they are given in.

    Key: a hash of SAMPLE evenly spaced entries (cheap: 16 KB read per tensor, not the tensor). Tensors whose
    samples tie are compared in full: equal ones may go in either order (they are the same numbers); different
    ones are keyed by a hash of all their bytes (one extra read, only then)."""
    n = tensors[0].numel()
    step = max(1, n // SAMPLE)
    keys = [_digest(t.reshape(-1)[::step]) for t in tensors]  # reads one tensor at a time
    if len(set(keys)) < len(keys):
        keys = [key + _digest(t) for key, t in zip(keys, tensors)]
    return sorted(range(len(tensors)), key=keys.__getitem__)


class _Permuted(abc.Sequence):
    """seq[order[i]] at index i, read from `seq` on each access (nothing is gathered)."""

    def __init__(self, seq: Sequence, order: Sequence[int]):
        self.seq, self.order = seq, list(order)

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return _Permuted(self.seq, self.order[i])
        return self.seq[self.order[i]]


def in_content_order(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The tensors in content_order: a list for a list or tuple (already in memory), else a view that reads each
    one from `tensors` when it is used, e.g. the engine's LazyDeviceInputs, which copies an input to the device
    on every read and must never have more than two of them alive at once. The keys are computed one tensor at
    a time either way."""
    order = content_order(tensors)
    if isinstance(tensors, (list, tuple)):
        return [tensors[i] for i in order]
    return _Permuted(tensors, order)
