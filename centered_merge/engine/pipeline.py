"""The merge itself: request -> reader -> per-tensor core -> writer (or a dict sink), for the CLI and the APIs.

Per tensor name, in output layout order:

    reader thread            main thread                          writer thread
    views of T inputs   ->   core.merge_tensor (float32)     ->   pwrite at the planned offset (whole
    (mmap; NaN/Inf scan;     -> output dtype (+ NaN/Inf count;     blocks O_DIRECT, io/direct.py), fsync,
     not for the fused        inputs scanned only when not 0)     journal line (resume)
     CUDA: staged copies)

Memory: inputs are mmap views (page cache, not anonymous memory); the method's workspace is a few float32
copies of one tensor; `read_ahead` tensors wait in the reader queue (views only on CPU) and at most `write_queue`
finished tensors wait for the disk. The fused methods write into reused output buffers (buffers.OutputPool, at
most write_queue + 2 of them), so the pages of each new output tensor are not faulted in and zeroed afresh.
So the peak is bounded by a small multiple of the largest tensor, whatever the number of models T or the size
of the model. The elementwise merges (weight_average, linear, task_arithmetic) go further: a tensor of at least
2 x PIECE_BYTES is merged and handed to the writer in pieces (piece_bounds), each in a pooled buffer of its own,
so their buffers are a few pieces whatever the largest tensor, and the disk writes a large tensor while the rest
of it is computed.

Determinism: the threads only move data; every tensor is computed by the same code whatever `read_ahead` is,
and methods seed per (seed, tensor name). Same inputs + seed -> the same bytes, also when a merge is resumed.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ..distributed import RankContext, assign
from ..errors import MergeConfigError, MergeOutputError
from ..io.model_files import ModelFiles
from ..io.writer import ShardedWriter, check_output_path
from . import card
from ..io.direct import BLOCK
from .buffers import OutputPool
from .core import merge_tensor, merge_tensor_in_pieces
from .lock import OutputLock
from .memory_sink import DictSink
from .plan import plan
from .reader import Reader
from .request import MergeRequest, build_request


@dataclass
class MergeReport:
    out_dir: Optional[Path]
    method: Dict[str, Any]
    tensors: int
    merged: int
    passthrough: int
    bytes_read: int
    bytes_written: int
    seconds: float
    nonfinite_inputs: List[str] = field(default_factory=list)
    # seconds the main thread spent waiting for the reader, merging (method + finalize), waiting for room in the
    # writer's queue, and finishing (last writes, fsync, index, files, rename)
    timings: Dict[str, float] = field(default_factory=dict)
    resumed: int = 0  # tensors found already written by an interrupted earlier run of the same request
    notes: List[str] = field(default_factory=list)


# Elementwise merges (MergeMethod.elementwise) hand a tensor of at least 2 x PIECE_BYTES to the writer in pieces of
# about this size, so the disk writes a large tensor while the rest of it is computed, instead of the writer
# idling while the first (or any large) tensor is merged and the merge idling while the last one is written.
# Task arithmetic on the 4 x 1.08 GB floor set, alternated in separate processes (docs/engine.md, "Large tensors
# in pieces"): medians 1.46 s whole, 1.26 s with 8 MiB pieces, 1.18 s with 32 MiB (8 each); 1.11 / 1.21 / 1.08 s
# whole / 16 / 32 MiB (6 each); the machine's writes vary more than that between runs.
PIECE_BYTES = 32 << 20


def piece_bounds(numel: int, esize: int, file_offset: int, piece_bytes: int = PIECE_BYTES) -> Optional[List[int]]:
    """Element bounds [0, b_1, ..., numel] of pieces of about piece_bytes each (the last up to 1.5x), every inner
    bound at a BLOCK-aligned file offset (so each piece's whole blocks are one direct write), or None when the
    tensor is too small to cut. file_offset: where the tensor's bytes start in its file (a multiple of esize)."""
    nbytes = numel * esize
    if nbytes < 2 * piece_bytes:
        return None
    bounds, at = [0], piece_bytes
    while nbytes - at >= piece_bytes // 2:
        cut = at - (file_offset + at) % BLOCK  # BLOCK is a multiple of every element size
        bounds.append(cut // esize)
        at = cut + piece_bytes
    bounds.append(numel)
    return bounds


def run_tensors(req: MergeRequest, sink, pool: Optional[OutputPool] = None) -> Dict[str, Any]:
    """Read, merge and hand to `sink` every tensor of `sink.order`; the counts, waits and non-finite messages.
    pool: where merged tensors are written (reused buffers, given back by the sink once written), or None; with a
    pool, the sink is the ShardedWriter, and elementwise methods hand it large tensors in pieces (piece_bounds)."""
    out_info = dict(req.items)
    stats = {"read": 0, "merged": 0, "pass": 0, "nonfinite": []}
    waits = {"read": 0.0, "compute": 0.0, "write": 0.0, "finish": 0.0}
    clock = time.perf_counter
    reader = Reader(req, sink.order)
    dev = req.device
    try:
        items = iter(reader)
        while True:
            ta = clock()
            try:
                item = next(items)
            except StopIteration:
                break
            tb = clock()
            waits["read"] += tb - ta
            stats["read"] += item.nbytes
            stats["nonfinite"] += item.nonfinite
            if item.kind == "passthrough":
                out = item.inputs[0]
                stats["pass"] += 1
            else:
                if item.event is not None:
                    torch.cuda.current_stream(dev).wait_event(item.event)
                    for t in list(item.inputs) + ([item.base] if item.base is not None else []):
                        t.record_stream(torch.cuda.current_stream(dev))
                want = out_info[item.key]
                buf = None
                if pool is not None:
                    at = req.layout.slots[item.key].offset  # where its bytes start in their file
                    bounds = piece_bounds(math.prod(want.shape), want.dtype.itemsize, at,
                                          PIECE_BYTES) if req.method.elementwise else None
                    if bounds is not None:  # an elementwise merge of a large tensor: in pieces, each written at once
                        found, handed = _merge_in_pieces(req, sink, pool, item, want, bounds, at)
                        del item
                        stats["nonfinite"] += found
                        stats["merged"] += 1
                        waits["compute"] += clock() - tb - handed
                        waits["write"] += handed
                        continue
                    buf = pool.take((item.key, 0), want.shape, want.dtype, phase=at)
                out, found = merge_tensor(req.method, item.key, item.inputs, item.base, want,
                                          req.allow_nonfinite, item.nonfinite, item.labels, out=buf)
                del buf
                stats["nonfinite"] += found
                if out.device.type != "cpu":
                    out = out.cpu()
                stats["merged"] += 1
            key = item.key
            del item
            tc = clock()
            waits["compute"] += tc - tb
            sink.write(key, out)
            del out
            waits["write"] += clock() - tc
    finally:
        reader.stop()
    stats["waits"] = waits
    return stats


def _merge_in_pieces(req: MergeRequest, sink, pool: OutputPool, item, want, bounds, at: int):
    """Merge item's tensor piece by piece into pooled buffers (placed at their file offset's phase: `at` is where
    the tensor starts in its file), each handed to the writer at once; (the non-finite messages, the seconds
    spent waiting for room in the writer's queue)."""
    key, clock, handed = item.key, time.perf_counter, [0.0]

    def take(start, n):
        return pool.take((key, start), (n,), want.dtype, phase=at + start)

    def emit(piece, start, last):
        t = clock()
        sink.write_piece(key, piece, start, last)
        handed[0] += clock() - t
    found = merge_tensor_in_pieces(req.method, key, item.inputs, item.base, want, req.allow_nonfinite,
                                   item.nonfinite, item.labels, bounds, take, emit)
    return found, handed[0]


def _say(enabled: bool, notes: List[str]) -> Callable[[str], None]:
    def say(msg: str) -> None:
        notes.append(msg)
        if enabled:
            print(f"centered-merge: {msg}", file=sys.stderr)
    return say


def _lock_everywhere(out_dir, ctx: RankContext) -> Optional[OutputLock]:
    """Rank 0 locks the output; every rank raises if it could not (the same message)."""
    lock, err = None, None
    if ctx.rank == 0:
        try:
            lock = OutputLock(out_dir)
        except MergeOutputError as e:
            err = str(e)
    err = ctx.broadcast(err)
    if err is not None:
        raise MergeOutputError(err)
    return lock


def merge_checkpoints(models, out_dir, method="cart", base=None, *, out_dtype=None, dtype=None,
                      device="auto", shard_size=5 * 10**9, overwrite: bool = False, progress: bool = True,
                      read_ahead: int = 2, allow_nonfinite: bool = False, trust_pickle: bool = False,
                      write_queue: int = 1, distributed: bool = False, resume: bool = True,
                      fsync: bool = True, model_files: Optional[ModelFiles] = None, **params) -> MergeReport:
    """Merge checkpoints tensor by tensor into an HF-style directory `out_dir`.

    models: paths (.safetensors file, HF directory, torch .bin/.pt), state dicts or nn.Modules, same keys and
    shapes. base: the same kinds of thing (needed by task_arithmetic and ties; for the others it is only where
    config.json and tokenizer files are copied from). method: a registered name or a MergeMethod instance.
    out_dtype: storage dtype of merged float tensors (default: `dtype`, else the first model's). dtype:
    mergekit's compute dtype; accumulation is always float32 here, so it only sets the default out_dtype.
    params: the method's parameters (see centered_merge.methods). Returns a MergeReport. Raises MergeError
    subclasses naming file and tensor; on any failure it sees, nothing is left at out_dir.

    resume: if an earlier run of this same request was killed (SIGKILL, OOM, power loss), continue from what it
    wrote (its journal), else start over saying why; resume=False (CLI --no-resume) always starts over.
    model_files: where the tokenizer, generation config and chat template come from, and the YAML config for
    the card (io/model_files.py; the CLI builds it from a config); default: all from the base, else the first
    model. Only merges of files resume (in-memory inputs cannot be fingerprinted). A lock next to the output keeps a
    second merge out of the same path while this one runs.

    distributed=True: call it on every rank of an initialised torch.distributed group, with the same arguments;
    the ranks share the tensors out and write one output together (centered_merge.distributed). Otherwise the
    merge is a one-process merge even inside a process group.
    """
    t0 = time.perf_counter()
    ctx = RankContext.single()
    if distributed:  # several processes (torch.distributed): each merges and writes a share
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise MergeConfigError("distributed=True needs an initialised torch.distributed process group "
                                   "(torchrun, then torch.distributed.init_process_group)")
        ctx = RankContext.current() or ctx  # a group of one: an ordinary merge
    notes: List[str] = []
    say = _say(progress and ctx.rank == 0, notes)
    req = build_request(models, method, base, out_dtype=out_dtype, dtype=dtype, device=device,
                        read_ahead=read_ahead, write_queue=write_queue, shard_size=shard_size,
                        allow_nonfinite=allow_nonfinite, trust_pickle=trust_pickle, **params)
    lock = writer = bar = None
    try:
        check_output_path(out_dir, overwrite, req.inputs.paths)
        lock = _lock_everywhere(out_dir, ctx)
        if lock is not None and lock.taken_over:
            say(f"{out_dir}: took over the lock of a merge that is gone ({lock.taken_over})")
        owner = None
        if ctx.world > 1:
            owner = assign([(k, req.cost(k)) for k, _ in req.items], ctx.world)
        done = [0]

        # outputs in reused buffers (methods that write into one, on the CPU): each comes back once written
        # (placed in them at their file offset's phase, so the writer's direct I/O needs no staging copy)
        pool = OutputPool(max(1, write_queue) + 2) if req.method.writes_into and req.device.type == "cpu" else None

        def on_written(name, start, nbytes, last):
            if pool is not None:
                pool.give_back((name, start))
            done[0] += last
            if bar is not None:
                bar.update(nbytes)
                bar.set_postfix_str(f"{done[0]}/{len(writer.order)} tensors", refresh=False)

        writer = ShardedWriter(out_dir, req.layout, overwrite=overwrite, queue_depth=write_queue, fsync=fsync,
                               on_written=on_written, ctx=ctx, owner=owner, fingerprint=req.fingerprint(),
                               resume=resume, protect=req.inputs.paths, note=say)
        if writer.resumed:
            say(f"{out_dir}: resuming an interrupted merge: {writer.resumed} of "
                f"{writer.resumed + len(writer.order)} tensors already written")
        if progress and ctx.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(req.layout.slots[n].length for n in writer.order), unit="B", unit_scale=True,
                       unit_divisor=1024, desc="merging", file=sys.stderr, dynamic_ncols=True)
        stats = run_tensors(req, writer, pool)
        (read,), nonfinite = writer.finish([stats["read"]], stats["nonfinite"])
        for msg in nonfinite:
            warnings.warn(msg + " (merged anyway: allow_nonfinite)", stacklevel=2)
        float_dts = {i.dtype for k, i in req.items if req.kinds[k] == "float"}
        merged = sum(1 for k in req.kinds.values() if k == "float")
        files = model_files or ModelFiles()
        text = card.model_card(req.method.describe(), [s.label for s in req.inputs.sources],
                               req.inputs.base.label if req.inputs.base is not None else None,
                               sorted(str(d).replace("torch.", "") for d in float_dts), merged,
                               len(req.items) - merged, config_yaml=files.config_yaml, references=files.references)
        tf = time.perf_counter()
        writer.commit(config_dir=files.with_config_dir(req.inputs.reference_config_dir()), card=text,
                      out_dtype=next(iter(float_dts)) if len(float_dts) == 1 else None,
                      extra_files=files.extra_files())
        stats["waits"]["finish"] = time.perf_counter() - tf
        return MergeReport(out_dir=Path(out_dir), method=req.method.describe(), tensors=len(req.items),
                           merged=merged, passthrough=len(req.items) - merged, bytes_read=read,
                           bytes_written=sum(i.nbytes for _, i in req.items), seconds=time.perf_counter() - t0,
                           nonfinite_inputs=nonfinite, timings=stats["waits"], resumed=writer.resumed, notes=notes)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if lock is not None:
            lock.release()
        req.close()


def merge_in_memory(models, method, base=None, *, out_dtype=None, device=None, allow_nonfinite=False,
                    **params) -> Dict[str, torch.Tensor]:
    """The in-memory merge (api.merge): the same request and core as merge_checkpoints, into a dict."""
    if models is None or len(models) == 0:
        raise MergeConfigError("no models to merge (T = 0)")
    if device is None:  # where the tensors are
        first = next((v for v in (models[0].values() if isinstance(models[0], dict) else ())
                      if isinstance(v, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
    labels = [f"model {i}" for i in range(len(models))]
    req = build_request(models, method, base, out_dtype=out_dtype, device=torch.device(device), read_ahead=0,
                        allow_nonfinite=allow_nonfinite, labels=labels, **params)
    try:
        sink = DictSink(req.inputs.keys)
        stats = run_tensors(req, sink)
        for msg in stats["nonfinite"]:
            warnings.warn(msg + " (merged anyway: allow_nonfinite)", stacklevel=3)
        return sink.tensors
    finally:
        req.close()


def plan_merge(models, method="cart", base=None, *, out_dtype=None, dtype=None, device="auto", read_ahead=2,
               trust_pickle=False, write_queue=1, shard_size=5 * 10**9, **params) -> Dict[str, Any]:
    """What merge_checkpoints would do, without reading any tensor data (see plan.plan)."""
    req = build_request(models, method, base, out_dtype=out_dtype, dtype=dtype, device=device,
                        read_ahead=read_ahead, write_queue=write_queue, shard_size=shard_size,
                        trust_pickle=trust_pickle, **params)
    try:
        return plan(req)
    finally:
        req.close()
