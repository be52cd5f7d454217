"""The three analyses of "Rethinking Weight-Averaged Model-merging" on the digits.

1. Patterns in weights: a linear classifier on raw 8x8 pixels; each class row shown as an image beside the
   class's mean training image, and blended rows 0.5*w_i + 0.5*w_j beside the blended means.
2. Merging vs ensembling: N models fine-tuned (whole model) from one pretrained init with different seeds;
   uniform soup, greedy soup, logit ensemble, feature ensemble (mean features -> averaged head),
   greedy logit ensemble, for N in {2, 3, 5}, MLP and CNN. Soups are merged with the library
   (method="weight_average").
3. Weight-magnitude sensitivity: every parameter multiplied by a factor (x100) for all models, only the first,
   or all but the last; accuracy of each model, the soups and the ensembles.
Greedy choices use the validation split; reported accuracies are on the test split.
"""
from __future__ import annotations

import csv
import math
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import TaskData
from .merging import merge
from .train import build, features, fit_full_batch

StateDict = Dict[str, torch.Tensor]

BLEND_PAIRS = ((0, 6), (1, 7), (3, 8), (4, 9), (2, 5))


# ------------------------------------------------------------------------------- 1. patterns in weights
def linear_templates(task: TaskData, seed: int = 0, steps: int = 500, lr: float = 0.05,
                     weight_decay: float = 1e-2) -> dict:
    """Softmax regression on raw pixels; returns weights, class means, blends and their agreement."""
    torch.manual_seed(seed)
    x = task.train.x.reshape(len(task.train.x), 64)
    lin = torch.nn.Linear(64, 10)
    fit_full_batch(lin, x, task.train.y, steps, lr, weight_decay)
    with torch.no_grad():
        acc = (lin(task.test.x.reshape(-1, 64)).argmax(1) == task.test.y).float().mean().item()
    w = lin.weight.detach().numpy().copy()
    means = np.stack([x[task.train.y == c].mean(0).numpy() for c in range(10)])
    centered = means - means.mean(0, keepdims=True)

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))

    rows = []
    for c in range(10):
        cs = [corr(w[c], centered[j]) for j in range(10)]
        rows.append({"kind": "class", "classes": str(c), "corr_row_vs_mean": corr(w[c], means[c]),
                     "corr_row_vs_centered_mean": cs[c], "best_matching_class": int(np.argmax(cs)),
                     "test_acc_linear": acc})
    blends = []
    for i, j in BLEND_PAIRS:
        wb, mb = 0.5 * (w[i] + w[j]), 0.5 * (centered[i] + centered[j])
        blends.append((i, j, wb, 0.5 * (means[i] + means[j])))
        rows.append({"kind": "blend", "classes": f"{i}+{j}", "corr_row_vs_mean": corr(wb, 0.5 * (means[i] + means[j])),
                     "corr_row_vs_centered_mean": corr(wb, mb), "best_matching_class": -1,
                     "test_acc_linear": acc})
    return {"weights": w, "means": means, "blends": blends, "rows": rows, "acc": acc}


