"""The streaming merge engine: checkpoints on disk in, an HF-style directory out, one tensor at a time.

Pipeline (per tensor name, in output layout order):

    reader thread            main thread                        writer thread
    views of T inputs   ->   method.merge_tensor (float32)  ->  bytes to the current shard
    (mmap, paged in by       ops.finalize -> output dtype        (bounded queue)
     the NaN/Inf scan;       (+ NaN/Inf count)
     on CUDA: pinned host
     copy + H2D on a side
     stream)

Memory: inputs are mmap views (page cache, not anonymous memory); the method's workspace is a few float32
copies of one tensor; `read_ahead` tensors wait in the reader queue (views only on CPU) and at most
`write_queue` finished tensors wait for the disk. So the peak is bounded by a small multiple of the largest tensor,
whatever the number of models T or the size of the model.

Determinism: the threads only move data; every tensor is computed by the same code in the same order whatever
`read_ahead` is, and methods seed per (seed, tensor name). Same inputs + seed -> the same bytes.
"""
from __future__ import annotations

import json
import math
import queue
from collections import abc
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import ops
from .distributed import RankContext, assign
from .errors import MergeConfigError, MergeError, MergeInputError, MergeOutputError
from .io import TensorInfo, TensorSource, open_model
from .io.base import check_computable
from .io.writer import PartitionedShardWriter, ShardedWriter, check_output_path, parse_size
from .methods import get_method
from .validation import check_group, check_key_sets, count_nonfinite

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(value, what: str = "dtype") -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().replace("torch.", "")
    if key not in _DTYPE_NAMES:
        raise MergeConfigError(f"{what} {value!r} is not a float dtype; use one of bfloat16, float16, float32, float64")
    return _DTYPE_NAMES[key]


