"""The output side of the engine: an HF-style directory, written tensor by tensor, made visible only when complete.

Layout: model.safetensors (one shard) or model-0000i-of-0000N.safetensors + model.safetensors.index.json,
config.json / generation and tokenizer files copied from a reference model, and a README.md card.

Why this module writes the safetensors format itself: `safetensors.torch.save_file` needs every tensor of a
shard in memory at once (a 5 GB shard = 5 GB of RAM), which would break the engine's promise that memory is
bounded by the largest tensor. The format is simple (8-byte little-endian header length, a JSON header with
dtype / shape / data_offsets per tensor, then the raw bytes, contiguous, no holes), and every tensor's shape and
dtype is known before the merge starts, so each shard's header is written first and the tensor bytes are then
appended as they are produced. Files written here are read back with safetensors' own reader in the tests.

Atomicity: everything goes to a hidden sibling directory `.NAME.partial-XXXX`; only a complete output is renamed
to NAME. On any failure the partial directory is removed, so nothing at NAME ever looks finished when it is not.
"""
from __future__ import annotations

import errno
import json
import os
import queue
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import MergeConfigError, MergeError, MergeOutputError
from .base import TensorInfo

ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _attr, _name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _attr):
        ST_DTYPE[getattr(torch, _attr)] = _name

# copied from the reference model's directory when present
COPY_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json",
    "merges.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.I)


