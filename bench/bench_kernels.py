"""One table: each native kernel beside its eager-torch twin, on 64 MB-class tensors, with the memcpy bandwidth
measured in the same run.

    .venv/bin/python bench/bench_kernels.py [--repeats 7] [--quick] [--only mean_fp32,...] [--json out.json]
                                            [--device cpu|cuda] [--via ops|kernels]

--via kernels runs the native side through the public DLPack API (centered_merge.kernels) instead of the ops
wrappers: numpy arrays on the CPU where numpy has the dtype (torch tensors for bfloat16), cupy arrays on CUDA
when cupy is installed; the torch side stays the eager twin. The difference between the two runs is the cost
of the DLPack exchange and the ops table's dispatch.

Columns: kernel, case, shape, dtype, native ms, torch ms (median of --repeats runs each, interleaved), ratio
(torch / native), GB/s achieved by the native kernel and its share of memcpy GB/s. "GB/s" counts the bytes a
kernel must move at least: every input read once and the output written once (TIES and DARE make more passes
than that; their GB/s is still computed from the minimal traffic, so it understates the bytes actually moved).
memcpy GB/s is torch's dst.copy_(src) on a preallocated 256 MiB float32 buffer, counted the same way (read +
write), timed interleaved with each row's runs (so a drifting machine load affects both alike). The kernels'
times include allocating their output (as the ops do); the memcpy's does not.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from centered_merge import _native
from centered_merge.ops import native as N
from centered_merge.ops import reference as R

MiB = 1 << 20


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device):
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def measure(native_fn, torch_fn, copy_fn, repeats, device):
    """Median seconds of native, torch and memcpy, interleaved so that drifting load hits all three alike."""
    native_fn(), torch_fn(), copy_fn()  # warm-up (page faults, thread pools)
    tn, tt, tc = [], [], []
    for _ in range(repeats):
        tc.append(_time(copy_fn, device))
        tn.append(_time(native_fn, device))
        tt.append(_time(torch_fn, device))
    return statistics.median(tn), statistics.median(tt), statistics.median(tc), min(tn), min(tt), min(tc)


class Memcpy:
    """torch's dst.copy_(src) on a 256 MiB float32 buffer; GB/s counts read + write."""

    def __init__(self, device):
        self.src = torch.full((64 * MiB,), 1.5, device=device)
        self.dst = torch.empty_like(self.src)
        self.bytes = 2 * self.src.numel() * 4

    def __call__(self):
        self.dst.copy_(self.src)