def resolve_device(device) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MergeConfigError(f"device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeConfigError(f"device {device!r} requested but CUDA is not available in this torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise MergeConfigError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("centered_merge")
    except Exception:  # noqa: BLE001  (not installed: running from a source tree)
        import centered_merge

        return getattr(centered_merge, "__version__", "unknown")


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


# --- opening and checking the inputs ---------------------------------------------------------------------------
class _Inputs:
    """The T models (+ base) opened lazily, with their key sets and per-tensor metadata checked."""

    def __init__(self, models, base, method, trust_pickle: bool):
        if isinstance(models, (str, Path, dict)) or hasattr(models, "state_dict"):
            raise MergeConfigError("models must be a list of models (paths, state dicts or nn.Modules)")
        models = list(models)
        if not models:
            raise MergeConfigError("no models to merge")
        if method.needs_base and base is None:
            raise MergeConfigError(f"method {method.name!r} needs a base model (--base / base=...)")
        self.sources: List[TensorSource] = []
        self.base: Optional[TensorSource] = None
        try:
            for i, m in enumerate(models):
                self.sources.append(open_model(m, trust_pickle=trust_pickle, index=i))
            if base is not None:
                self.base = open_model(base, trust_pickle=trust_pickle, index=len(models))
                if not isinstance(base, (str, Path)):
                    self.base.label = "base model (in memory)"
        except BaseException:
            self.close()
            raise
        self.use_base = method.needs_base
        group = self.group
        try:
            check_key_sets([s.keys() for s in group], [s.label for s in group])
        except BaseException:
            self.close()
            raise
        self.keys = self.sources[0].keys()

    @property
    def group(self) -> List[TensorSource]:
        return self.sources + ([self.base] if self.use_base else [])

    def labels(self, key) -> List[str]:
        return [s.file_of(key) for s in self.group]

    def check_meta(self, key) -> str:
        """Shape and float-ness from metadata alone (no data read): 'float', 'passthrough' or raise."""
        infos = [s.info(key) for s in self.group]
        check_computable(key, [i.dtype for i in infos], self.labels(key))
        floats = [i.dtype.is_floating_point for i in infos]
        if all(floats) and len({i.shape for i in infos}) == 1:
            return "float"
        metas = [torch.empty(i.shape, dtype=i.dtype, device="meta") for i in infos]
        if not any(floats) and len({i.shape for i in infos}) == 1:
            return "passthrough"  # values are compared when read
        check_group(key, metas, self.labels(key))  # raises with the core's wording
        raise MergeInputError(f"tensor {key!r} cannot be merged")  # unreachable in practice

    def close(self):
        for s in self.sources + ([self.base] if self.base is not None else []):
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass


def _out_info(inputs: _Inputs, key: str, kind: str, out_dtype: Optional[torch.dtype]) -> TensorInfo:
    info = inputs.sources[0].info(key)
    if kind == "float" and out_dtype is not None:
        return TensorInfo(info.shape, out_dtype)
    return info


# --- planning (dry run) ----------------------------------------------------------------------------------------
def plan_merge(models, method="cart", base=None, *, out_dtype=None, dtype=None, device="auto", read_ahead=2,
               trust_pickle=False, write_queue=1, **params) -> Dict[str, Any]:
    """What merge_checkpoints would do, without reading any tensor data: per tensor whether it is low rank and
    at which k, FLOPs, and an estimate of peak memory."""
    m = get_method(method, **params)
    out_dt = parse_dtype(out_dtype, "out_dtype") or parse_dtype(dtype, "dtype")
    dev = resolve_device(device)
    inputs = _Inputs(models, base, m, trust_pickle)
    try:
        T = len(inputs.sources)
        rows = []
        for key in inputs.keys:
            kind = inputs.check_meta(key)
            info = inputs.sources[0].info(key)
            oinfo = _out_info(inputs, key, kind, out_dt)
            in_bytes = sum(s.info(key).nbytes for s in inputs.group)
            if kind == "float":
                p = m.plan_tensor(key, info.shape, info.dtype, T)
            else:
                p = {"lowrank": False, "k": None, "flops": 0, "workspace_bytes": 0}
            rows.append({"name": key, "shape": tuple(info.shape), "dtype": str(info.dtype).replace("torch.", ""),
                         "out_dtype": str(oinfo.dtype).replace("torch.", ""), "kind": kind,
                         "lowrank": bool(p.get("lowrank")), "k": p.get("k"), "flops": int(p.get("flops") or 0),
                         "workspace_bytes": int(p.get("workspace_bytes") or 0), "in_bytes": in_bytes,
                         "out_bytes": oinfo.nbytes})
        max_out = max((r["out_bytes"] for r in rows), default=0)
        # the method's float32 workspace (its result included) + finalize's NaN/Inf mask (1 byte per element);
        # the torch twins of the element-wise ops also make a float32 copy of each 16-bit input as they add it
        from .backend import describe as backend_describe

        twin = backend_describe().get("cuda" if dev.type == "cuda" else "cpu") != "native"
        max_ws = max((r["workspace_bytes"] + math.prod(r["shape"]) * (5 if twin else 1) for r in rows), default=0)
        max_in = max((r["in_bytes"] for r in rows), default=0)
        # host: method workspace (+ its float32 result) for the current tensor, the finalized tensor, and the
        # tensors waiting for / being written; mmap'd inputs live in the page cache, not in this figure.
        host = max_ws + (write_queue + 2) * max_out
        est = {"host_bytes": host, "device_bytes": 0}
        if dev.type == "cuda":
            # staged inputs of the read-ahead window, capped as in _Reader (beyond the cap: one input at a time)
            cap = torch.cuda.get_device_properties(dev).total_memory // 4
            staged = min((read_ahead + 1) * max_in, cap)
            est["device_bytes"] = max_ws + staged + max_out
            est["host_bytes"] = host + staged  # pinned staging buffers
        not_mmapped = [s.label for s in inputs.sources if not _is_mmapped(s)]
        return {
            "method": m.describe(), "models": [s.label for s in inputs.sources], "elementwise": "torch" if twin
            else "native",
            "base": inputs.base.label if inputs.base is not None else None,
            "device": str(dev), "tensors": rows, "num_tensors": len(rows),
            "num_lowrank": sum(r["lowrank"] for r in rows),
            "total_flops": sum(r["flops"] for r in rows),
            "bytes_in": sum(r["in_bytes"] for r in rows), "bytes_out": sum(r["out_bytes"] for r in rows),
            "largest_tensor_bytes": max_out, "peak_memory_estimate": est, "held_in_memory": not_mmapped,
        }
    finally:
        inputs.close()


def _is_mmapped(src: TensorSource) -> bool:
    """Whether a source's tensors live in the page cache (mmap) rather than in the process's own memory."""
    from .io import HFDirectory, SafetensorsFile, TorchFile

    if isinstance(src, HFDirectory):
        return all(_is_mmapped(s) for s in src._shards)
    if isinstance(src, TorchFile):
        return src.mmapped
    return isinstance(src, SafetensorsFile)


# --- the pipeline ----------------------------------------------------------------------------------------------
_STOP = object()


class _NonFinite(Exception):
    pass


class _LazyDeviceInputs(abc.Sequence):
    """The T inputs of one tensor, copied to the compute device only when a method reads one of them.

    Used on CUDA when staging all T inputs at once would take too much device memory: device memory then holds
    one or two inputs at a time, whatever T, at the price of one host-to-device copy per read (methods read each
    input once or twice). Copies are issued on the current stream, so they are ordered with the compute that
    uses them; the host side goes through a pinned buffer so the copy is a real DMA.
    """

    def __init__(self, host: Sequence[torch.Tensor], device: torch.device):
        self.host, self.device = list(host), device

    def __len__(self):
        return len(self.host)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        t = self.host[i]
        if self.device.type != "cuda":
            return t.to(self.device)
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        return pinned.to(self.device, non_blocking=True)


class _Reader:
    """Produces, in order, (name, kind, inputs, base, nbytes) with data paged in (and copied to the device)."""

    def __init__(self, inputs: _Inputs, order: Sequence[str], kinds: Dict[str, str], device: torch.device,
                 depth: int, allow_nonfinite: bool):
        self.inputs, self.order, self.kinds, self.device = inputs, list(order), kinds, device
        self.allow_nonfinite = allow_nonfinite
        self.nonfinite: List[str] = []
        self.depth = int(depth)
        self._stop = threading.Event()
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=device)
            # eager staging (all T inputs on the device, copied ahead on a side stream) only while the staged
            # tensors of the read-ahead window fit in a quarter of the device memory; beyond that, inputs are
            # copied one at a time when read (_LazyDeviceInputs), so device memory does not grow with T
            total = torch.cuda.get_device_properties(device).total_memory
            self.stage_budget = total // (4 * (self.depth + 1))
        if self.depth > 0:
            self.q: "queue.Queue" = queue.Queue(maxsize=self.depth)
            self.thread = threading.Thread(target=self._run, name="centered_merge-reader", daemon=True)
            self.thread.start()

    def _load(self, i):
        key = self.order[i]
        kind = self.kinds[key]
        group = self.inputs.group
        if i + 1 < len(self.order):  # the disk reads the next tensor while this one is scanned and merged
            for s in group:
                s.prefetch(self.order[i + 1])
        tensors = [s.get(key) for s in group]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if kind == "float":
            for t, s in zip(tensors, group):
                bad = count_nonfinite(t)
                if bad:
                    msg = (f"tensor {key!r} in {s.file_of(key)} holds {bad} NaN/Inf value(s) of {t.numel()}")
                    if not self.allow_nonfinite:
                        raise MergeInputError(msg + "; pass --allow-nonfinite (API: allow_nonfinite=True) "
                                                    "to merge anyway")
                    self.nonfinite.append(msg)
        event = None
        if self.cuda and kind == "float" and nbytes > self.stage_budget:
            host = tensors[:-1] if self.inputs.use_base else tensors
            base_t = tensors[-1].to(self.device) if self.inputs.use_base else None  # current stream: ordered
            return key, kind, _LazyDeviceInputs(host, self.device), base_t, nbytes, None
        if self.cuda and kind == "float":
            # pinned host staging + async H2D copy on a side stream; the compute stream waits on `event`
            staged = []
            with torch.cuda.stream(self.copy_stream):
                for t in tensors:
                    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    pinned.copy_(t)
                    staged.append(pinned.to(self.device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            tensors = staged
        if self.inputs.use_base:
            return key, kind, tensors[:-1], tensors[-1], nbytes, event
        return key, kind, tensors, None, nbytes, event

    def _run(self):
        try:
            for i in range(len(self.order)):
                if self._stop.is_set():
                    return
                self._put(self._load(i))  # the queue then holds the item; nothing here keeps it alive
            self.q.put(_STOP)
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            self._put(e)

    def _put(self, item) -> None:
        """Queue `item`, waiting for room, unless stop() is called meanwhile."""
        while not self._stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                pass

    def __iter__(self):
        if self.depth <= 0:
            for i in range(len(self.order)):
                yield self._load(i)
            return
        while True:
            item = self.q.get()
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            item = None  # the consumer is done with it: do not hold it while waiting for the next

    def stop(self):
        self._stop.set()
        if self.depth > 0:
            try:
                while True:
                    self.q.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=30)


def _cost(method, key: str, info: TensorInfo, kind: str, num_models: int) -> int:
    """Planned work for one tensor, to share tensors out between ranks: FLOPs plus bytes moved."""
    flops = method.plan_tensor(key, info.shape, info.dtype, num_models)["flops"] if kind == "float" else 0
    return int(flops) + info.nbytes * (num_models + 1)


def merge_checkpoints(models, out_dir, method: str = "cart", base=None, *, out_dtype=None, dtype=None,
                      device="auto", shard_size=5 * 10**9, overwrite: bool = False, progress: bool = True,
                      read_ahead: int = 2, allow_nonfinite: bool = False, trust_pickle: bool = False,
                      write_queue: int = 1, distributed: bool = False, **params) -> MergeReport:
    """Merge checkpoints tensor by tensor into an HF-style directory `out_dir`.

    models: paths (.safetensors file, HF directory, torch .bin/.pt), state dicts or nn.Modules, same keys and
    shapes. base: the same kinds of thing (needed by task_arithmetic and ties; for the others it is only where
    config.json and tokenizer files are copied from). out_dtype: storage dtype of merged float tensors (default:
    `dtype`, else the first model's). dtype: mergekit's compute dtype; accepted for compatibility, but
    accumulation is always float32 here, so it only sets the default out_dtype. params: the method's parameters
    (see centered_merge.methods). Returns a MergeReport. Raises MergeError subclasses naming file and tensor;
    on any failure nothing is left at out_dir.

    distributed=True: call it on every rank of an initialised torch.distributed group, with the same arguments;
    the ranks share the tensors out and write one output together (centered_merge.distributed). Otherwise the
    merge is a one-process merge even inside a process group.
    """
    t0 = time.perf_counter()
    m = get_method(method, **params)
    out_dt = parse_dtype(out_dtype, "out_dtype") or parse_dtype(dtype, "dtype")
    dev = resolve_device(device)
    shard_size = parse_size(shard_size)
    if int(read_ahead) < 0:
        raise MergeConfigError(f"read_ahead must be >= 0; got {read_ahead}")
    check_output_path(out_dir, overwrite)

    ctx = None
    if distributed:  # several processes (torch.distributed): each merges and writes a share
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise MergeConfigError("distributed=True needs an initialised torch.distributed process group "
                                   "(torchrun, then torch.distributed.init_process_group)")
        ctx = RankContext.current()  # None for a group of one: an ordinary merge
    inputs = _Inputs(models, base, m, trust_pickle)
    writer = reader = bar = None
    try:
        kinds = {k: inputs.check_meta(k) for k in inputs.keys}
        items = [(k, _out_info(inputs, k, kinds[k], out_dt)) for k in inputs.keys]
        owner = None
        if ctx is not None:
            owner = assign([(k, _cost(m, k, info, kinds[k], len(inputs.sources))) for k, info in items], ctx.world)
        mine = [(k, i) for k, i in items if owner is None or owner[k] == ctx.rank]
        total = sum(i.nbytes for _, i in mine)
        progress = progress and (ctx is None or ctx.rank == 0)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
                       file=sys.stderr, dynamic_ncols=True)
        done = [0]

        def on_written(name, nbytes):
            done[0] += 1
            if bar is not None:
                bar.update(nbytes)
                bar.set_postfix_str(f"{done[0]}/{len(mine)} tensors", refresh=False)

        if ctx is None:
            writer = ShardedWriter(out_dir, items, shard_size=shard_size, overwrite=overwrite,
                                   queue_depth=write_queue, on_written=on_written)
        else:
            fingerprint = json.dumps([m.describe(), [s.label for s in inputs.sources],
                                      inputs.base.label if inputs.base is not None else None, str(out_dt),
                                      allow_nonfinite], sort_keys=True, default=str)
            writer = PartitionedShardWriter(out_dir, items, ctx=ctx, owner=owner, shard_size=shard_size,
                                            overwrite=overwrite, on_written=on_written, fingerprint=fingerprint)
        reader = _Reader(inputs, writer.order, kinds, dev, read_ahead, allow_nonfinite)
        stats = {"read": 0, "merged": 0, "pass": 0}
        out_info = dict(items)
        clock = time.perf_counter
        waits = {"read": 0.0, "compute": 0.0, "write": 0.0, "finish": 0.0}
        items_iter = iter(reader)
        while True:
            ta = clock()
            try:
                key, kind, tensors, base_t, nbytes, event = next(items_iter)
            except StopIteration:
                break
            tb = clock()
            waits["read"] += tb - ta
            stats["read"] += nbytes
            want = out_info[key]
            if kind == "passthrough":
                check_group(key, list(tensors) + ([base_t] if base_t is not None else []), inputs.labels(key))
                out = tensors[0]
                stats["pass"] += 1
            else:
                if event is not None:
                    torch.cuda.current_stream(dev).wait_event(event)
                    for t in list(tensors) + ([base_t] if base_t is not None else []):
                        t.record_stream(torch.cuda.current_stream(dev))
                try:
                    merged = m.merge_tensor(key, tensors, base_t)
                except torch.cuda.OutOfMemoryError as e:
                    raise MergeError(f"tensor {key!r} {want.shape}: out of GPU memory ({str(e).splitlines()[0]}); "
                                     "try --device cpu") from None
                out, bad = ops.finalize(merged, want.dtype)
                del merged
                if bad:
                    msg = (f"merged tensor {key!r} has {bad} NaN/Inf value(s) after conversion to "
                           f"{str(want.dtype).replace('torch.', '')}")
                    if not allow_nonfinite:
                        raise MergeInputError(msg + " (values out of range for the output dtype?); pass "
                                                    "--allow-nonfinite to write it anyway, or pick --out-dtype")
                    reader.nonfinite.append(msg)
                if out.device.type != "cpu":
                    out = out.cpu()
                stats["merged"] += 1
            del tensors, base_t
            tc = clock()
            waits["compute"] += tc - tb
            writer.write(key, out)
            del out
            waits["write"] += clock() - tc
        counts, nonfinite = writer.finish([stats["merged"], stats["pass"], stats["read"]], list(reader.nonfinite))
        stats["merged"], stats["pass"], stats["read"] = counts
        for msg in nonfinite:
            warnings.warn(msg + " (merged anyway: allow_nonfinite)", stacklevel=2)
        ref = inputs.base if (inputs.base is not None and inputs.base.config_dir is not None) else next(
            (s for s in inputs.sources if s.config_dir is not None), None)
        float_dts = {i.dtype for k, i in items if kinds[k] == "float"}
        report = MergeReport(out_dir=Path(out_dir), method=m.describe(), tensors=len(items),
                             merged=stats["merged"], passthrough=stats["pass"], bytes_read=stats["read"],
                             bytes_written=sum(i.nbytes for _, i in items), seconds=0.0,
                             nonfinite_inputs=nonfinite)
        card = model_card(m.describe(), [s.label for s in inputs.sources],
                          inputs.base.label if inputs.base is not None else None,
                          sorted(str(d).replace("torch.", "") for d in float_dts), report)
        tf = clock()
        writer.commit(config_dir=ref.config_dir if ref is not None else None, card=card,
                      out_dtype=next(iter(float_dts)) if len(float_dts) == 1 else None)
        waits["finish"] = clock() - tf
        report.seconds = time.perf_counter() - t0
        report.timings = waits
        return report
    except BaseException:
        if reader is not None:
            reader.stop()
        if writer is not None:
            writer.abort()
        raise
    finally:
        if reader is not None:
            reader.stop()
        if bar is not None:
            bar.close()
        inputs.close()


def model_card(method: Dict[str, Any], models: Sequence[str], base: Optional[str], out_dtypes: Sequence[str],
               report: MergeReport) -> str:
    import yaml

    front = {"library_name": "transformers", "tags": ["merge", "centered_merge", str(method.get("method"))]}
    params = {k: v for k, v in method.items() if k != "method"}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        "# Merged model", "",
        f"Merged with centered_merge {library_version()} "
        f"using the **{method.get('method')}** method.", "",
        "## Inputs", "",
    ]
    lines += [f"- {m}" for m in models]
    if base is not None:
        lines += ["", f"Base model: {base}"]
    lines += ["", "## Method and parameters", "", "```yaml",
              yaml.safe_dump({"method": method.get("method"), "parameters": params}, sort_keys=True).rstrip(),
              "```", "",
              f"Output dtype of merged tensors: {', '.join(out_dtypes) or '-'}; "
              f"{report.merged} tensors merged, {report.passthrough} copied through unchanged.", ""]
    return "\n".join(lines)
