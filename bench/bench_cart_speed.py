"""CART speed: randomized truncated SVD (our default) vs the official code's approach (full SVD, then slice).

Synthetic 8-task set shaped like CLIP ViT-B/32's visual transformer: 12 blocks, each with attn.in_proj_weight
2304x768, attn.out_proj.weight 768x768, mlp.c_fc.weight 3072x768, mlp.c_proj.weight 768x3072, fp32. Task
weights are base + a full-rank difference with a power-law spectrum (sigma_i ~ i^-decay), as fine-tuning
differences tend to have.

All approaches run in this process on the same inputs, matrix by matrix and taking turns (the order rotates
from one matrix to the next), so that they see the same machine: on a shared VM the speed drifts by 20% and
more over the minutes a full run takes, which would otherwise land on whichever approach ran during a slow
spell. Each approach's time is the sum over the matrices (with --repeats R, of each matrix's fastest of R).
centered_merge is called through its public API, cm.cart, once per matrix.

Achieved GFLOP/s: the FLOPs CART's plan counts for the matrices (cm.methods.get_method("cart").plan_tensor)
over the measured time, printed next to the machine's GEMM peak (float32 and bfloat16 2048^3 GEMMs, best of 5,
measured at the start and at the end of the run; the higher reading is reported).
It also prints the time the default's large GEMMs alone would take at those peaks (gemm_floor) and so the most
this algorithm could gain over the official approach in that run.

--energy F also times energy mode (energy=F) against the fixed-rank default. --ab-tasks times cm.cart on the first
block with the T tasks' SVDs on one single-threaded worker per core (the default, threads.run_tasks) against one
task at a time on all threads (the previous way), alternating, best of --repeats (default 1 -> 5 here). --contend times cm.cart on the
first block in child processes, quiet and with one competing single-threaded busy process, under torch's default
thread policy (CENTERED_MERGE_WAIT_POLICY=keep: spinning threads, no one-thread fallback), under
OMP_WAIT_POLICY=PASSIVE (the policy threads.py chose before its measurement) and under centered_merge's
(threads.py: a short spin), interleaved.

    python bench/bench_cart_speed.py [--blocks 12] [--tasks 8] [--rank 0.12] [--threads N] [--repeats R]
                                     [--energy 0.9] [--contend] [--ab-tasks] [--set vit|llama] [--device cuda]

--device cuda runs every approach on the GPU (the models are copied there first, untimed; each approach's first
call, which creates the cuBLAS/cuSOLVER handles, is not timed) and measures the GEMM peaks there (8192^3).

--set llama times one Llama layer's q_proj (2048x2048), gate_proj (5632x2048) and down_proj (2048x5632) instead
(k = 245 at rank 0.12; use --tasks 4 --blocks 1 for the 0.5 B set's shape of work).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time

import centered_merge as cm  # before torch: both approaches then run under centered_merge's thread policy

import torch

from centered_merge.linalg import (fast_bf16_matmul, fast_int8_matmul, power_iterations, resolve_rank,
                                   resolve_sketch_dtype, sketch_width)

SHAPES = {
    "attn.in_proj_weight": (2304, 768),
    "attn.out_proj.weight": (768, 768),
    "mlp.c_fc.weight": (3072, 768),
    "mlp.c_proj.weight": (768, 3072),
}


# --set llama: the large matrices of one layer of the 4 x 0.5 B Llama-shaped set (hidden 2048, MLP 5632; k = 245)
LLAMA_SHAPES = {
    "self_attn.q_proj.weight": (2048, 2048),
    "mlp.gate_proj.weight": (5632, 2048),
    "mlp.down_proj.weight": (2048, 5632),
}
SETS = {"vit": ("visual.transformer.resblocks", SHAPES), "llama": ("model.layers", LLAMA_SHAPES)}


def make_models(blocks: int, tasks: int, decay: float, seed: int = 0, which: str = "vit"):
    g = torch.Generator().manual_seed(seed)
    models = [{} for _ in range(tasks)]
    prefix, shapes = SETS[which]
    for b in range(blocks):
        for suffix, (m, n) in shapes.items():
            name = f"{prefix}.{b}.{suffix}"
            base = torch.randn(m, n, generator=g) * 0.02
            r = min(m, n)
            s = torch.arange(1, r + 1, dtype=torch.float32) ** -decay
            for t in range(tasks):
                a = torch.randn(m, r, generator=g) * s
                models[t][name] = base + 1e-3 * (a @ torch.randn(r, n, generator=g)) / math.sqrt(r)
    return models


def official_style(models, rank: float, lam: float):
    """What the authors' code does, in plain torch: per matrix, full thin SVD of each centered task, slice, sum."""
    out = {}
    for name in models[0]:
        avg = sum(m[name] for m in models) / len(models)
        k = max(1, math.floor(rank * min(avg.shape)))
        acc = torch.zeros_like(avg)
        for m in models:
            u, s, vh = torch.linalg.svd(m[name] - avg, full_matrices=False)
            acc += (u[:, :k] * s[:k]) @ vh[:k]  # the authors' reconstruction, (U_k * s_k) @ Vh_k
        out[name] = avg + lam * acc
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak(dtype, size=None, repeats=5, device="cpu") -> float:
    """GFLOP/s (int8: Gop/s, torch._int_mm with int32 sums) of the best of `repeats` size^3 GEMMs in `dtype` on
    `device` (size: 2048 on a CPU, 8192 on a GPU, where a 2048^3 product is too short to reach the peak)."""
    cuda = torch.device(device).type == "cuda"
    size = size or (8192 if cuda else 2048)
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (size, size), dtype=torch.int8, device=device)
        mm = torch._int_mm
    else:
        a = torch.randn(size, size, device=device).to(dtype)
        mm = torch.mm
    mm(a, a)
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def planned_flops(models, **params) -> int:
    method = cm.methods.get_method("cart", select="all2d", **params)
    return sum(method.plan_tensor(k, tuple(v.shape), v.dtype, len(models))["flops"] for k, v in models[0].items())