def esize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def cases(quick, device):
    big = (2048, 8192) if quick else (4096, 8192)  # 32 Mi elements: 64 MiB in bf16, 128 MiB as float32
    mid = (2048, 4096) if quick else (2048, 8192)  # 16 Mi elements: 64 MiB as float32
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(shape, dtype, seed_scale=1.0):
        return (torch.randn(shape, generator=gen) * seed_scale).to(dtype).to(device)

    out = []
    for dtype, shape in ((torch.bfloat16, big), (torch.float32, mid)):
        T = 8
        xs = [rnd(shape, dtype) for _ in range(T)]
        n = xs[0].numel()
        out.append(dict(kernel="mean_fp32", case=f"T={T}", shape=shape, dtype=dtype, bytes=n * (T * esize(dtype) + 4),
                        native=lambda xs=xs: N.mean_fp32(xs), torch=lambda xs=xs: R.mean_fp32(xs)))
        m = R.mean_fp32(xs)
        buf = torch.empty(shape, device=device)
        # the same mean into a buffer reused across calls (as the memcpy is): the kernel without the allocation
        # and first-touch page faults of a fresh 4-byte-per-element output
        out.append(dict(kernel="mean_fp32", case=f"T={T}, out= reused", shape=shape, dtype=dtype,
                        bytes=n * (T * esize(dtype) + 4),
                        native=lambda xs=xs, b=buf: N.mean_fp32(xs, out=b),
                        torch=lambda xs=xs, b=buf: R.mean_fp32(xs, out=b)))
        out.append(dict(kernel="center_into", case="W_t - M", shape=shape, dtype=dtype, bytes=n * (esize(dtype) + 8),
                        native=lambda w=xs[0], m=m, b=buf: N.center_into(w, m, b),
                        torch=lambda w=xs[0], m=m, b=buf: R.center_into(w, m, b)))
        if dtype == torch.bfloat16:
            T2 = 2
            out.append(dict(kernel="mean_fp32", case=f"T={T2}", shape=shape, dtype=dtype,
                            bytes=n * (T2 * esize(dtype) + 4),
                            native=lambda xs=xs[:T2]: N.mean_fp32(xs), torch=lambda xs=xs[:T2]: R.mean_fp32(xs)))
            add = torch.randn(shape, generator=gen).to(device) * 0.01
            out.append(dict(kernel="finalize", case="bf16(x+add), count NaN/Inf", shape=shape, dtype=dtype,
                            bytes=n * (4 + 4 + 2),
                            native=lambda m=m, a=add: N.finalize(m, torch.bfloat16, a),
                            torch=lambda m=m, a=add: R.finalize(m, torch.bfloat16, a)))
            out.append(dict(kernel="dare", case="p=0.9", shape=shape, dtype=dtype, bytes=n * (2 + 4),
                            native=lambda t=xs[1]: N.dare(t, 0.9, 1234), torch=lambda t=xs[1]: R.dare(t, 0.9, 1234)))
        del xs
    # fused linear kernels vs the twins' unfused passes: T = 4 bf16 inputs (+ base), bf16 output written directly
    T = 4
    lx = [rnd(big, torch.bfloat16) for _ in range(T)]
    lbase = rnd(big, torch.bfloat16)
    n = lx[0].numel()
    w = [0.25] * T
    out.append(dict(kernel="linear_merge", case=f"T={T} -> bf16", shape=big, dtype=torch.bfloat16,
                    bytes=n * (T * 2 + 2),
                    native=lambda: N.linear_merge(lx, w, torch.bfloat16), torch=lambda: R.linear_merge(lx, w, torch.bfloat16)))
    out.append(dict(kernel="task_arithmetic_merge", case=f"T={T} lam=0.3 -> bf16", shape=big, dtype=torch.bfloat16,
                    bytes=n * (T * 2 + 2 + 2),
                    native=lambda: N.task_arithmetic_merge(lx, lbase, [1.0] * T, 0.3, torch.bfloat16),
                    torch=lambda: R.task_arithmetic_merge(lx, lbase, [1.0] * T, 0.3, torch.bfloat16)))
    # TIES on 16 Mi elements (64 MiB as float32), bf16 inputs, T = 4
    T = 4
    base = rnd(mid, torch.bfloat16)
    txs = [(base.float() + rnd(mid, torch.float32, 0.01)).to(torch.bfloat16) for _ in range(T)]
    n = base.numel()
    out.append(dict(kernel="ties_merge", case=f"T={T} density=0.2", shape=mid, dtype=torch.bfloat16,
                    bytes=n * (T * 2 + 2 + 4),
                    native=lambda: N.ties_merge(txs, base, 0.2, 1.0), torch=lambda: R.ties_merge(txs, base, 0.2, 1.0)))
    return out