def parse_size(text) -> int:
    """'5GB' -> 5*10**9, '500MiB' -> 500*2**20, '1e9' or 1000 -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        n = int(text)
    else:
        s = str(text)
        m = _SIZE.match(s)
        if m:
            num, unit, binary = m.groups()
            base = 1024 if binary else 1000
            n = int(float(num) * base ** " kmgt".index(unit.lower() or " "))
        else:
            try:
                n = int(float(s))
            except ValueError:
                raise MergeConfigError(f"shard size {text!r} is not a size (examples: 5GB, 500MB, 2GiB)") from None
    if n <= 0:
        raise MergeConfigError(f"shard size must be positive; got {text!r}")
    return n


def check_output_path(out_dir, overwrite: bool) -> Path:
    """Refuse an existing non-empty output unless overwrite; called before any work and again at the end."""
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            return out
        if not overwrite:
            what = "directory is not empty" if out.is_dir() else "path exists and is not a directory"
            raise MergeOutputError(f"{out}: output {what}; pass --overwrite (API: overwrite=True) to replace it")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:  # missing parents are created later
        parent = parent.parent
    if not parent.is_dir():
        raise MergeOutputError(f"{out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise MergeOutputError(f"{out}: directory {parent} is not writable")
    return out


def plan_shards(items: Sequence[Tuple[str, TensorInfo]], shard_size: int) -> List[List[Tuple[str, TensorInfo]]]:
    """Split tensors (in the given order) into shards of at most shard_size bytes (a bigger tensor gets its own).

    Inside a shard, tensors are laid out by element size, largest first (stable), so that every tensor starts at
    an offset aligned to its element size without padding (safetensors allows no holes).
    """
    shards: List[List[Tuple[str, TensorInfo]]] = []
    cur: List[Tuple[str, TensorInfo]] = []
    size = 0
    for name, info in items:
        if cur and size + info.nbytes > shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, info))
        size += info.nbytes
    if cur or not shards:
        shards.append(cur)
    return [sorted(s, key=lambda kv: -_itemsize(kv[1].dtype)) for s in shards]


def _itemsize(dtype: torch.dtype) -> int:
    return 1 if dtype == torch.bool else torch.empty((), dtype=dtype).element_size()


def _header_bytes(shard: Sequence[Tuple[str, TensorInfo]], metadata: Dict[str, str]) -> Tuple[bytes, int]:
    header = {"__metadata__": metadata}
    off = 0
    for name, info in shard:
        if info.dtype not in ST_DTYPE:
            raise MergeConfigError(f"tensor {name!r}: dtype {info.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": ST_DTYPE[info.dtype], "shape": list(info.shape),
                        "data_offsets": [off, off + info.nbytes]}
        off += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, off


def _shard_names(n: int) -> List[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _write_error(out: Path, e: OSError, what: str, fname: str) -> MergeOutputError:
    reason = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file size limit reached"}.get(e.errno, "write error")
    return MergeOutputError(f"{out}: {reason} while writing {what} to {fname} ({e.strerror or e}); "
                            "nothing was written to the output path")


def _make_partial_dir(out: Path) -> Path:
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as e:
        raise MergeOutputError(f"{out}: cannot create a temporary directory in {parent} ({e.strerror})") from None


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class ShardedWriter:
    """Writes the planned tensors, in `order`, into shards in a hidden temporary directory; `commit` publishes.

    `write(name, tensor)` hands the tensor to a background thread (a bounded queue of `queue_depth` tensors, so
    memory stays bounded) and returns. Errors of the thread surface at the next write or at commit.
    """

    def __init__(self, out_dir, items: Sequence[Tuple[str, TensorInfo]], *, shard_size: int = 5 * 10**9,
                 overwrite: bool = False, queue_depth: int = 2, fsync: bool = True,
                 on_written: Optional[Callable[[str, int], None]] = None):
        self.out = check_output_path(out_dir, overwrite)
        self.overwrite = overwrite
        self.fsync = fsync
        self.on_written = on_written
        self.shards = plan_shards(list(items), int(shard_size))
        self.shard_names = _shard_names(len(self.shards))
        self.order = [name for shard in self.shards for name, _ in shard]
        self._info = dict(items)
        self._next = 0
        self.tmp = _make_partial_dir(self.out)
        self._q: "queue.Queue" = queue.Queue(maxsize=max(1, queue_depth))
        self._error: Optional[BaseException] = None
        self._done = False
        self._thread = threading.Thread(target=self._run, name="centered_merge-writer", daemon=True)
        self._thread.start()

    # --- producer side -------------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._raise_if_failed()
        _accept(self, name, tensor)
        while True:
            try:
                self._q.put((name, tensor), timeout=0.2)
                return
            except queue.Full:
                self._raise_if_failed()

    def _raise_if_failed(self):
        if self._error is not None:
            raise self._error

    # --- writer thread -------------------------------------------------------------------------------------
    def _run(self):
        f = None
        path = None
        try:
            for shard, fname in zip(self.shards, self.shard_names):
                path = self.tmp / fname
                name = None
                try:
                    f = open(path, "wb", buffering=0)
                    head, _ = _header_bytes(shard, {"format": "pt"})
                    f.write(head)
                    for expect, info in shard:
                        item = self._q.get()
                        if item is None:  # abort
                            return
                        name, tensor = item
                        assert name == expect
                        buf = _tensor_bytes(tensor)
                        del tensor, item
                        view, pos = buf, 0
                        while pos < len(view):  # os-level writes may be short
                            pos += f.write(view[pos:pos + (1 << 26)])
                        del buf, view
                        if self.on_written is not None:
                            self.on_written(name, info.nbytes)
                    if self.fsync:
                        os.fsync(f.fileno())
                    f.close()
                    f = None
                except OSError as e:
                    raise _write_error(self.out, e, f"tensor {name!r}" if name else "the header", fname) from None
            self._done = True
        except BaseException as e:  # noqa: BLE001  (handed to the producer)
            self._error = e
            # drain so a blocked producer wakes up and sees the error
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
        finally:
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    # --- end -----------------------------------------------------------------------------------------------
    def finish(self, counts: Sequence[int], messages: Sequence[str] = ()) -> Tuple[List[int], List[str]]:
        """The merge's counts summed, and its messages joined, over every process that wrote part of the output:
        here just the arguments (PartitionedShardWriter gathers them across ranks)."""
        return list(counts), list(messages)

    def commit(self, *, config_dir=None, card: Optional[str] = None, out_dtype: Optional[torch.dtype] = None,
               extra_files: Optional[Dict[str, str]] = None) -> Path:
        """Wait for the writes, add index, config/tokenizer files and card, then rename into place."""
        try:
            if self._next != len(self.order):
                raise RuntimeError(f"writer: {len(self.order) - self._next} planned tensor(s) never came (engine bug)")
            self._thread.join()
            self._raise_if_failed()
            if not self._done:
                raise MergeOutputError(f"{self.out}: writing stopped before the end")
            _finish_directory(self, config_dir, card, out_dtype, extra_files)
            return self.out
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop the thread and remove the partial directory (idempotent)."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            try:
                self._q.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout=30)
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def _accept(w, name: str, tensor: torch.Tensor) -> None:
    """Check that `tensor` is the next one a writer expects, as planned (shape, dtype)."""
    expected = w.order[w._next] if w._next < len(w.order) else None
    if name != expected:
        raise RuntimeError(f"writer: got tensor {name!r}, expected {expected!r} (engine bug)")
    info = w._info[name]
    if tuple(tensor.shape) != tuple(info.shape) or tensor.dtype != info.dtype:
        raise RuntimeError(f"writer: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, planned "
                           f"{info.shape} {info.dtype} (engine bug)")
    w._next += 1


def _finish_directory(w, config_dir, card, out_dtype, extra_files) -> None:
    """Index, config/tokenizer files and card into the partial directory of writer `w`, then publish it."""
    try:
        if len(w.shards) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for s in w.shards for _, i in s)},
                "weight_map": {name: fname for shard, fname in zip(w.shards, w.shard_names) for name, _ in shard},
            }
            (w.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if config_dir is not None:
            copy_model_files(Path(config_dir), w.tmp, out_dtype)
        for fname, text in (extra_files or {}).items():
            (w.tmp / fname).write_text(text)
        if card is not None:
            (w.tmp / "README.md").write_text(card)
    except OSError as e:
        raise MergeOutputError(f"{w.out}: write error while finishing the output ({e.strerror or e})") from None
    _publish(w.tmp, w.out, w.overwrite)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished partial directory to `out`, replacing what is there when `overwrite`."""
    old = None
    check_output_path(out, overwrite)  # something may have appeared there meanwhile
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
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


