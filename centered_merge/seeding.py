"""Stable seeds derived from (global seed, tensor name, extra parts).

Python's hash() is salted per process, so we hash with blake2b: the same tensor gets the same random sketch
whatever the order of tensors, the process or the rank that handles it.
"""
import hashlib

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
