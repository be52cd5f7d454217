"""The output side of the engine: one writer for an HF-style directory, made visible only when complete.

Layout (io/layout.py): model.safetensors (one shard) or model-0000i-of-0000N.safetensors +
model.safetensors.index.json, config.json / generation and tokenizer files copied from a reference model, and a
README.md card.

One writer for every case: each tensor's bytes go to their planned offset with pwrite (with fsync on, the whole
4096-byte blocks among them with O_DIRECT, past the page cache: io/direct.py), so the order of writes does not
matter and several processes (torch.distributed ranks) can write one output together; a single process
is a world of one rank. Writes run on a background thread (a bounded queue of `queue_depth` tensors, so memory
stays bounded); errors of the thread surface at the next write or at finish.

Atomicity and resume: everything goes to a hidden sibling directory `.NAME.partial`; only a complete output is
renamed to NAME. After a tensor's bytes are written (and fsynced), a line naming it, its offset, length and a
checksum (xxh3-64) of its bytes is appended to this rank's journal in the partial directory and fsynced: only
then does the tensor count as done. The partial directory also keeps a fingerprint of the request. If the process is killed
(SIGKILL, OOM, power loss), the same request later finds the partial directory, checks the fingerprint and the
journal's checksums against the bytes on disk, and writes only what is missing. A failure the process sees
(a bad input, a full disk, Ctrl-C) removes the partial directory, so nothing at NAME ever looks finished.

Durability: shards, index, config, card and copied files are fsynced, and so are the partial directory before
the rename and the parent directory after it. Files and directories are created with the process's umask.
"""
from __future__ import annotations

import errno
import json
import math
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
import xxhash

from ..distributed import RankContext
from ..errors import MergeConfigError, MergeError, MergeOutputError
from .base import TensorInfo
from .direct import DirectWrites, pwrite_all
from .layout import INDEX_NAME, ST_DTYPE, ShardLayout, plan_shards  # noqa: F401  (re-exported)
from .model_files import COPY_FILES, copy_model_files  # noqa: F401  (the side files: io/model_files.py)


REQUEST_FILE = ".centered_merge-request.json"  # in the partial directory only; removed before publishing
JOURNAL_PREFIX = ".centered_merge-journal"
SYNC_BYTES = 256 << 20  # a journal batch: at most this many bytes written ...
SYNC_SECONDS = 2.0  # ... or this much time since the batch began
SYNC_AHEAD = 2  # batches written and waiting for their sync (on the syncer thread) at most

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.I)