class ViaKernels:
    """The ops wrappers' signatures, served by centered_merge.kernels on numpy (CPU) or cupy (CUDA) arrays."""

    def __init__(self, device):
        from centered_merge import kernels

        self.k = kernels
        self.lib = None
        try:
            if device == "cuda":
                import cupy as lib  # noqa: PLC0415
            else:
                import numpy as lib  # noqa: PLC0415
            self.lib = lib
        except ImportError:
            pass
        self.cache = {}

    def _a(self, t):
        """t as the library's array (same memory), made once per tensor; torch itself where the library lacks
        the dtype (numpy and bfloat16)."""
        if self.lib is None or t.dtype == torch.bfloat16:
            return t
        key = id(t)
        if key not in self.cache:
            self.cache[key] = (t, self.lib.from_dlpack(t))
        return self.cache[key][1]

    def mean_fp32(self, xs, weights=None, out=None):
        return self.k.mean([self._a(x) for x in xs], weights, None if out is None else self._a(out))

    def center_into(self, w, m, out):
        return self.k.center(self._a(w), self._a(m), self._a(out))

    def finalize(self, x, dtype, add=None):
        if dtype == torch.bfloat16 and self.lib is not None and self.lib.__name__ == "numpy":
            return self.k.finalize(x, dtype, add)  # numpy cannot hold the bfloat16 result: torch in, torch out
        return self.k.finalize(self._a(x), dtype, None if add is None else self._a(add))

    def ties_merge(self, xs, base, density, lam):
        return self.k.ties([self._a(x) for x in xs], self._a(base), density, lam)

    def dare(self, tau, p, seed):
        return self.k.dare(self._a(tau), p, seed)

    def linear_merge(self, xs, w, out_dtype=None):
        return self.k.linear([self._a(x) for x in xs], w, out_dtype)  # bf16 inputs stay torch (see _a)

    def task_arithmetic_merge(self, xs, base, w, lam, out_dtype=None):
        return self.k.task_arithmetic([self._a(x) for x in xs], self._a(base), w, lam, out_dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="half-size tensors (smoke run)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", default=None, help="comma-separated kernel names")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--via", default="ops", choices=["ops", "kernels"],
                    help="native side through the ops wrappers (default) or the DLPack API centered_merge.kernels")
    args = ap.parse_args(argv)
    global N
    if args.via == "kernels":
        N = ViaKernels(args.device)
    if _native.get() is None:
        sys.exit(f"native extension not available: {_native.error()}")
    if args.device == "cuda" and not _native.cuda_usable():
        sys.exit(f"no native CUDA: {_native.cuda_why_not()}")

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, {os.cpu_count()} CPUs"
    print(f"# device: {dev}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; repeats={args.repeats} (medians); "
          f"load average before: {os.getloadavg()[0]:.1f}; native via {args.via}; "
          f"CPU ISA {_native.get().build_info()['cpu_isa']}")
    mc = Memcpy(args.device)
    print("| kernel | case | shape | dtype | native ms | torch ms | ratio | GB/s | memcpy GB/s | % of memcpy |")
    print("|" + "---|" * 10)
    rows = []
    only = set(args.only.split(",")) if args.only else None
    for c in cases(args.quick, args.device):
        if only and c["kernel"] not in only:
            continue
        tn, tt, tc, tn_min, tt_min, tc_min = measure(c["native"], c["torch"], mc, args.repeats, args.device)
        gbs, mgbs = c["bytes"] / tn / 1e9, mc.bytes / tc / 1e9
        row = dict(kernel=c["kernel"], case=c["case"], shape="x".join(map(str, c["shape"])),
                   dtype=str(c["dtype"]).replace("torch.", ""), native_ms=tn * 1e3, torch_ms=tt * 1e3,
                   ratio=tt / tn, gbs=gbs, memcpy_gbs=mgbs, pct_memcpy=100 * gbs / mgbs,
                   native_ms_min=tn_min * 1e3, torch_ms_min=tt_min * 1e3, memcpy_gbs_best=mc.bytes / tc_min / 1e9)
        rows.append(row)
        print(f"| {row['kernel']} | {row['case']} | {row['shape']} | {row['dtype']} | {row['native_ms']:.1f} | "
              f"{row['torch_ms']:.1f} | {row['ratio']:.2f}x | {gbs:.1f} | {mgbs:.1f} | {row['pct_memcpy']:.0f}% |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
