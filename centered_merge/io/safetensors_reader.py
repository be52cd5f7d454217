"""A single .safetensors file, read tensor by tensor: views of a memory map guarded by a file lease, or pread.

A memory-mapped file that shrinks while it is read (another process truncates or rewrites it) kills the reader
with SIGBUS, which no Python code can catch; the safetensors library's own `safe_open` maps files unguarded. So:
- where the kernel grants a read lease on the file (Linux fcntl F_SETLEASE: our own files, or root; a local file
  system), the file is mapped (MAP_PRIVATE) and `get` returns zero-copy views. While the lease is held, another
  process that opens the file for writing or truncates it is made to wait (up to /proc/sys/fs/lease-break-time,
  45 s by default) and the lease is marked as breaking; `get` and `check_unchanged` see that and raise a
  MergeInputError naming the file and tensor, so the merge stops before the file changes under its views.
- otherwise (no lease: a file of another user, NFS, another OS), tensors are read with pread into memory the
  tensor owns: a shrinking file is then a short read or a changed fstat, reported the same way.
Measured (docs/engine.md, "Reading at the floor"): from a warm page cache the views are 4.5x faster than pread +
the same scan and cost no anonymous memory; from a cold cache both run at disk speed.

The format is simple enough that parsing it here is safer than trusting a library to reject every hostile header
with a catchable error: 8 bytes of little-endian header length, a UTF-8 JSON object of
{name: {dtype, shape, data_offsets: [begin, end]}} plus an optional "__metadata__" map of strings, then the data.
`parse_header` checks every field (types, ranges, overlaps, sizes) before any tensor is read, so a read can never
go outside the file and every error is one line naming the file and, where there is one, the tensor.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import MergeInputError
from .base import DuplicateKeyError, FileGuard, TensorInfo, TensorSource, object_without_duplicates

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
PAGE = mmap.PAGESIZE
MAX_DIM = 2**62  # torch sizes are int64; a 0-sized tensor could otherwise carry an absurd dimension

# dtype strings of the safetensors format -> torch dtypes (those this torch has)
DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
# strings the format defines that this torch cannot hold (sub-byte floats): named in the message, not "unknown"
KNOWN_UNSUPPORTED = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class _Entry:
    __slots__ = ("info", "begin", "end")

    def __init__(self, info: TensorInfo, begin: int, end: int):
        self.info, self.begin, self.end = info, begin, end


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def _nonneg_int(x) -> bool:
    return type(x) is int and x >= 0  # not bool, not float


def parse_header(raw: bytes, data_len: int, where: str) -> Tuple[Dict[str, _Entry], Dict[str, str]]:
    """The tensors ({name: _Entry}, in file order) and metadata of a header, or MergeInputError naming `where`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeInputError(f"{where}: corrupt safetensors header (not UTF-8 at byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=object_without_duplicates, parse_constant=_refuse_constant)
    except DuplicateKeyError as e:
        raise MergeInputError(f"{where}: corrupt safetensors header (key {e.key!r} appears twice)") from None
    except RecursionError:
        raise MergeInputError(f"{where}: corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and int strings longer than Python's limit
        raise MergeInputError(f"{where}: corrupt safetensors header (not JSON: {str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise MergeInputError(f"{where}: corrupt safetensors header (a JSON {type(header).__name__}, "
                              "not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise MergeInputError(f"{where}: corrupt safetensors header ('__metadata__' must map strings to strings; "
                              "it is reserved and cannot name a tensor)")
    entries: Dict[str, _Entry] = {}
    for name, e in header.items():
        bad = f"{where}: corrupt safetensors header: tensor {name!r}"
        if not isinstance(e, dict):
            raise MergeInputError(f"{bad} is a JSON {type(e).__name__}, not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
        if missing:
            raise MergeInputError(f"{bad} has no {missing[0]!r}")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str):
            raise MergeInputError(f"{bad}: dtype {dt!r} is not a string")
        if dt not in DTYPES:
            why = "which this torch cannot hold" if dt in KNOWN_UNSUPPORTED else "an unknown dtype"
            raise MergeInputError(f"{where}: tensor {name!r} has dtype {dt[:40]!r}, {why}")
        if not (isinstance(shape, list) and all(_nonneg_int(s) and s < MAX_DIM for s in shape)):
            raise MergeInputError(f"{bad}: shape {str(shape)[:60]} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_nonneg_int(o) for o in offs)):
            raise MergeInputError(f"{bad}: data_offsets {str(offs)[:60]} are not two non-negative integers")
        begin, end = offs
        if begin > end:
            raise MergeInputError(f"{bad}: data_offsets [{begin}, {end}] end before they begin")
        if end > data_len:
            raise MergeInputError(f"{where}: truncated or corrupt: tensor {name!r} needs bytes {begin}..{end} of the "
                                  f"data section but the file holds only {data_len}")
        dtype = DTYPES[dt]
        numel = 1
        for s in shape:
            numel *= s
        if numel * _itemsize(dtype) != end - begin:
            raise MergeInputError(f"{bad}: shape {shape} of {dt} needs {numel * _itemsize(dtype)} bytes but "
                                  f"data_offsets [{begin}, {end}] hold {end - begin}")
        entries[name] = _Entry(TensorInfo(tuple(shape), dtype), begin, end)
    ordered = sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    prev_name, prev_end = None, 0
    for name, e in ordered:
        if e.end > e.begin:  # empty tensors take no bytes and cannot overlap anything
            if e.begin < prev_end:
                raise MergeInputError(f"{where}: corrupt safetensors header: tensor {name!r} (bytes {e.begin}..{e.end})"
                                      f" overlaps tensor {prev_name!r} (ending at {prev_end})")
            prev_name, prev_end = name, e.end
    return dict(ordered), metadata


class SafetensorsFile(TensorSource):
    """One .safetensors file. `get` returns a view of the leased map (`mode == "map"`), or a tensor that owns
    its memory read with pread (`mode == "pread"`); `read_into` always preads into a caller's buffer (reused,
    pinned, or a byte range of a tensor). mode="auto" maps where a lease is granted."""

    def __init__(self, path, label: str | None = None, mode: str = "auto"):
        if mode not in ("auto", "map", "pread"):
            raise ValueError(f"mode must be auto, map or pread; got {mode!r}")
        self.path = Path(path)
        self.label = label or str(self.path)
        self.config_dir = None
        self._map = None
        self._guard = FileGuard(self.path)
        self._fd: Optional[int] = self._guard.fd
        try:
            size = self._guard.size
            raw = self._pread(0, 8)
            if len(raw) < 8:
                raise MergeInputError(f"{self.path}: not a safetensors file (only {size} bytes; truncated?)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise MergeInputError(f"{self.path}: not a safetensors file or truncated (header length {n} "
                                      f"does not fit in a file of {size} bytes)")
            raw = self._pread(8, n)
            if len(raw) < n:
                raise MergeInputError(f"{self.path}: truncated while its header was read")
            self._entries, self.metadata = parse_header(raw, size - 8 - n, str(self.path))
            self._data_start = 8 + n
            self._size = size
            if mode != "pread":
                if not self._guard.take_lease() and mode == "map":
                    raise MergeInputError(f"{self.path}: cannot take a read lease on it, so it cannot be mapped "
                                          "safely (use mode='pread')")
            if self._guard.leased:
                # MAP_PRIVATE (ACCESS_COPY): a write into a view copies the page, never reaches the file
                self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        except BaseException:
            self.close()
            raise

    # --- reading ------------------------------------------------------------------------------------------------
    def _pread(self, offset: int, n: int) -> bytes:
        try:
            return os.pread(self._fd, n, offset)
        except OSError as e:
            raise MergeInputError(f"{self.path}: cannot read ({e.strerror or e})") from None

    def _fill(self, mv: memoryview, offset: int, key: str) -> None:
        """Fill `mv` from file offset `offset`, to the last byte, or raise naming the file and tensor."""
        if self._fd is None:
            raise MergeInputError(f"{self.path}: read of tensor {key!r} after the file was closed")
        got, n = 0, len(mv)
        while got < n:
            try:
                k = os.preadv(self._fd, [mv[got:]], offset + got)
            except OSError as e:
                raise MergeInputError(f"{self.path}: cannot read tensor {key!r} ({e.strerror or e})") from None
            if k == 0:
                raise MergeInputError(f"{self.path}: truncated while being read (tensor {key!r}: {got} of {n} bytes "
                                      f"at offset {offset}; the file had {self._size} bytes when opened)")
            got += k
        self.check_unchanged(key)

    def check_unchanged(self, key: Optional[str] = None) -> None:
        """Raise if the file was truncated, grown, rewritten or replaced in place since it was opened, or (leased)
        another process is about to write it. Called before every view and after every read."""
        self._guard.check(key)

    def read_into(self, key: str, out: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Read bytes [offset, offset + out.nbytes) of tensor `key`'s data into `out` (a contiguous CPU tensor of
        any dtype: a reused or pinned buffer, or a slice of a larger one) and return `out`."""
        e = self._entry(key)
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("read_into needs a contiguous CPU tensor")
        nbytes = out.numel() * out.element_size()
        if offset < 0 or offset + nbytes > e.end - e.begin:
            raise ValueError(f"read_into: bytes {offset}..{offset + nbytes} are outside tensor {key!r} "
                             f"({e.end - e.begin} bytes)")
        if nbytes:
            self._fill(memoryview(out.view(-1).view(torch.uint8).numpy()), self._data_start + e.begin + offset, key)
        return out

    def get(self, key: str) -> torch.Tensor:
        e = self._entry(key)
        if self._map is not None and e.end > e.begin:
            self.check_unchanged(key)
            # through a memoryview, which the tensor keeps: torch.frombuffer releases its own buffer export, so
            # without one close() would unmap pages that live views (e.g. in an exception's frames) still point to
            view = torch.frombuffer(memoryview(self._map), dtype=torch.uint8, count=e.end - e.begin,
                                    offset=self._data_start + e.begin)
            try:
                return view.view(e.info.dtype).reshape(e.info.shape)
            except RuntimeError:  # data not aligned for its dtype (legal, but no view can be made): copy
                pass
        buf = torch.empty(e.end - e.begin, dtype=torch.uint8)
        if e.end > e.begin:
            self._fill(memoryview(buf.numpy()), self._data_start + e.begin, key)
        return buf.view(e.info.dtype).reshape(e.info.shape)

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise MergeInputError(f"{self.path}: no tensor {key!r}") from None

    # --- the rest of TensorSource -------------------------------------------------------------------------------
    def keys(self) -> List[str]:
        return list(self._entries)  # file order: reading in this order walks the file front to back

    def info(self, key: str) -> TensorInfo:
        return self._entry(key).info

    def file_of(self, key: str) -> str:
        return str(self.path)

    def byte_range(self, key: str) -> Tuple[int, int]:
        """(file offset, length) of the tensor's data: for read-ahead by bytes."""
        e = self._entry(key)
        return self._data_start + e.begin, e.end - e.begin

    def prefetch(self, key: str) -> None:
        """posix_fadvise(WILLNEED) on the tensor's bytes: the kernel starts reading them into the page cache in the
        background, so the later pread copies from memory."""
        if self._fd is None or not hasattr(os, "posix_fadvise"):
            return
        off, n = self.byte_range(key)
        if n:
            try:
                os.posix_fadvise(self._fd, off, n, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # only a hint

    def release(self, key: str) -> None:
        """Drop the map's page-table entries for the whole pages inside the tensor's bytes (madvise DONTNEED).

        Why: each mapped 4 KiB page of an input costs a page-table entry until the map goes; at the end of a merge
        unmapping them all took 0.16-0.19 s for the 4.9 GB of the 4 x 0.5 B set here, serially, and the 700 GB of
        inputs of a 4-model 70 B merge would need ~1.4 GB of page tables (8 bytes per 4 KiB page). Released
        tensor by tensor behind the merge (engine/reader.py), the map holds only the read-ahead window.
        Safe with views still alive (a passthrough tensor waiting for the writer, another key mapping to the same
        bytes): the map is private and never written, so a later access faults the same page-cache page in
        again. Pages shared with a neighbouring tensor are left alone."""
        if self._map is None:
            return
        off, n = self.byte_range(key)
        lo, hi = -(-off // PAGE) * PAGE, (off + n) // PAGE * PAGE
        if hi > lo:
            try:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                pass  # only a hint

    @property
    def mode(self) -> str:
        return "map" if self._map is not None else "pread"

    def close(self) -> None:
        """Close the file. Views already handed out stay readable, but are no longer guarded by the lease."""
        m, self._map = self._map, None
        if m is not None:
            try:
                m.close()
            except BufferError:  # views still alive: the map goes when they do
                pass
        self._fd = None
        self._guard.close()