def parse_size(text) -> int:
    """'5GB' -> 5*10**9, '500MiB' -> 500*2**20, '1e9' or 1000 -> bytes. Refuses 0, negative, inf, NaN, garbage."""
    if isinstance(text, bool):
        raise MergeConfigError(f"shard size {text!r} is not a size (examples: 5GB, 500MB, 2GiB)")
    if isinstance(text, (int, float)):
        n = float(text)
    else:
        s = str(text)
        m = _SIZE.match(s)
        if m:
            num, unit, binary = m.groups()
            n = float(num) * (1024 if binary else 1000) ** " kmgt".index(unit.lower() or " ")
        else:
            try:
                n = float(s)
            except ValueError:
                raise MergeConfigError(f"shard size {text!r} is not a size (examples: 5GB, 500MB, 2GiB)") from None
    if not math.isfinite(n):
        raise MergeConfigError(f"shard size must be a finite number of bytes; got {text!r}")
    if int(n) <= 0:
        raise MergeConfigError(f"shard size must be positive; got {text!r}")
    return int(n)


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output_path(out_dir, overwrite: bool, inputs: Iterable[Union[str, Path]] = ()) -> Path:
    """Refuse an output that cannot or must not be replaced; called before any work and again at the end.

    Refused always: the current directory or one above it, a mount point, a regular file or other non-directory
    (--overwrite replaces directories only), a path that holds one of the merge's `inputs` (files or
    directories), a path inside an input directory. Refused without `overwrite`: a non-empty directory.
    """
    out = Path(out_dir)
    if str(out_dir) == "" or out.name in ("", ".", ".."):
        raise MergeOutputError(f"{out_dir!s}: give the output a directory name of its own (not '.', '..' or /)")
    real = Path(os.path.realpath(out))
    cwd = Path(os.path.realpath(os.getcwd()))
    if _within(cwd, real):
        raise MergeOutputError(f"{out}: the output would replace the current directory (or one above it)")
    for inp in inputs:
        ip = Path(os.path.realpath(inp))
        if _within(ip, real):
            raise MergeOutputError(f"{out}: the output path holds the merge's input {inp}; a merge never "
                                   "replaces its own inputs (not even with --overwrite)")
        if ip.is_dir() and _within(real, ip):
            raise MergeOutputError(f"{out}: the output path is inside the input directory {inp}; write it elsewhere")
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and os.path.ismount(out):
            raise MergeOutputError(f"{out}: is a mount point and cannot be replaced; give a directory inside it")
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            return out
        if not out.is_dir() and not out.is_symlink():
            raise MergeOutputError(f"{out}: output path exists and is not a directory; --overwrite replaces "
                                   "directories only: remove the file or pick another output path")
        if not overwrite:
            raise MergeOutputError(f"{out}: output directory is not empty; pass --overwrite (API: overwrite=True) "
                                   "to replace it")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:  # missing parents are created later
        parent = parent.parent
    if not parent.is_dir():
        raise MergeOutputError(f"{out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise MergeOutputError(f"{out}: directory {parent} is not writable")
    return out


def partial_dir(out: Path) -> Path:
    """The hidden directory next to `out` where a merge into `out` is built (and resumed)."""
    return out.absolute().parent / f".{out.name}.partial"


def _write_error(out: Path, e: OSError, what: str, fname: str) -> MergeOutputError:
    reason = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file size limit reached"}.get(e.errno, "write error")
    return MergeOutputError(f"{out}: {reason} while writing {what} to {fname} ({e.strerror or e}); "
                            "nothing was written to the output path")


def _tensor_bytes(t: torch.Tensor) -> Tuple[memoryview, int]:
    """A tensor's bytes as a memoryview, and the memory address of the first one (for direct I/O's alignment)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b""), 0
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    t = t.view(torch.uint8)
    return memoryview(t.numpy()).cast("B"), t.data_ptr()


def advise_dontneed(fd: int, offset: int, length: int) -> None:
    """posix_fadvise(DONTNEED) on [offset, offset + length) of `fd`; only a hint, errors are ignored (the fsync
    that follows reports any real write error). On Linux it does two things, both used by the writer:
    - right after a range is written, it starts that range's writeback now (WB_SYNC_NONE) without waiting for it,
      so a later fsync finds it done or under way (Python has no sync_file_range);
    - once the range is on disk (after fdatasync), it drops its now-clean pages from the page cache. The next
      writes then get pages just freed instead of fresh ones: on this project's VM, pwrite of 1 GB into fresh
      page-cache pages took 0.9-2.9 CPU-s (2.2-2.9 in five runs of six), into pages freed this way 0.30-0.33
      CPU-s (docs/engine.md, "The linear merges' overheads, one at a time", item 4); and the output, which the
      merge does not read again, does not push the inputs' pages out of the cache."""
    if length > 0 and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str, fsync: bool) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def production_order(names: Sequence[str], info: Dict[str, TensorInfo]) -> List[str]:
    """The order the writer wants its tensors in: the layout's (each input file is then read front to back),
    except that a final tensor larger than the average comes first. The last tensor's write is the one thing
    nothing overlaps (every other write overlaps the next tensor's merge); in HF layouts that tensor is often
    lm_head, one of the largest (125 MiB of 1.08 GB in the benchmark's Llama shapes: ~0.1 s of writing after the
    merge is done), and a small one (a norm) then ends the merge instead. Where the writes set the pace, the merge
    of a first large tensor is time the disk waits, but the elementwise merges hand large tensors over in pieces
    (engine/pipeline.py), so the writes start after the first piece."""
    names = list(names)
    if len(names) > 1:
        sizes = [info[n].nbytes for n in names]
        if sizes[-1] * len(sizes) > sum(sizes):
            names.insert(0, names.pop())
    return names