def gemm_floor(models, rank: float, peaks, device="cpu") -> float:
    """Seconds the default's large GEMMs alone take at this run's peaks: per task, the 2q + 1 range-finder passes
    (2 m n w each) at the peak of the sketch dtype the default picks on `device` (int8 on CPUs with VNNI/AMX,
    bfloat16 on GPUs) and the float32 projection pass at the float32 peak (a second one, where
    the one-pass check declines, is not counted), and per matrix the float32 reconstruction (2 m n T k). QRs,
    Grams, eigenproblems, rounding and copies are left out, so no implementation of this algorithm at its accuracy
    (tests/test_linalg.py) runs faster than this."""
    T = len(models)
    total = 0.0
    for v in models[0].values():
        m, n = v.shape
        k = resolve_rank(rank, m, n)
        w, q = sketch_width(k), power_iterations(k, m, n)
        low = resolve_sketch_dtype("auto", k, m, n, device)
        total += T * (2 * q + 1) * 2 * m * n * w / (peaks[low] * 1e9)
        total += (T * 2 * m * n * w + 2 * m * n * T * k) / (peaks[torch.float32] * 1e9)
    return total


BUSY = "while True: pass"


def contend_child(argv):
    """Child of --contend: time cm.cart on block 0 of the set, print 'seconds'."""
    blocks, tasks, rank, repeats = int(argv[0]), int(argv[1]), float(argv[2]), int(argv[3])
    models = make_models(1, tasks, 1.0)
    cm.cart(models, rank=rank, select="all2d")  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        cm.cart(models, rank=rank, select="all2d")
        best = min(best, time.perf_counter() - t0)
    print(f"{best:.4f}")


def contend(args):
    """Quiet vs one busy competitor, torch's default thread policy vs centered_merge's, each in a fresh process
    (the OpenMP wait policy is read when torch loads), interleaved over --repeats rounds, best of each."""
    policies = {"torch default (spinning)": {"CENTERED_MERGE_WAIT_POLICY": "keep"},
                "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
                "centered_merge": {}}
    best = {}
    for _ in range(args.repeats):
        for busy in (False, True):
            load = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
            try:
                for label, extra in policies.items():
                    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                    env.update(extra)
                    out = subprocess.run([sys.executable, __file__, "--contend-child", "1", str(args.tasks),
                                          str(args.rank), "2"], env=env, capture_output=True, text=True, check=True)
                    key = (label, busy)
                    best[key] = min(best.get(key, math.inf), float(out.stdout.split()[-1]))
            finally:
                if load is not None:
                    load.kill()
                    load.wait()
    print(f"cm.cart, one block x {args.tasks} tasks, best of {args.repeats} rounds x 2 runs; load before: "
          f"{os.getloadavg()}")
    print(f"{'thread policy':<28}{'quiet s':>9}{'1 busy s':>10}{'busy/quiet':>12}")
    for label in policies:
        q, b = best[label, False], best[label, True]
        print(f"{label:<28}{q:>9.3f}{b:>10.3f}{b / q:>12.2f}")
    ours, theirs = best["centered_merge", False], best["torch default (spinning)", False]
    print(f"quiet: centered_merge's policy / torch default = {ours / theirs:.3f}")


