"""Seeded fuzzing of safetensors headers through the reader.

Valid files are mutated (bytes of the header flipped, inserted, deleted; JSON values replaced by other types and
extreme numbers; offsets shifted; entries dropped, duplicated or renamed to __metadata__; the length field and
the data section cut). Every variant must either open and read back exactly the bytes its header names, or be
refused with a MergeInputError: no other exception, no read outside the file.
"""
import json
import os
import random
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from centered_merge.errors import MergeInputError
from centered_merge.io import SafetensorsFile

VARIANTS = 8000
NASTY = [-1, 0, 1, 7, 8, 2**31, 2**32 - 1, 2**63, 2**64 + 5, 10**30, -(2**63), 0.5, 1e308, float("inf"), True, None,
         "", "F32", "8", [], [0], [0, 0], [1, 2, 3], {}, {"dtype": "F32"}]


def seeds():
    g = torch.Generator().manual_seed(0)
    return [
        save({"a": torch.randn(3, 4, generator=g), "b": torch.zeros(5, dtype=torch.float16),
              "c": torch.arange(4, dtype=torch.int64)}, metadata={"format": "pt"}),
        save({"w": torch.randn(2, 2, generator=g).to(torch.bfloat16), "e": torch.zeros(0, 3),
              "m": torch.ones(7, dtype=torch.bool)}),
        save({"x": torch.randn(16, generator=g, dtype=torch.float64)}),
    ]


def split(blob: bytes):
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8:8 + n], blob[8 + n:]


def mutate_json(header: dict, rnd: random.Random) -> bytes:
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    op = rnd.randrange(9)
    name = rnd.choice(names)
    if op == 0:  # a field replaced by something nasty
        field = rnd.choice(["dtype", "shape", "data_offsets"])
        h[name][field] = rnd.choice(NASTY)
    elif op == 1:  # one offset or dimension changed to a nasty number
        field = rnd.choice(["shape", "data_offsets"])
        if h[name][field]:
            i = rnd.randrange(len(h[name][field]))
            h[name][field][i] = rnd.choice(NASTY) if rnd.random() < 0.5 else h[name][field][i] + rnd.randint(-9, 9)
    elif op == 2:  # an entry shifted onto its neighbour
        other = rnd.choice(names)
        h[name]["data_offsets"] = list(h[other]["data_offsets"])
    elif op == 3:
        del h[name][rnd.choice(["dtype", "shape", "data_offsets"])]
    elif op == 4:
        h["__metadata__"] = h.pop(name) if rnd.random() < 0.5 else rnd.choice(NASTY)
    elif op == 5:
        h[name]["dtype"] = rnd.choice(["F8_E4M3", "F4", "I4", "c64", "BF16", "U64", "F8_E8M0", "Q8", "F16 "])
    elif op == 6:
        h[name] = rnd.choice(NASTY)
    elif op == 7:
        h[name]["shape"] = [rnd.randint(0, 5) for _ in range(rnd.randint(0, 4))]
    else:
        return json.dumps(rnd.choice(NASTY)).encode()
    text = json.dumps(h)
    if rnd.random() < 0.1:  # a duplicated key, which json.dumps cannot produce
        i = text.index("{") + 1
        text = text[:i] + json.dumps(name) + ": 1, " + text[i:]
    return text.encode()


def mutate_bytes(hb: bytes, rnd: random.Random) -> bytes:
    b = bytearray(hb)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(4)
        i = rnd.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rnd.randrange(256)
        elif op == 1:
            b[i:i] = bytes([rnd.choice(b'{}[]",:0123456789-e.\\ \x00\xff')])
        elif op == 2:
            del b[i:i + rnd.randint(1, 8)]
        else:
            b = b[:i]
    return bytes(b)


def variant(blob: bytes, rnd: random.Random) -> bytes:
    hb, data = split(blob)
    kind = rnd.random()
    if kind < 0.45:
        hb = mutate_json(json.loads(hb), rnd)
    elif kind < 0.85:
        hb = mutate_bytes(hb, rnd)
    length = len(hb)
    r = rnd.random()
    if r < 0.08:
        length = rnd.choice([0, 1, length - 1, length + 1, length + len(data), 2**64 - 1, 2**40, 100 * 2**20 + 1])
    elif r < 0.16:
        data = data[:rnd.randrange(len(data) + 1)]
    elif r < 0.2:
        data = data + bytes(rnd.randrange(64))
    return struct.pack("<Q", length % 2**64) + hb + data


def check_reads(src: SafetensorsFile, raw: bytes):
    """What an accepted file reads back is the bytes its header names, inside the file."""
    buf = torch.empty(256, dtype=torch.uint8)
    for k in src.keys():
        off, n = src.byte_range(k)
        assert 0 <= off and off + n <= len(raw)
        got = src.get(k)
        info = src.info(k)
        assert tuple(got.shape) == info.shape and got.dtype == info.dtype
        assert got.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == raw[off:off + n]
        if 0 < n <= 256:
            assert src.read_into(k, buf[:n]).numpy().tobytes() == raw[off:off + n]


@pytest.mark.parametrize("seed,mode", [(1, "auto"), (2, "pread")])
def test_fuzzed_headers_only_raise_merge_input_error(tmp_path, seed, mode):
    rnd = random.Random(seed)
    blobs = seeds()
    # in memory (tmpfs) where there is one: thousands of small files need no disk
    shm = Path("/dev/shm")
    d = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    try:
        _fuzz(rnd, blobs, d / "f.safetensors", seed, mode)
    finally:
        if d != tmp_path:
            shutil.rmtree(d, ignore_errors=True)


def _fuzz(rnd, blobs, p, seed, mode):
    outcomes = {"accepted": 0, "refused": 0}
    for i in range(VARIANTS // 2):
        raw = variant(rnd.choice(blobs), rnd)
        p.unlink(missing_ok=True)  # a new file each time: truncating one makes ext4 flush it on close (slow)
        p.write_bytes(raw)
        try:
            src = SafetensorsFile(p, mode=mode)
        except MergeInputError as e:
            msg = str(e)
            assert str(p) in msg and "\n" not in msg, msg
            outcomes["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001  (the point of the test)
            pytest.fail(f"variant {i} (seed {seed}): {type(e).__name__}: {e}\nheader+data: {raw[:300]!r}")
        try:
            check_reads(src, raw)
        except MergeInputError:
            pass
        finally:
            src.close()
        outcomes["accepted"] += 1
    # the mutations must exercise both sides, or the test proves nothing
    assert outcomes["refused"] > VARIANTS // 4 and outcomes["accepted"] > 20, outcomes