def plot_templates(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 10, figsize=(12, 5.4))
    for c in range(10):
        axes[0, c].imshow(res["means"][c].reshape(8, 8), cmap="gray_r")
        axes[0, c].set_title(f"mean {c}", fontsize=8)
        v = np.abs(res["weights"][c]).max()
        axes[1, c].imshow(res["weights"][c].reshape(8, 8), cmap="RdBu_r", vmin=-v, vmax=v)
        axes[1, c].set_title(f"row w{c}", fontsize=8)
    for p, (i, j, wb, mb) in enumerate(res["blends"]):
        axes[2, 2 * p].imshow(mb.reshape(8, 8), cmap="gray_r")
        axes[2, 2 * p].set_title(f"means {i}+{j}", fontsize=8)
        v = np.abs(wb).max()
        axes[2, 2 * p + 1].imshow(wb.reshape(8, 8), cmap="RdBu_r", vmin=-v, vmax=v)
        axes[2, 2 * p + 1].set_title(f"½(w{i}+w{j})", fontsize=8)
    # last row: class mean minus the mean over classes, what a softmax row can encode (its shift is free)
    centered = res["means"] - res["means"].mean(0, keepdims=True)
    for c in range(10):
        v = np.abs(centered[c]).max()
        axes[3, c].imshow(centered[c].reshape(8, 8), cmap="RdBu_r", vmin=-v, vmax=v)
        axes[3, c].set_title(f"mean {c} − all means", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Linear classifier on raw digits (test acc {100 * res['acc']:.1f}%): class means, weight rows "
                 f"(red +, blue −), blended rows, centered class means", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_templates_csv(res: dict, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        keys = ["kind", "classes", "corr_row_vs_mean", "corr_row_vs_centered_mean", "best_matching_class",
                "test_acc_linear"]
        w.writerow(keys)
        for r in res["rows"]:
            w.writerow([f"{r[k]:.4f}" if isinstance(r[k], float) else r[k] for k in keys])


# ----------------------------------------------------------------------- 2. merging vs ensembling
class _Outputs:
    """Features and logits of classifier state dicts on one task split."""

    def __init__(self, arch: str, arch_kw: dict, task: TaskData):
        self.model = build(arch, arch_kw)
        self.task = task

    @torch.no_grad()
    def feats_logits(self, sd: StateDict, split: str):
        self.model.load_state_dict(sd)
        f = features(self.model.encoder, self.task.split(split).x)
        return f, self.model.head(f)

    def acc_logits(self, logits: torch.Tensor, split: str) -> float:
        return (logits.argmax(1) == self.task.split(split).y).float().mean().item()

    def acc(self, sd: StateDict, split: str) -> float:
        return self.acc_logits(self.feats_logits(sd, split)[1], split)


def _soup(models: Sequence[StateDict]) -> StateDict:
    return merge(list(models), "weight_average")


def _greedy_order(out: _Outputs, models: Sequence[StateDict]) -> List[int]:
    vals = [out.acc(m, "val") for m in models]
    return sorted(range(len(models)), key=lambda i: -vals[i])


def compare(out: _Outputs, models: Sequence[StateDict]) -> Dict[str, float]:
    """Test accuracy of each way of combining ``models`` (greedy choices on validation)."""
    res: Dict[str, float] = {}
    test = [out.feats_logits(m, "test") for m in models]
    indiv = [out.acc_logits(l, "test") for _, l in test]
    res["individual_mean"] = float(np.mean(indiv))
    res["individual_best"] = float(np.max(indiv))
    res["uniform_soup"] = out.acc(_soup(models), "test")
    order = _greedy_order(out, models)
    chosen = [order[0]]
    best_val = out.acc(models[order[0]], "val")
    for i in order[1:]:
        v = out.acc(_soup([models[j] for j in chosen + [i]]), "val")
        if v >= best_val:
            chosen, best_val = chosen + [i], v
    res["greedy_soup"] = out.acc(_soup([models[j] for j in chosen]), "test")
    res["greedy_soup_size"] = float(len(chosen))
    res["logit_ensemble"] = out.acc_logits(torch.stack([l for _, l in test]).mean(0), "test")
    mean_feat = torch.stack([f for f, _ in test]).mean(0)
    head = _soup([{k: v for k, v in m.items() if k.startswith("head.")} for m in models])
    res["feature_ensemble"] = out.acc_logits(F.linear(mean_feat, head["head.weight"], head["head.bias"]), "test")
    # greedy logit ensemble on validation
    val = [out.feats_logits(m, "val")[1] for m in models]
    chosen = [order[0]]
    best_val = out.acc_logits(val[order[0]], "val")
    for i in order[1:]:
        v = out.acc_logits(torch.stack([val[j] for j in chosen + [i]]).mean(0), "val")
        if v >= best_val:
            chosen, best_val = chosen + [i], v
    res["greedy_ensemble"] = out.acc_logits(torch.stack([test[j][1] for j in chosen]).mean(0), "test")
    return res


def merge_vs_ensemble(arch: str, arch_kw: dict, task: TaskData, models: Sequence[StateDict],
                      ns: Sequence[int] = (2, 3, 5)) -> List[dict]:
    out = _Outputs(arch, arch_kw, task)
    rows = []
    for n in ns:
        if n > len(models):
            raise ValueError(f"merge_vs_ensemble: N={n} but only {len(models)} models were trained")
        for method, acc in compare(out, models[:n]).items():
            rows.append({"arch": arch, "task": task.name, "N": n, "method": method, "test_acc": acc})
    return rows


# ------------------------------------------------------------------------- 3. weight-magnitude scaling
SCALING_VARIANTS = ("none", "all", "first_only", "all_but_last")


def _scaled(models: Sequence[StateDict], variant: str, factor: float) -> List[StateDict]:
    n = len(models)
    pick = {"none": lambda i: False, "all": lambda i: True, "first_only": lambda i: i == 0,
            "all_but_last": lambda i: i < n - 1}[variant]
    return [{k: v * factor for k, v in m.items()} if pick(i) else m for i, m in enumerate(models)]


def weight_scaling(arch: str, arch_kw: dict, task: TaskData, models: Sequence[StateDict],
                   factor: float = 100.0) -> List[dict]:
    out = _Outputs(arch, arch_kw, task)
    rows = []
    for variant in SCALING_VARIANTS:
        scaled = _scaled(models, variant, factor)
        for i, m in enumerate(scaled):
            rows.append({"arch": arch, "variant": variant, "factor": factor, "method": f"model_{i + 1}",
                         "test_acc": out.acc(m, "test")})
        res = compare(out, scaled)
        for method in ("uniform_soup", "greedy_soup", "logit_ensemble", "feature_ensemble"):
            rows.append({"arch": arch, "variant": variant, "factor": factor, "method": method,
                         "test_acc": res[method]})
    return rows


def write_rows_csv(rows: Sequence[dict], path: str) -> None:
    if not rows:
        raise ValueError(f"nothing to write to {path}")
    keys = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([f"{r[k]:.4f}" if isinstance(r[k], float) and k != "factor" else r[k] for k in keys])


def plot_merge_vs_ensemble(rows: Sequence[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    methods = ["individual_mean", "individual_best", "uniform_soup", "greedy_soup", "logit_ensemble",
               "feature_ensemble", "greedy_ensemble"]
    fig, axes = plt.subplots(1, len(archs), figsize=(5.2 * len(archs), 3.8), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        ns = sorted({r["N"] for r in rows if r["arch"] == arch})
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals = [next(r["test_acc"] for r in rows if (r["arch"], r["N"], r["method"]) == (arch, n, m))
                    for n in ns]
            ax.bar(np.arange(len(ns)) + (j - len(methods) / 2 + 0.5) * width, [100 * v for v in vals],
                   width, label=m)
        ax.set_xticks(range(len(ns)))
        ax.set_xticklabels([f"N={n}" for n in ns])
        lo = min(100 * r["test_acc"] for r in rows if r["arch"] == arch)
        ax.set_ylim(max(0, lo - 5), 100)
        ax.set_ylabel("test accuracy (%)")
        task = next(r["task"] for r in rows if r["arch"] == arch)
        ax.set_title(f"{arch}: merging vs ensembling (task {task})")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows: Sequence[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 3.8), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        sel = [r for r in rows if r["arch"] == arch]
        methods = list(dict.fromkeys(r["method"] for r in sel))
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals = [next(r["test_acc"] for r in sel if (r["variant"], r["method"]) == (v, m))
                    for v in SCALING_VARIANTS]
            ax.bar(np.arange(len(SCALING_VARIANTS)) + (j - len(methods) / 2 + 0.5) * width,
                   [100 * v for v in vals], width, label=m)
        ax.set_xticks(range(len(SCALING_VARIANTS)))
        factor = sel[0]["factor"]
        ax.set_xticklabels([v if v == "none" else f"{v} ×{factor:g}" for v in SCALING_VARIANTS], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{arch}: weights scaled ×{factor:g}")
    axes[0, 0].legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