def ab_tasks(args):
    """Tasks in parallel (one single-threaded worker per core) vs one task at a time on all threads, in turns."""
    from centered_merge.methods import cart as cart_module

    models = make_models(1, args.tasks, args.decay, which=args.set)
    parallel = cart_module.task_workers
    ways = {"tasks in parallel (default)": parallel, "one task at a time": lambda count: 1}
    best = dict.fromkeys(ways, math.inf)
    try:
        for _ in range(max(args.repeats, 5)):
            for label, workers in ways.items():
                cart_module.task_workers = workers  # the switch cart.py consults before taking the parallel path
                t0 = time.perf_counter()
                cm.cart(models, rank=args.rank, lam=args.lam, select="all2d")
                best[label] = min(best[label], time.perf_counter() - t0)
    finally:
        cart_module.task_workers = parallel
    print(f"cm.cart, one {args.set} block x {args.tasks} tasks, {torch.get_num_threads()} threads, best of "
          f"{max(args.repeats, 5)}; load after: {os.getloadavg()}")
    for label, sec in best.items():
        print(f"  {label:<30}{sec:8.3f} s")
    print(f"  parallel / one at a time = {best['tasks in parallel (default)'] / best['one task at a time']:.3f}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--contend-child":
        return contend_child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=tuple(SETS), default="vit",
                    help="vit: ViT-B/32's four block matrices; llama: q_proj, gate_proj, down_proj of the 0.5 B set")
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rank", type=float, default=0.12)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--decay", type=float, default=1.0, help="power-law exponent of the task spectra")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="time each matrix R times per approach, keep the best")
    ap.add_argument("--with-exact", action="store_true", help="also time svd=exact through centered_merge")
    ap.add_argument("--energy", type=float, default=None, help="also time energy mode with this fraction")
    ap.add_argument("--contend", action="store_true", help="quiet vs one busy process, thread policies (only)")
    ap.add_argument("--ab-tasks", action="store_true", help="tasks in parallel vs one at a time (only)")
    ap.add_argument("--device", default="cpu",
                    help="where every approach runs (cpu, cuda); the models are built on the CPU and copied there "
                         "first, outside the timings")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}")
    if args.contend:
        return contend(args)
    if args.ab_tasks:
        return ab_tasks(args)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    # the dtypes this device multiplies fast (the ones the default may pick); a bf16 GEMM on a CPU without
    # AVX512-BF16/AMX is emulated, ~40x slower than float32 (AMD EPYC, AVX2 only, 2026-12-04: 512^3 in 0.20 s
    # against 0.005 s), and would only measure the emulation
    peak_dtypes = ((torch.float32,) + ((torch.bfloat16,) if fast_bf16_matmul(dev) else ())
                   + ((torch.int8,) if fast_int8_matmul(dev) else ()))
    peaks = {dt: gemm_peak(dt, device=dev) for dt in peak_dtypes}

    models = make_models(args.blocks, args.tasks, args.decay, which=args.set)
    on_dev = [{k: v.to(dev) for k, v in m.items()} for m in models] if cuda else models
    n_mat = len(models[0])
    params = sum(v.numel() for v in models[0].values())
    print(f"{args.tasks} tasks x {n_mat} matrices ({params / 1e6:.1f} M params per model), rank {args.rank}, "
          f"lambda {args.lam}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine()}")

    def ours(**kw):
        return lambda sub: cm.cart(sub, rank=args.rank, lam=args.lam, select="all2d", **kw)

    auto = str(resolve_sketch_dtype("auto", 1, *SHAPES["mlp.c_fc.weight"], dev)).replace("torch.", "")
    approaches = {  # label -> function of a list of single-matrix state dicts
        "official approach (full SVD, then slice)": lambda sub: official_style(sub, args.rank, args.lam),
        f"centered_merge, randomized, default ({auto} sketch)": ours(),
        "centered_merge, randomized, float32 sketch": ours(sketch_dtype="float32"),
    }
    if auto != "bfloat16" and torch.bfloat16 in peaks:  # the previous CPU default, timed in the same run
        approaches["centered_merge, randomized, bfloat16 sketch"] = ours(sketch_dtype="bfloat16")
    if args.with_exact:
        approaches["centered_merge, svd=exact"] = ours(svd="exact")
    if args.energy is not None:
        approaches[f"centered_merge, energy={args.energy}"] = (
            lambda sub: cm.cart(sub, energy=args.energy, lam=args.lam, select="all2d"))
    labels = list(approaches)
    seconds = dict.fromkeys(labels, 0.0)
    merged = {label: {} for label in labels}
    by_shape = {}  # (label, shape) -> seconds
    if cuda:  # the first call of each approach on the device pays for contexts and library handles: not timed
        first = next(iter(models[0]))
        for label in labels:
            approaches[label]([{first: m[first]} for m in on_dev])
        sync(dev)
    for i, name in enumerate(models[0]):
        sub = [{name: m[name]} for m in on_dev]
        shape = tuple(models[0][name].shape)
        for j in range(len(labels)):
            label = labels[(i + j) % len(labels)]
            best = math.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = approaches[label](sub)
                sync(dev)
                best = min(best, time.perf_counter() - t0)
            seconds[label] += best
            by_shape[label, shape] = by_shape.get((label, shape), 0.0) + best
            merged[label][name] = out[name].cpu()

    ref_label, default_label = labels[0], labels[1]
    t_ref = seconds[ref_label]
    for dt in peaks:
        peaks[dt] = max(peaks[dt], gemm_peak(dt, device=dev))
    flops = {label: planned_flops(models, rank=args.rank) for label in labels[1:]
             if label.startswith("centered_merge, randomized")}  # the plan's count does not depend on the dtype
    print(f"load average after: {os.getloadavg()}")
    print(f"GEMM peak measured in this run ({dev.type}): float32 {peaks[torch.float32]:.0f} GFLOP/s"
          + (f", bfloat16 {peaks[torch.bfloat16]:.0f} GFLOP/s" if torch.bfloat16 in peaks else "")
          + (f", int8 {peaks[torch.int8]:.0f} Gop/s" if torch.int8 in peaks else ""))
    print(f"{'approach':<58}{'seconds':>10}{'speed-up':>10}{'GFLOP/s':>10}")
    for label in labels:
        rate = f"{flops[label] / seconds[label] / 1e9:10.0f}" if label in flops else ""
        print(f"{label:<58}{seconds[label]:>10.2f}{t_ref / seconds[label]:>10.2f}{rate}")
    achieved = flops[default_label] / seconds[default_label] / 1e9  # GFLOP/s
    print(f"default: {achieved / 1e3:.2f} TFLOP/s achieved, "
          + (f"{achieved / peaks[torch.bfloat16]:.1%} of the bfloat16 and " if torch.bfloat16 in peaks else "")
          + f"{achieved / peaks[torch.float32]:.1%} of the float32 GEMM peak")
    floor = gemm_floor(models, args.rank, peaks, dev)
    print(f"the default's large GEMMs alone at this run's peaks: {floor:.2f} s, i.e. at most "
          f"{t_ref / floor:.1f}x the official approach for this algorithm (default: {seconds[default_label] / floor:.2f}x "
          "that floor)")
    if args.energy is not None:
        e_label = f"centered_merge, energy={args.energy}"
        print(f"energy mode / fixed-rank default: {seconds[e_label] / seconds[default_label]:.2f}x")
    print("default vs official, by matrix shape:")
    for shape in SETS[args.set][1].values():
        a, b = by_shape[ref_label, shape], by_shape[default_label, shape]
        print(f"  {shape[0]:>5} x {shape[1]:<5} {a:8.2f} s vs {b:6.2f} s  {a / b:6.2f}x")

    ref = merged[ref_label]
    avg = cm.merge(models, "weight_average")
    for label in labels[1:]:
        if label.startswith("centered_merge, energy"):
            continue  # another rank per matrix: not comparable with the fixed-rank official merge
        got = merged[label]
        num = sum((got[k] - ref[k]).double().pow(2).sum() for k in ref).sqrt().item()
        den = sum(ref[k].double().pow(2).sum() for k in ref).sqrt().item()
        den_delta = sum((ref[k] - avg[k]).double().pow(2).sum() for k in ref).sqrt().item()
        print(f"{label}: relative Frobenius difference to the official merge over all matrices {num / den:.2e}"
              f" (relative to the low-rank update, merged - average: {num / den_delta:.2e})")
    if args.with_exact:
        exact = merged["centered_merge, svd=exact"]
        worst = max(((exact[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)
        print(f"svd=exact vs official, worst matrix: relative Frobenius difference {worst:.2e}")


if __name__ == "__main__":
    main()
