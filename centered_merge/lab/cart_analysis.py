"""CART's two analyses on the lab's models: accuracy vs rank ratio, and the spectrum of task vectors.

* Rank sweep: for each rank ratio r, lambda is chosen on validation (from the table's search); the curve
  reports validation and test accuracy of that merge. r = 1 is weight averaging (the centered vectors sum
  to zero). An *interior optimum* means the best rank (by validation) is neither the smallest nor r = 1.
* Spectrum: per weight matrix, the fraction of the squared Frobenius norm (energy) held by the top-k
  singular values, for the centered task vectors c_t = theta_t - mean(theta) and the usual (uncentered)
  task vectors tau_t = theta_t - theta_0, at k = max(1, floor(r * min(m, n))).
"""
from __future__ import annotations

import csv
import math
from typing import Dict, List, Sequence

import numpy as np
import torch

from .merging import matrix_view
from .table import Evaluator, TableResult, TaskModels, merge_with

SPECTRUM_RATIOS = (0.02, 0.04, 0.08, 0.12, 0.16, 0.25, 0.35, 0.5, 0.75, 1.0)


def best_cart_per_rank(res: TableResult) -> Dict[float, dict]:
    """For each CART rank ratio searched, the search entry (params, val) whose lambda scored best on validation."""
    by_rank: Dict[float, dict] = {}
    for s in res.search:
        if s["method"] != "cart":
            continue
        r = s["params"]["rank"]
        if r not in by_rank or s["val"] > by_rank[r]["val"] + 1e-12:
            by_rank[r] = s
    return by_rank


def rank_rows(res: TableResult, arch: str, test_acc) -> List[dict]:
    """CART's accuracy-vs-rank rows: per rank, the best-on-validation lambda and `test_acc(params)` (mean test)."""
    rows = []
    for r, s in sorted(best_cart_per_rank(res).items()):
        params = s["params"]
        rows.append({"arch": arch, "rank": r, "lam": params["lam"], "val": s["val"], "test": float(test_acc(params))})
    return rows


def rank_sweep(tm: TaskModels, res: TableResult) -> List[dict]:
    ev = Evaluator(tm.arch, tm.arch_kw, tm.tasks, tm.heads)
    return rank_rows(res, tm.arch, lambda params: ev.accs(merge_with(tm, "cart", params), "test").mean())


def interior_optimum(rows: Sequence[dict], key: str = "val") -> dict:
    """Where the best rank sits: 'interior' iff it is neither the smallest rank tried nor the largest."""
    ranks = [r["rank"] for r in rows]
    best = max(rows, key=lambda r: r[key])
    pos = "interior" if ranks[0] < best["rank"] < ranks[-1] else (
        "lowest rank tried" if best["rank"] == ranks[0] else "largest rank tried")
    worst = min(rows, key=lambda r: r[key])
    # the spread tells whether the optimum means anything: a flat curve has an "interior" best by noise
    return {"best_rank": best["rank"], "where": pos, key: best[key], "spread": best[key] - worst[key]}


def write_rank_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch", "rank_ratio", "best_lam_on_val", "val_mean", "test_mean"])
        for r in rows:
            w.writerow([r["arch"], r["rank"], r["lam"], f"{r['val']:.4f}", f"{r['test']:.4f}"])