class PartitionedShardWriter:
    """ShardedWriter's output, written by several processes (torch.distributed ranks) at once.

    Every rank plans the same shards. Rank 0 creates the partial directory, writes every shard's header and
    sizes each file to its final length; each rank then writes the bytes of its own tensors (`owner`) at their
    planned offsets with pwrite, so the files come out byte for byte as one process writes them. `finish`
    gathers every rank's counts, messages and success; if all succeeded, `commit` has rank 0 add the index,
    config files and card and publish, and the others learn the outcome from it. On any failure no rank
    publishes and rank 0 removes the partial directory, also when a collective itself fails (a rank died).

    Collectives, in the same order on every rank: construction broadcasts rank 0's directory and `fingerprint`
    (a digest of the arguments; ranks given different ones all raise) and gathers the comparison; `finish`
    gathers (so does `abort` before finish); `commit` broadcasts (so does `abort` after finish).
    """

    def __init__(self, out_dir, items: Sequence[Tuple[str, TensorInfo]], *, ctx, owner: Dict[str, int],
                 shard_size: int = 5 * 10**9, overwrite: bool = False, fsync: bool = True, fingerprint: str = "",
                 on_written: Optional[Callable[[str, int], None]] = None):
        self.ctx, self.overwrite, self.fsync, self.on_written = ctx, overwrite, fsync, on_written
        self.out = check_output_path(out_dir, overwrite)
        self.shards = plan_shards(list(items), int(shard_size))
        self.shard_names = _shard_names(len(self.shards))
        self._info = dict(items)
        self._where: Dict[str, Tuple[int, int]] = {}  # name -> (shard index, byte offset in its file)
        headers = []
        for i, shard in enumerate(self.shards):
            head, _ = _header_bytes(shard, {"format": "pt"})
            headers.append(head)
            off = len(head)
            for name, info in shard:
                self._where[name] = (i, off)
                off += info.nbytes
        self.order = [name for shard in self.shards for name, _ in shard if owner[name] == ctx.rank]
        self._next = 0
        self._fds: Dict[int, int] = {}
        self._stage = "writing"
        self.tmp: Optional[Path] = None
        plan = [(n, list(i.shape), str(i.dtype)) for shard in self.shards for n, i in shard]
        self.fingerprint = json.dumps([str(self.out.absolute()), plan, fingerprint], sort_keys=True)
        made = None
        if ctx.rank == 0:
            try:
                self.tmp = _make_partial_dir(self.out)
                for shard, fname, head in zip(self.shards, self.shard_names, headers):
                    with open(self.tmp / fname, "wb") as f:
                        f.write(head)
                        f.truncate(len(head) + sum(info.nbytes for _, info in shard))
                        if self.fsync:
                            os.fsync(f.fileno())
                made = str(self.tmp)
            except (OSError, MergeOutputError) as e:
                err = e if isinstance(e, MergeOutputError) else _write_error(self.out, e, "the headers", "the shards")
                made = ("error", str(err))
        made, theirs = self._collective(lambda: ctx.broadcast((made, self.fingerprint)))
        if isinstance(made, tuple):
            self._stage = "done"
            self._cleanup()
            raise MergeOutputError(made[1])
        self.tmp = Path(made)
        same = self._collective(lambda: ctx.gather(theirs == self.fingerprint))
        if not all(same):
            self._stage = "done"
            self._cleanup()
            bad = [r for r, ok in enumerate(same) if not ok]
            raise MergeConfigError(f"{self.out}: rank(s) {bad} were given different arguments from rank 0 (models, "
                                   "method, parameters, output path or shard size); every rank must run the same merge")

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

    def write(self, name: str, tensor: torch.Tensor) -> None:
        _accept(self, name, tensor)
        shard, off = self._where[name]
        fname = self.shard_names[shard]
        try:
            if shard not in self._fds:
                self._fds[shard] = os.open(self.tmp / fname, os.O_WRONLY)
            view = _tensor_bytes(tensor)
            pos = 0
            while pos < len(view):  # os-level writes may be short
                pos += os.pwrite(self._fds[shard], view[pos:pos + (1 << 26)], off + pos)
        except OSError as e:
            raise _write_error(self.out, e, f"tensor {name!r}", fname) from None
        if self.on_written is not None:
            self.on_written(name, self._info[name].nbytes)

    def _close_files(self) -> None:
        """fsync and close this rank's files; every one is closed even if one fails, then the first error raises."""
        fds, self._fds = self._fds, {}
        first = None
        for fd in fds.values():
            try:
                if self.fsync:
                    os.fsync(fd)
            except OSError as e:
                first = first or e
            finally:
                os.close(fd)
        if first is not None:
            raise first

    def finish(self, counts: Sequence[int], messages: Sequence[str] = ()) -> Tuple[List[int], List[str]]:
        """Collective. Every rank's `counts` summed and `messages` joined (rank order); raises on every rank if
        any rank failed."""
        ok, err = True, None
        try:
            if self._next != len(self.order):
                raise RuntimeError(f"writer: {len(self.order) - self._next} planned tensor(s) never came (engine bug)")
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
        """Collective. Rank 0 finishes and publishes the directory; every rank returns or raises with it."""
        return self._conclude(lambda: _finish_directory(self, config_dir, card, out_dtype, extra_files))

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
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}
        if self.ctx.rank == 0 and self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        """For a rank that failed: take part in the collective the others will call next, then clean up."""
        stage, self._stage = self._stage, "done"

        def fail():
            raise MergeOutputError(f"{self.out}: aborted after writing")

        try:
            if stage == "writing":  # the others will gather in finish()
                self._collective(lambda: self.ctx.gather((False, [], [])))
            elif stage == "finished":  # the others will broadcast or await the outcome of commit()
                self._conclude(fail)
        except MergeError:
            pass  # cleanup only: the caller re-raises its own error
        finally:
            self._cleanup()


def copy_model_files(src: Path, dst: Path, out_dtype: Optional[torch.dtype] = None) -> List[str]:
    """Copy config, generation and tokenizer files; set config.json's dtype to the output dtype."""
    copied = []
    names = list(COPY_FILES) + sorted(p.name for p in src.glob("tokenizer*") if p.name not in COPY_FILES)
    for name in names:
        p = src / name
        if not p.is_file():
            continue
        if name == "config.json" and out_dtype is not None:
            try:
                cfg = json.loads(p.read_text())
            except ValueError:
                cfg = None
            if isinstance(cfg, dict):
                dt = str(out_dtype).replace("torch.", "")
                for key in ("torch_dtype", "dtype"):
                    if key in cfg:
                        cfg[key] = dt
                (dst / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
                copied.append(name)
                continue
        shutil.copyfile(p, dst / name)
        copied.append(name)
    return copied