def checksum(data) -> int:
    """The journal's checksum of a tensor's bytes: xxh3-64 (the xxhash library), 15.7 GB/s on this project's
    machine against 2.7 GB/s for zlib's CRC-32, which the journal used before 2026-12-01 (docs/engine.md). Not
    cryptographic: it catches bytes that changed on disk (a torn or lost write, another process), not an
    attacker."""
    return xxhash.xxh3_64_intdigest(data)


class Journal:
    """This rank's record of finished tensors: one JSON line each (name, shard, offset, length, xxh3_64), fsynced.
    Lines of older journals (a "crc32" field) do not count: those tensors are written again."""

    def __init__(self, path: Path, fsync: bool):
        self.path, self.fsync = path, fsync
        self._fd: Optional[int] = None

    def load(self, layout: ShardLayout, fds: Dict[int, int]) -> Set[str]:
        """Names whose journal line matches the layout and whose bytes on disk still have the recorded checksum."""
        done: Set[str] = set()
        try:
            lines = self.path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return done
        for raw in lines:
            try:
                e = json.loads(raw)
                slot = layout.slots[e["name"]]
                if (e["shard"], e["offset"], e["length"]) != (slot.shard, slot.offset, slot.length):
                    continue
                data = os.pread(fds[slot.shard], slot.length, slot.offset) if slot.length else b""
                if len(data) == slot.length and checksum(data) == e["xxh3_64"]:
                    done.add(e["name"])
            except (ValueError, KeyError, TypeError, OSError):
                continue  # a torn last line (killed mid-append) or a stale entry: that tensor is written again
        return done

    def record(self, entries: Sequence[Tuple[str, int, int, int, int]]) -> None:
        """Append (name, shard, offset, length, checksum) lines, one write, then fsync: those tensors are done."""
        if not entries:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        lines = "".join(json.dumps({"name": n, "shard": s, "offset": o, "length": ln, "xxh3_64": c},
                                   separators=(",", ":")) + "\n" for n, s, o, ln, c in entries)
        os.write(self._fd, lines.encode())
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ShardedWriter:
    """Writes the planned tensors of this rank into the partial directory; `commit` publishes.

    items: (name, TensorInfo) of every output tensor (or a ShardLayout). ctx: this process's place in a group
    (default: a world of one). owner: name -> rank (default: every tensor is this rank's). fingerprint: a JSON-able
    description of the request; given (and resume=True), a partial directory left by an earlier run of the same
    request is continued, and a different one is discarded with the reason passed to `note`. After construction
    `order` lists the tensors this rank still has to write, in production_order, and `resumed` how many were already
    written.

    Collectives, in the same order on every rank: construction broadcasts rank 0's set-up (directory, fingerprint,
    whether it resumes) and gathers the ranks' agreement; `finish` gathers (so does `abort` before finish);
    `commit` broadcasts (so does `abort` after finish).
    """

    def __init__(self, out_dir, items: Union[Sequence[Tuple[str, TensorInfo]], ShardLayout], *,
                 shard_size: int = 5 * 10**9, overwrite: bool = False, queue_depth: int = 2, fsync: bool = True,
                 on_written: Optional[Callable[[str, int, int, bool], None]] = None, ctx: Optional[RankContext] = None,
                 owner: Optional[Dict[str, int]] = None, fingerprint=None, resume: bool = True,
                 protect: Sequence[Union[str, Path]] = (), note: Optional[Callable[[str], None]] = None):
        self.ctx = ctx or RankContext.single()
        self.overwrite, self.fsync, self.on_written = overwrite, fsync, on_written
        self.protect = list(protect)
        self.out = check_output_path(out_dir, overwrite, self.protect)
        self.layout = items if isinstance(items, ShardLayout) else ShardLayout(list(items), int(shard_size))
        self.shards, self.shard_names = self.layout.shards, self.layout.names
        self._info = self.layout.info
        mine = [n for n in self.layout.order if owner is None or owner[n] == self.ctx.rank]
        self._fds: Dict[int, int] = {}
        self._direct = DirectWrites()  # the shards' O_DIRECT descriptors (with fsync only; io/direct.py)
        self._stage = "writing"
        self.tmp: Optional[Path] = None
        self.resumed = 0
        self._error: Optional[BaseException] = None
        self._sync_error: Optional[BaseException] = None  # set by the syncer thread
        self._thread: Optional[threading.Thread] = None
        self.journal: Optional[Journal] = None
        digest = json.dumps([str(self.out.absolute()), self.layout.digest(), fingerprint, self.ctx.world],
                            sort_keys=True, default=str)
        setup = None
        if self.ctx.rank == 0:
            try:
                setup = (str(self._prepare(digest, fingerprint is not None and resume, note)), digest)
            except (OSError, MergeOutputError) as e:
                err = e if isinstance(e, MergeOutputError) else MergeOutputError(
                    f"{self.out}: cannot create the partial directory ({e.strerror or e})")
                setup = ("error", str(err))
        made, theirs = self._collective(lambda: self.ctx.broadcast(setup))
        if made == "error":
            self._stage = "done"
            self._cleanup()
            raise MergeOutputError(theirs)
        self.tmp = Path(made)
        same = self._collective(lambda: self.ctx.gather(theirs == digest))
        if not all(same):
            self._stage = "done"
            self._cleanup()
            bad = [r for r, ok in enumerate(same) if not ok]
            raise MergeConfigError(f"{self.out}: rank(s) {bad} were given different arguments from rank 0 (models, "
                                   "method, parameters, output path or shard size); every rank must run the same merge")
        try:
            self.journal = Journal(self.tmp / f"{JOURNAL_PREFIX}.{self.ctx.rank}-of-{self.ctx.world}", fsync)
            for i, fname in enumerate(self.shard_names):
                if any(self.layout.slots[n].shard == i for n in mine):
                    self._fds[i] = os.open(self.tmp / fname, os.O_RDWR | os.O_CREAT, 0o666)
                    if fsync:  # without fsync nothing waits for the disk: buffered writes, which return sooner
                        self._direct.open(i, self.tmp / fname)
            done = self.journal.load(self.layout, self._fds) if fingerprint is not None and resume else set()
        except OSError as e:
            self._stage = "done"
            self._cleanup()
            raise MergeOutputError(f"{self.out}: cannot open the partial output ({e.strerror or e})") from None
        self.order = production_order([n for n in mine if n not in done], self._info)
        self.resumed = len(mine) - len(self.order)
        self._next = 0
        self._piece_at = 0  # bytes of tensor order[_next] handed over so far (write_piece)
        self._q: "queue.Queue" = queue.Queue(maxsize=max(1, queue_depth))
        self._thread = threading.Thread(target=self._run, name="centered_merge-writer", daemon=True)
        self._thread.start()

    # --- set-up (rank 0) -----------------------------------------------------------------------------------
    def _prepare(self, digest: str, resume: bool, note) -> Path:
        """The partial directory, continued when it holds this very request, else made afresh with shard headers."""
        tmp = partial_dir(self.out)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists() or tmp.is_symlink():
            why = self._resumable(tmp, digest) if resume else "--no-resume was given"
            if why is None:
                return tmp
            if note is not None:
                note(f"{self.out}: starting over, discarding the partial output of an earlier run ({why})")
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        os.mkdir(tmp, 0o777)  # the umask applies (tempfile.mkdtemp would make it 0700)
        for fname, head in zip(self.shard_names, self.layout.headers):
            fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                pwrite_all(fd, memoryview(head), 0)
                if self.fsync:
                    os.fsync(fd)
            except OSError as e:
                raise _write_error(self.out, e, "the header", fname) from None
            finally:
                os.close(fd)
        _write_text(tmp / REQUEST_FILE, digest, self.fsync)
        if self.fsync:
            fsync_path(tmp)
            fsync_path(tmp.parent)
        return tmp

    def _resumable(self, tmp: Path, digest: str) -> Optional[str]:
        """None when `tmp` was left by this same request (its shard headers intact), else the reason it is not."""
        try:
            old = (tmp / REQUEST_FILE).read_text()
        except (OSError, UnicodeDecodeError):
            return "it records no request"
        if old != digest:
            return describe_change(old, digest)
        for fname, head, size in zip(self.shard_names, self.layout.headers, self.layout.file_sizes):
            p = tmp / fname
            try:
                with open(p, "rb") as f:
                    if f.read(len(head)) != head or os.fstat(f.fileno()).st_size > size:
                        return f"{fname} does not match the planned layout"
            except OSError:
                return f"{fname} is missing"
        return None

    def _collective(self, call):
        """Run one collective; if it fails (a rank died, a timeout, an interrupt), clean up and say so."""
        try:
            return call()
        except Exception as e:  # noqa: BLE001  (torch.distributed raises RuntimeError and subclasses)
            self._stage = "done"
            self._cleanup()
            raise MergeOutputError(f"{self.out}: lost contact with the other ranks ({type(e).__name__}: {e}); "
                                   "nothing was written to the output path") from e
        except BaseException:
            self._stage = "done"
            self._cleanup()
            raise

    # --- producer side -------------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Hand `tensor`, the next one of `order`, to the writing thread."""
        info = self._info[name]
        if tuple(tensor.shape) != tuple(info.shape) or tensor.dtype != info.dtype:
            raise RuntimeError(f"writer: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, planned "
                               f"{info.shape} {info.dtype} (engine bug)")
        self.write_piece(name, tensor, 0, True)

    def write_piece(self, name: str, piece: torch.Tensor, start: int, last: bool) -> None:
        """Hand the bytes [start, start + piece's bytes) of tensor `name`, the next one of `order`, to the writing
        thread: a tensor may come in pieces, in order, each starting where the one before ended, the last with
        last=True. The tensor counts as written (journal) once its last piece is. on_written(name, start, nbytes,
        last) is called as each piece (or whole tensor: start 0, last) is written, so its memory can be reused. So
        a merge can hand over a large tensor while it is still computing the rest of it (engine/pipeline.py)."""
        self._raise_if_failed()
        expected = self.order[self._next] if self._next < len(self.order) else None
        if name != expected:
            raise RuntimeError(f"writer: got tensor {name!r}, expected {expected!r} (engine bug)")
        info = self._info[name]
        nbytes = piece.numel() * piece.element_size()
        if piece.dtype != info.dtype or start != self._piece_at or start + nbytes > info.nbytes or (
                last and start + nbytes != info.nbytes):
            raise RuntimeError(f"writer: tensor {name!r}: a piece of {nbytes} bytes {piece.dtype} at byte {start} "
                               f"does not continue the {self._piece_at} bytes written of its {info.nbytes} "
                               f"{info.dtype} (engine bug)")
        if last:
            self._next += 1
            self._piece_at = 0
        else:
            self._piece_at = start + nbytes
        while True:
            try:
                self._q.put((name, piece, start, last), timeout=0.2)
                return
            except queue.Full:
                self._raise_if_failed()

    def _raise_if_failed(self):
        if self._error is not None:
            raise self._error

    # --- writer thread (and its syncer) -----------------------------------------------------------------------
    def _run(self):
        # Tensors are journaled in batches: after SYNC_BYTES written or SYNC_SECONDS passed, one fdatasync of the
        # files written to, then one journal append + fsync. A tensor counts as done only once both are on disk;
        # (A sync per tensor made weight averaging wait on the disk per tensor.)
        # The syncs run on a second thread (the syncer), so this one goes on writing the next tensors while the
        # disk takes a batch; at most SYNC_AHEAD batches wait for it, so a kill loses at most SYNC_AHEAD + 1
        # batches. The syncer also starts the writeback of each tensor's range as soon as it is written
        # (advise_dontneed), so a batch's fdatasync mostly finds its pages on their way to the disk already and
        # the last one waits only for the tail; block-layer waits then fall on the syncer, not on this thread.
        name, batch, touched, size, since = None, [], set(), 0, time.monotonic()
        syncs: "queue.Queue" = queue.Queue()  # ("kick", fd, offset, length), ("sync", batch, touched) or None
        self._sync_slots = threading.Semaphore(SYNC_AHEAD)
        syncer = threading.Thread(target=self._run_syncs, args=(syncs,), name="centered_merge-syncer", daemon=True)
        syncer.start()
        try:
            while True:
                try:
                    # A timeout, not a plain get(): a KeyboardInterrupt (Ctrl-C, or SIGTERM via the CLI) raised in
                    # the producer while it is inside the queue's put/wait can lose this thread's wake-up; polling
                    # lets it see an abort (_cleanup sets _error) within 0.2 s instead of waiting forever (seen:
                    # 1 hang in 40 SIGTERMs on a loaded machine).
                    item = self._q.get(timeout=0.2)
                except queue.Empty:
                    if self._error is not None:
                        return
                    continue
                if item is None:  # end (or abort)
                    if self._error is None and batch:
                        self._hand_over(syncs, ("sync", batch, touched))
                    return
                if self._sync_error is not None:  # a failed sync: stop writing
                    raise self._sync_error
                name, tensor, start, last = item
                del item
                slot = self.layout.slots[name]
                fname = self.shard_names[slot.shard]
                buf, address = _tensor_bytes(tensor)
                del tensor
                try:
                    fd = self._fds[slot.shard]
                    cached = self._direct.write(slot.shard, fd, buf, address, slot.offset + start)
                    if self.fsync:
                        for offset, length in cached:
                            syncs.put(("kick", fd, offset, length))
                    # the checksum, streamed over a tensor's pieces (xxh3's streaming form gives checksum()'s digest)
                    if start == 0:
                        hasher = xxhash.xxh3_64()
                    hasher.update(buf)
                    nbytes = len(buf)
                    del buf
                    if last:
                        batch.append((name, slot.shard, slot.offset, slot.length, hasher.intdigest()))
                        touched.add(slot.shard)
                        size += slot.length
                        if size >= SYNC_BYTES or time.monotonic() - since >= SYNC_SECONDS:
                            self._hand_over(syncs, ("sync", batch, touched))
                            batch, touched, size, since = [], set(), 0, time.monotonic()
                except OSError as e:
                    raise _write_error(self.out, e, f"tensor {name!r}", fname) from None
                if self.on_written is not None:
                    self.on_written(name, start, nbytes, last)
        except BaseException as e:  # noqa: BLE001  (handed to the producer)
            self._error = self._error or e
            try:  # drain so a blocked producer wakes up and sees the error
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
        finally:
            syncs.put(None)
            syncer.join()
            if self._sync_error is not None:
                self._error = self._error or self._sync_error

    def _hand_over(self, syncs: "queue.Queue", job) -> None:
        """Queue a batch for the syncer once fewer than SYNC_AHEAD wait; raises if the syncer failed."""
        while not self._sync_slots.acquire(timeout=0.2):
            if self._sync_error is not None:
                raise self._sync_error
        syncs.put(job)

    def _run_syncs(self, syncs: "queue.Queue") -> None:
        while True:
            job = syncs.get()
            if job is None:
                return
            if job[0] == "kick":
                advise_dontneed(*job[1:])
                continue
            _, batch, touched = job
            try:
                if self._sync_error is None and self._error is None:  # else failed or aborted: journal no more
                    self._sync(batch, touched)
            except OSError as e:
                self._sync_error = _write_error(self.out, e, f"tensors up to {batch[-1][0]!r}",
                                                ", ".join(self.shard_names[i] for i in sorted(touched)))
            except BaseException as e:  # noqa: BLE001  (handed to the writer thread)
                self._sync_error = e
            finally:
                self._sync_slots.release()

    def _sync(self, batch, touched) -> None:
        """The batch's bytes to disk, then its journal lines (the order that makes the journal trustworthy); then
        the batch's pages, clean now, are dropped from the page cache (advise_dontneed)."""
        if self.fsync:
            for shard in sorted(touched):
                os.fdatasync(self._fds[shard])
        self.journal.record(batch)
        if self.fsync:
            for _, shard, offset, length, _ in batch:
                advise_dontneed(self._fds[shard], offset, length)

    def _stop_thread(self) -> None:
        """Hand the thread its end mark and wait for it; the mark is offered again until the thread is gone, so a
        full queue or a lost wake-up (see _run) cannot leave this join waiting forever."""
        sent = False
        while self._thread is not None and self._thread.is_alive():
            if not sent:
                try:
                    # a put that waits for room, not put_nowait: with the last tensor still in the queue, a refused
                    # put_nowait left the join below to time out, 0.2 s added to the end of every such merge
                    # (cProfile of the CLI's task arithmetic on the 4 x 0.5 B set: finish 0.201-0.204 s)
                    self._q.put(None, timeout=0.2)
                    sent = True
                except queue.Full:
                    continue
            self._thread.join(timeout=0.2)

    def _close_files(self) -> None:
        """fsync and close this rank's files; every one is closed even if one fails, then the first error raises."""
        fds, self._fds = self._fds, {}
        self._direct.close()
        first = None
        for fd in fds.values():
            try:
                if self.fsync:
                    os.fsync(fd)
            except OSError as e:
                first = first or e
            finally:
                os.close(fd)
        if self.journal is not None:
            self.journal.close()
        if first is not None:
            raise first

    # --- end -----------------------------------------------------------------------------------------------
    def finish(self, counts: Sequence[int], messages: Sequence[str] = ()) -> Tuple[List[int], List[str]]:
        """Collective. Waits for this rank's writes; every rank's `counts` summed and `messages` joined (rank
        order); raises on every rank if any rank failed."""
        ok, err = True, None
        try:
            if self._next != len(self.order):
                raise RuntimeError(f"writer: {len(self.order) - self._next} planned tensor(s) never came (engine bug)")
            self._stop_thread()
            self._raise_if_failed()
            self._close_files()
        except OSError as e:
            ok, err = False, _write_error(self.out, e, "its tensors", "the shards")
        except BaseException as e:  # noqa: BLE001  (the others must still hear of it)
            ok, err = False, e
        self._stage = "finished"
        everyone = self._collective(lambda: self.ctx.gather((ok, list(counts), list(messages))))
        failed = [r for r, (r_ok, _, _) in enumerate(everyone) if not r_ok]
        if failed:
            self._stage = "done"
            self._cleanup()
            if err is not None:
                raise err
            raise MergeOutputError(f"{self.out}: rank(s) {failed} failed; nothing was written to the output path "
                                   "(their errors are in their own output)")
        totals = [sum(c[i] for _, c, _ in everyone) for i in range(len(counts))]
        return totals, [m for _, _, msgs in everyone for m in msgs]

    def commit(self, *, config_dir=None, card: Optional[str] = None, out_dtype: Optional[torch.dtype] = None,
               extra_files: Optional[Dict[str, str]] = None) -> Path:
        """Collective. Rank 0 adds index, config/tokenizer files and card, then publishes; every rank returns or
        raises with it. (A single process may call it without finish().)"""
        if self._stage == "writing":
            self.finish([])
        return self._conclude(lambda: self._finish_directory(config_dir, card, out_dtype, extra_files))

    def _finish_directory(self, config_dir, card, out_dtype, extra_files) -> None:
        tmp = self.tmp
        try:
            for fname, size in zip(self.shard_names, self.layout.file_sizes):
                with open(tmp / fname, "r+b") as f:
                    f.truncate(size)  # trailing empty tensors, holes never written: the planned size exactly
                    if self.fsync:
                        os.fsync(f.fileno())
            if len(self.shards) > 1:
                _write_text(tmp / INDEX_NAME, json.dumps(self.layout.index(), indent=2) + "\n", self.fsync)
            if config_dir is not None:
                for name in copy_model_files(config_dir, tmp, out_dtype):
                    if self.fsync:
                        fsync_path(tmp / name)
            for fname, text in (extra_files or {}).items():
                _write_text(tmp / fname, text, self.fsync)
            if card is not None:
                _write_text(tmp / "README.md", card, self.fsync)
            for p in tmp.iterdir():  # the bookkeeping does not belong to the published output
                if p.name == REQUEST_FILE or p.name.startswith(JOURNAL_PREFIX):
                    p.unlink()
            if self.fsync:
                fsync_path(tmp)
        except OSError as e:
            raise MergeOutputError(f"{self.out}: write error while finishing the output ({e.strerror or e})") from None
        _publish(tmp, self.out, self.overwrite, self.protect, self.fsync)

    def _conclude(self, work) -> Path:
        """Rank 0 runs `work` (publishing, or raising to abort) and broadcasts the outcome; the others follow."""
        outcome, own = None, None
        if self.ctx.rank == 0:
            try:
                work()
            except BaseException as e:  # noqa: BLE001  (broadcast first, raised below)
                self._cleanup()
                own, outcome = e, str(e) or type(e).__name__
        self._stage = "done"
        outcome = self._collective(lambda: self.ctx.broadcast(outcome))
        if own is not None:
            raise own
        if outcome is not None:
            self._cleanup()
            raise MergeOutputError(f"{self.out}: rank 0 could not finish the output ({outcome})")
        return self.out

    def _cleanup(self) -> None:
        """Stop the thread, close the files and (rank 0) remove the partial directory."""
        self._error = self._error or RuntimeError("aborted")
        if self._thread is not None and self._thread.is_alive():
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._stop_thread()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}
        self._direct.close()
        if self.journal is not None:
            self.journal.close()
        if self.ctx.rank == 0 and self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        """For a rank that failed: take part in the collective the others will call next, then clean up."""
        stage, self._stage = self._stage, "done"

        def fail():
            raise MergeOutputError(f"{self.out}: aborted after writing")

        try:
            if stage == "writing" and self.ctx.world > 1:  # the others will gather in finish()
                self._collective(lambda: self.ctx.gather((False, [], [])))
            elif stage == "finished" and self.ctx.world > 1:  # the others will await the outcome of commit()
                self._conclude(fail)
        except MergeError:
            pass  # cleanup only: the caller re-raises its own error
        finally:
            self._cleanup()


