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

    python bench/bench_cart_speed.py [--blocks 12] [--tasks 8] [--rank 0.12] [--threads N] [--repeats R]
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import torch

import centered_merge as cm
from centered_merge.linalg import resolve_sketch_dtype

SHAPES = {
    "attn.in_proj_weight": (2304, 768),
    "attn.out_proj.weight": (768, 768),
    "mlp.c_fc.weight": (3072, 768),
    "mlp.c_proj.weight": (768, 3072),
}


def make_models(blocks: int, tasks: int, decay: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    models = [{} for _ in range(tasks)]
    for b in range(blocks):
        for suffix, (m, n) in SHAPES.items():
            name = f"visual.transformer.resblocks.{b}.{suffix}"
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rank", type=float, default=0.12)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--decay", type=float, default=1.0, help="power-law exponent of the task spectra")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="time each matrix R times per approach, keep the best")
    ap.add_argument("--with-exact", action="store_true", help="also time svd=exact through centered_merge")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = make_models(args.blocks, args.tasks, args.decay)
    n_mat = len(models[0])
    params = sum(v.numel() for v in models[0].values())
    print(f"{args.tasks} tasks x {n_mat} matrices ({params / 1e6:.1f} M params per model), rank {args.rank}, "
          f"lambda {args.lam}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")

    def ours(**kw):
        return lambda sub: cm.cart(sub, rank=args.rank, lam=args.lam, select="all2d", **kw)

    auto = str(resolve_sketch_dtype("auto", 1, 1 << 20, 1 << 20, "cpu")).replace("torch.", "")
    approaches = {  # label -> function of a list of single-matrix state dicts
        "official approach (full SVD, then slice)": lambda sub: official_style(sub, args.rank, args.lam),
        f"centered_merge, randomized, default ({auto} sketch)": ours(),
        "centered_merge, randomized, float32 sketch": ours(sketch_dtype="float32"),
    }
    if args.with_exact:
        approaches["centered_merge, svd=exact"] = ours(svd="exact")
    labels = list(approaches)
    seconds = dict.fromkeys(labels, 0.0)
    merged = {label: {} for label in labels}
    by_shape = {}  # (label, shape) -> seconds
    for i, name in enumerate(models[0]):
        sub = [{name: m[name]} for m in models]
        shape = tuple(models[0][name].shape)
        for j in range(len(labels)):
            label = labels[(i + j) % len(labels)]
            best = math.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = approaches[label](sub)
                best = min(best, time.perf_counter() - t0)
            seconds[label] += best
            by_shape[label, shape] = by_shape.get((label, shape), 0.0) + best
            merged[label][name] = out[name]

    ref_label, default_label = labels[0], labels[1]
    t_ref = seconds[ref_label]
    print(f"{'approach':<58}{'seconds':>10}{'speed-up':>10}")
    for label in labels:
        print(f"{label:<58}{seconds[label]:>10.2f}{t_ref / seconds[label]:>10.2f}")
    print("default vs official, by matrix shape:")
    for shape in SHAPES.values():
        a, b = by_shape[ref_label, shape], by_shape[default_label, shape]
        print(f"  {shape[0]:>5} x {shape[1]:<5} {a:8.2f} s vs {b:6.2f} s  {a / b:6.2f}x")

    ref = merged[ref_label]
    avg = cm.merge(models, "weight_average")
    for label in labels[1:]:
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
