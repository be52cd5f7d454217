"""The writer's direct I/O (io/direct.py): how a tensor's bytes are split (buffered head and tail, direct whole
blocks, staged when the memory is unaligned), the fall-back to buffered writes, and merges writing the same bytes
with and without it."""
import errno
import os

import pytest
import torch

import centered_merge.io.direct as direct
from centered_merge.engine import merge_checkpoints
from centered_merge.engine.buffers import OutputPool
from centered_merge.io.direct import BLOCK, DirectWrites

from _engine_util import save_models, tree_bytes


def _aligned_bytes(n, shift=0, seed=0):
    """n random bytes at a memory address `shift` bytes past a BLOCK boundary: (memoryview, address, keep-alive)."""
    raw = torch.empty(n + shift + BLOCK, dtype=torch.uint8)
    pad = (-raw.data_ptr()) % BLOCK + shift
    t = raw[pad:pad + n]
    t.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    assert n == 0 or (t.data_ptr() - shift) % BLOCK == 0
    return memoryview(t.numpy()).cast("B"), t.data_ptr(), t


class _Recorder:
    """Stands in for direct.pwrite_all: records (which descriptor, offset, length, memory alignment) and writes
    through the buffered descriptor, so the split can be checked on any file system; the direct descriptor is a
    second plain descriptor of the same file."""

    def __init__(self, monkeypatch, fail_direct=False):
        self.calls, self.direct_fds, self.fail_direct = [], set(), fail_direct
        real_open = os.open

        def open_plain(path):
            fd = real_open(path, os.O_WRONLY)
            self.direct_fds.add(fd)
            return fd

        real_pwrite_all = direct.pwrite_all

        def pwrite_all(fd, data, offset):
            is_direct = fd in self.direct_fds
            if is_direct and self.fail_direct:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            self.calls.append(("direct" if is_direct else "buffered", offset, len(data)))
            real_pwrite_all(fd, data, offset)

        monkeypatch.setattr(direct, "open_direct", open_plain)
        monkeypatch.setattr(direct, "pwrite_all", pwrite_all)


def _write(tmp_path, pieces, file_size):
    """Write (offset, memoryview, address) pieces through DirectWrites; returns the file's bytes and the writer."""
    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    dw = DirectWrites()
    try:
        dw.open(0, path)
        cached = [dw.write(0, fd, mv, addr, off) for off, mv, addr in pieces]
    finally:
        dw.close()
        os.ftruncate(fd, file_size)
        os.close(fd)
    return path.read_bytes(), dw, cached


@pytest.mark.parametrize("offset", [0, 1, BLOCK - 1, BLOCK, 3 * BLOCK + 17])
@pytest.mark.parametrize("n", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK, 5 * BLOCK + 333])
@pytest.mark.parametrize("shift", [0, 64])
def test_split_into_head_blocks_tail(tmp_path, monkeypatch, offset, n, shift):
    rec = _Recorder(monkeypatch)
    mv, addr, keep = _aligned_bytes(n, shift)
    data, dw, (cached,) = _write(tmp_path, [(offset, mv, addr)], offset + n)
    assert data[offset:] == bytes(mv) and data[:offset] == bytes(offset)
    head = min((-offset) % BLOCK, n)
    body = (n - head) // BLOCK * BLOCK
    direct_calls = [c for c in rec.calls if c[0] == "direct"]
    if body:
        assert sum(c[2] for c in direct_calls) == body == dw.direct_bytes
        for _, off, ln in direct_calls:  # whole blocks at block offsets only
            assert off % BLOCK == 0 and ln % BLOCK == 0
    else:
        assert direct_calls == [] and dw.direct_bytes == 0
    assert sum(ln for _, ln in cached) == n - body  # the buffered ranges, for the writer's writeback hints
    for off, ln in cached:
        assert off >= offset and off + ln <= offset + n


