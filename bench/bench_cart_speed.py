"""CART speed: randomized truncated SVD (our default) vs the official code's approach (full SVD, then slice).

Synthetic 8-task set shaped like CLIP ViT-B/32's visual transformer: 12 blocks, each with attn.in_proj_weight
2304x768, attn.out_proj.weight 768x768, mlp.c_fc.weight 3072x768, mlp.c_proj.weight 768x3072, fp32. Task
weights are base + a full-rank difference with a power-law spectrum (sigma_i ~ i^-decay), as fine-tuning
differences tend to have. Both merges run in this process, one after the other, on the same inputs.

    python bench/bench_cart_speed.py [--blocks 12] [--tasks 8] [--rank 0.12] [--threads N]
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import torch

import centered_merge as cm

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
            acc += u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        out[name] = avg + lam * acc
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rank", type=float, default=0.12)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--decay", type=float, default=1.0, help="power-law exponent of the task spectra")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = make_models(args.blocks, args.tasks, args.decay)
    n_mat = len(models[0])
    params = sum(v.numel() for v in models[0].values())
    print(f"{args.tasks} tasks x {n_mat} matrices ({params / 1e6:.1f} M params per model), rank {args.rank}, "
          f"lambda {args.lam}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")

    ours, t_ours = timed(lambda: cm.cart(models, rank=args.rank, lam=args.lam, select="all2d"))
    ref, t_ref = timed(lambda: official_style(models, args.rank, args.lam))
    exact, t_exact = timed(lambda: cm.cart(models, rank=args.rank, lam=args.lam, select="all2d", svd="exact"))

    avg = cm.merge(models, "weight_average")
    num = sum((ours[k] - ref[k]).double().pow(2).sum() for k in ref).sqrt().item()
    den = sum(ref[k].double().pow(2).sum() for k in ref).sqrt().item()
    den_delta = sum((ref[k] - avg[k]).double().pow(2).sum() for k in ref).sqrt().item()
    ex_diff = max(((exact[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)

    print(f"{'approach':<44}{'seconds':>10}{'speed-up':>10}")
    print(f"{'official approach (full SVD, then slice)':<44}{t_ref:>10.2f}{1.0:>10.2f}")
    print(f"{'centered_merge, svd=exact':<44}{t_exact:>10.2f}{t_ref / t_exact:>10.2f}")
    print(f"{'centered_merge, svd=randomized (default)':<44}{t_ours:>10.2f}{t_ref / t_ours:>10.2f}")
    print(f"relative Frobenius difference, randomized vs official, over all merged matrices: {num / den:.2e}")
    print(f"  ... relative to the low-rank update itself (merged - average): {num / den_delta:.2e}")
    print(f"  exact mode vs official, worst matrix: {ex_diff:.2e}")


if __name__ == "__main__":
    main()