def plot_rank_sweep(rows_by_arch: Dict[str, List[dict]], tables: Dict[str, TableResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows_by_arch), figsize=(5.2 * len(rows_by_arch), 3.8), squeeze=False)
    for ax, (arch, rows) in zip(axes[0], rows_by_arch.items()):
        x = [r["rank"] for r in rows]
        ax.plot(x, [100 * r["val"] for r in rows], "o-", label="CART, validation")
        ax.plot(x, [100 * r["test"] for r in rows], "s-", label="CART, test")
        styles = {"weight_average": ":", "task_arithmetic": "--", "ties": (0, (3, 1, 1, 1)), "individual": "-."}
        for row in tables[arch].rows:
            if row["method"] in styles:
                ax.axhline(100 * row["abs"], ls=styles[row["method"]], color="gray", lw=1,
                           label=f"{row['method']} (test, {100 * row['abs']:.1f})")
        ax.set_xscale("log")
        ax.set_xlabel("rank ratio r (k = r·min(m, n))")
        ax.set_ylabel("mean accuracy over tasks (%)")
        ax.set_title(f"{arch}: accuracy vs rank (λ chosen on val per r)")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spectrum_energy(tm: TaskModels, ratios: Sequence[float] = SPECTRUM_RATIOS) -> List[dict]:
    fts = [matrix_view(sd) for sd in tm.finetuned]
    pre = matrix_view(tm.pretrained)
    rows = []
    for name, w0 in pre.items():
        if w0.dim() != 2:
            continue
        stack = torch.stack([sd[name].double() for sd in fts])
        avg = stack.mean(0)
        m, n = w0.shape
        for vector, ref in (("centered", avg), ("uncentered", w0.double())):
            for t, task in enumerate(tm.task_names):
                s2 = torch.linalg.svdvals(stack[t] - ref) ** 2
                total = float(s2.sum())
                cum = torch.cumsum(s2, 0) / total if total > 0 else torch.ones_like(s2)
                for r in ratios:
                    k = max(1, int(math.floor(r * min(m, n))))
                    rows.append({"arch": tm.arch, "layer": name, "shape": f"{m}x{n}", "vector": vector,
                                 "task": task, "rank_ratio": r, "k": k, "energy": float(cum[k - 1]),
                                 "fro_norm": math.sqrt(total)})
    return rows


def write_spectrum_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch", "layer", "shape", "vector", "task", "rank_ratio", "k", "energy_frac_topk", "fro_norm"])
        for r in rows:
            w.writerow([r["arch"], r["layer"], r["shape"], r["vector"], r["task"], r["rank_ratio"], r["k"],
                        f"{r['energy']:.5f}", f"{r['fro_norm']:.5f}"])


def spectrum_summary(rows: Sequence[dict], ratio: float) -> List[dict]:
    """Mean over tasks of the top-k energy fraction at one rank ratio, per (arch, layer, vector)."""
    acc: Dict[tuple, list] = {}
    for r in rows:
        if r["rank_ratio"] == ratio:
            acc.setdefault((r["arch"], r["layer"], r["shape"], r["vector"]), []).append(r["energy"])
    out = []
    for (arch, layer, shape, vector), vals in acc.items():
        out.append({"arch": arch, "layer": layer, "shape": shape, "vector": vector, "ratio": ratio,
                    "energy_mean": float(np.mean(vals))})
    return out


def plot_spectrum(rows: Sequence[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = []
    for r in rows:
        key = (r["arch"], r["layer"], r["shape"])
        if key not in layers:
            layers.append(key)
    ncol = min(4, len(layers))
    nrow = int(math.ceil(len(layers) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.0 * nrow), squeeze=False)
    for ax, (arch, layer, shape) in zip(axes.flat, layers):
        for vector, color in (("centered", "C0"), ("uncentered", "C3")):
            sel = [r for r in rows if (r["arch"], r["layer"], r["vector"]) == (arch, layer, vector)]
            ratios = sorted({r["rank_ratio"] for r in sel})
            vals = np.array([[r["energy"] for r in sel if r["rank_ratio"] == q] for q in ratios])
            ax.plot(ratios, vals.mean(1), "o-", color=color, ms=3, label=f"{vector} (mean over tasks)")
            ax.fill_between(ratios, vals.min(1), vals.max(1), color=color, alpha=0.15)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{arch} {layer} ({shape})", fontsize=8)
        ax.set_xlabel("rank ratio k/min(m,n)", fontsize=8)
        ax.set_ylabel("energy in top-k", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