def test_unaligned_memory_goes_through_the_staging_buffer(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    monkeypatch.setattr(direct, "STAGE_BYTES", 2 * BLOCK)
    mv, addr, keep = _aligned_bytes(7 * BLOCK, shift=8)
    data, dw, _ = _write(tmp_path, [(0, mv, addr)], 7 * BLOCK)
    assert data == bytes(mv)
    assert [c[2] for c in rec.calls if c[0] == "direct"] == [2 * BLOCK, 2 * BLOCK, 2 * BLOCK, BLOCK]


def test_einval_falls_back_to_buffered_writes_for_that_file(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch, fail_direct=True)
    a, aa, ka = _aligned_bytes(3 * BLOCK, seed=1)
    b, ab, kb = _aligned_bytes(2 * BLOCK + 5, seed=2)
    data, dw, cached = _write(tmp_path, [(0, a, aa), (3 * BLOCK, b, ab)], 5 * BLOCK + 5)
    assert data == bytes(a) + bytes(b)
    assert dw.direct_bytes == 0 and all(kind == "buffered" for kind, _, _ in rec.calls)
    assert cached == [[(0, 3 * BLOCK)], [(3 * BLOCK, 2 * BLOCK + 5)]]


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    _Recorder(monkeypatch)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(direct, "pwrite_all", full)
    mv, addr, keep = _aligned_bytes(2 * BLOCK)
    with pytest.raises(OSError) as e:
        _write(tmp_path, [(0, mv, addr)], 2 * BLOCK)
    assert e.value.errno == errno.ENOSPC


def _direct_io_works(path):
    fd = direct.open_direct(path)
    if fd is None:
        return False
    os.close(fd)
    return True


def test_real_direct_io_where_the_file_system_has_it(tmp_path):
    """No stand-ins: O_DIRECT on tmp_path's file system, aligned and staged, neighbours sharing blocks."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    if not _direct_io_works(probe):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT (the writer then writes buffered)")
    pieces, keep, off, expect = [], [], 0, b""
    for i, (n, shift) in enumerate([(BLOCK * 3 + 100, 0), (BLOCK * 2, 0), (5000, 64), (direct.STAGE_BYTES + BLOCK, 8),
                                    (1, 0), (BLOCK * 4, 0)]):
        mv, addr, k = _aligned_bytes(n, shift, seed=i)
        pieces.append((off, mv, addr))
        keep.append(k)
        expect += bytes(mv)
        off += n
    data, dw, _ = _write(tmp_path, pieces[::2] + pieces[1::2], off)  # out of order, as ranks write
    assert data == expect and dw.direct_bytes > 0


def test_pool_views_start_at_their_file_phase():
    """A view sits at the address that its file offset has modulo BLOCK, so its whole blocks go direct, no copy;
    a buffer given back is reused at another phase."""
    pool = OutputPool(4)
    for i, (shape, dtype, at) in enumerate([((3,), torch.float32, 0), ((1000, 7), torch.bfloat16, 8 + BLOCK * 3),
                                           ((1 << 20,), torch.uint8, 4093), ((5,), torch.float32, 4092)]):
        t = pool.take(f"t{i}", shape, dtype, phase=at)
        assert t.data_ptr() % BLOCK == at % BLOCK and t.shape == shape and t.is_contiguous()
        pool.give_back(f"t{i}")
    assert pool.allocated == 3  # a new one for each larger size; the last view reused the smallest


@pytest.mark.parametrize("method", ["weight_average", "task_arithmetic", "ties"])
def test_merge_writes_the_same_bytes_with_and_without_direct_io(tmp_path, monkeypatch, method):
    g = torch.Generator().manual_seed(5)
    shapes = {"a.weight": (128, 64), "b.bias": (37,), "c.weight": (96, 100), "d.weight": (64, 64), "e.norm": (3,)}
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    models = [{k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
              for _ in range(3)]
    base_path, paths = save_models(tmp_path, base, models)
    kw = {} if method == "weight_average" else {"base": base_path}
    bodies = []
    real_body = DirectWrites._write_body

    def counting(self, dfd, data, address, offset):
        bodies.append(len(data))
        return real_body(self, dfd, data, address, offset)

    monkeypatch.setattr(DirectWrites, "_write_body", counting)
    merge_checkpoints(paths, tmp_path / "direct", method=method, progress=False, **kw)
    if _direct_io_works(tmp_path / "base.safetensors"):
        assert sum(bodies) > 0  # the whole blocks of the larger tensors went past the cache
    monkeypatch.setattr(direct, "open_direct", lambda path: None)
    merge_checkpoints(paths, tmp_path / "buffered", method=method, progress=False, **kw)
    assert tree_bytes(tmp_path / "direct") == tree_bytes(tmp_path / "buffered")
