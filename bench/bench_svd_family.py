"""TSV-M, Iso-C and Iso-CTS on one large matrix: the Gram routes (methods/svd_family.py) against the plain SVD
routes they replace, with CART at its default for scale (not a test).

The SVD routes are the same code with svd_family.GRAM_MIN_RATIO set to infinity, which sends every polar factor
and exact top-k SVD to LAPACK's thin SVD (the implementation before the Gram routes). Both run in this process
on the same T task matrices (base + 0.02 * N(0, 1) noise, float32), taking turns, so they see the same machine.
For each method it prints seconds per route, the ratio, and the relative Frobenius difference of the two merged
task vectors (the Gram route must equal the SVD route to float32 accuracy).

    python bench/bench_svd_family.py                          # 32000 x 2048 (a Llama embedding / lm_head), T = 4
    python bench/bench_svd_family.py --shape 5632 2048 --T 4  # a Llama-1B MLP matrix
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import centered_merge as cm  # noqa: E402  (before torch: its thread policy)
import torch  # noqa: E402

from centered_merge.methods import get_method, svd_family  # noqa: E402

GRAM, SVD = "Gram route", "SVD route"


def run(method: str, inputs, base, route: str, **params):
    saved = svd_family.GRAM_MIN_RATIO
    svd_family.GRAM_MIN_RATIO = saved if route == GRAM else float("inf")
    try:
        m = get_method(method, **params)
        t0 = time.perf_counter()
        out = m.merge_tensor("model.embed_tokens.weight", inputs, base if m.needs_base else None)
        return time.perf_counter() - t0, out
    finally:
        svd_family.GRAM_MIN_RATIO = saved


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=[32000, 2048])
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=["tsv", "iso_c", "iso_cts"])
    args = ap.parse_args()
    m, n = args.shape
    g = torch.Generator().manual_seed(0)
    base = torch.randn(m, n, generator=g).mul_(0.02)
    inputs = [base + torch.randn(m, n, generator=g).mul_(0.002) for _ in range(args.T)]
    print(f"# {m} x {n}, T = {args.T}, float32, torch threads {torch.get_num_threads()}, "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    small = [x[:64, :48].contiguous() for x in inputs]
    for method in args.methods:  # warm-up: first calls load LAPACK paths and allocate thread pools
        for route in (GRAM, SVD):
            run(method, small, base[:64, :48].contiguous(), route)
    print("| method | Gram route s | SVD route s | SVD ÷ Gram | rel. difference |")
    print("|---|---|---|---|---|")
    for i, method in enumerate(args.methods):
        order = (GRAM, SVD) if i % 2 == 0 else (SVD, GRAM)
        res = {route: run(method, inputs, base, route) for route in order}
        (tg, og), (ts, os_) = res[GRAM], res[SVD]
        diff = (torch.linalg.norm((og - os_).flatten().double()) /
                torch.linalg.norm((os_ - base).flatten().double())).item()
        print(f"| {method} | {tg:.1f} | {ts:.1f} | {ts / tg:.2f} | {diff:.1e} |", flush=True)
    t, _ = run("cart", inputs, base, GRAM, select="all2d")  # CART's default selection leaves embeddings out
    print(f"| cart (rank 0.12, randomized, the matrix selected; for scale) | {t:.1f} | | | |")
    print(f"# load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