def describe_change(old: str, new: str) -> str:
    """Why two request digests differ, in words (the first difference found)."""
    try:
        o, n = json.loads(old), json.loads(new)
    except ValueError:
        return "its request record is unreadable"
    if not (isinstance(o, list) and len(o) == 4):
        return "its request record is unreadable"
    if o[1] != n[1]:
        return "the output layout (tensors, dtypes or shard size) changed"
    if o[3] != n[3]:
        return f"it was written by {o[3]} process(es), this merge runs {n[3]}"
    fo, fn = o[2], n[2]
    if isinstance(fo, dict) and isinstance(fn, dict):
        for key in ("version", "method", "options"):
            if fo.get(key) != fn.get(key):
                return {"version": "the library version changed", "method": "the method or its parameters changed",
                        "options": "the merge options changed"}[key]
        ins_o, ins_n = fo.get("inputs") or [], fn.get("inputs") or []
        if [i.get("path") for i in ins_o] != [i.get("path") for i in ins_n]:
            return "the input files changed"
        for a, b in zip(ins_o, ins_n):
            if a != b:
                return f"input {b.get('path')} changed (size, modification time or header)"
    return "the request changed"


def _publish(tmp: Path, out: Path, overwrite: bool, protect: Sequence[Union[str, Path]], fsync: bool) -> None:
    """Rename the finished partial directory to `out`, replacing what is there when `overwrite`."""
    old = None
    check_output_path(out, overwrite, protect)  # something may have appeared there meanwhile
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.rename(old, out)
        raise MergeOutputError(f"{out}: cannot move the finished output into place ({e.strerror})") from None
    if fsync:
        fsync_path(out.absolute().parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
