"""The lab end to end: train, merge, analyse, print the tables, write PNG + CSV + merged checkpoints.

    run_lab("lab_out", profile="demo", seed=0)

Profiles: "quick" (tiny models, two tasks, seconds: for tests), "demo" (8 tasks, MLP and CNN, the README's
numbers, about 80 s of CPU with no cache), "full" (same models trained longer, finer grids, three
seeds with spread). Trained checkpoints are cached as safetensors under <out>/cache (keyed by a hash of
their settings), so a rerun only redoes merging and analysis.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import cart_analysis, rethinking, table
from .data import PRETRAIN_TASK, TaskData, make_tasks, task_names
from .table import SearchGrid, TableResult, TaskModels
from .train import cached, finetune, fit_probe, pretrain, split_state, zero_shot_head

StateDict = Dict[str, torch.Tensor]


@dataclass
class Profile:
    name: str
    n_tasks: int = 8
    archs: Tuple[str, ...] = ("mlp", "cnn")
    arch_kw: Dict[str, dict] = field(default_factory=lambda: {"mlp": {"width": 256, "depth": 3},
                                                               "cnn": {"channels": 16, "width": 128}})
    batch: int = 64
    pretrain_steps: Dict[str, int] = field(default_factory=lambda: {"mlp": 800, "cnn": 800})
    pretrain_lr: float = 1e-3
    probe_steps: int = 300
    # multi-task fine-tuning (the table): heads frozen, as CLIP's zero-shot heads are.
    # heads="zeroshot": each task's head is the pretrained classifier's rows in the task's label order (no
    # task data); heads="probe": a linear probe fitted on the pretrained encoder's features of the task.
    heads: str = "zeroshot"
    ft_steps: Dict[str, int] = field(default_factory=lambda: {"mlp": 500, "cnn": 400})
    ft_optimizer: str = "sgd"
    ft_lr: Dict[str, float] = field(default_factory=lambda: {"mlp": 0.01, "cnn": 0.01})
    train_head: bool = False
    # Rethinking analyses: N models fine-tuned (whole model) from the pretrained init on one task
    rethink_task: str = "rot90"
    rethink_models: int = 5
    rethink_ns: Tuple[int, ...] = (2, 3, 5)
    rethink_steps: Dict[str, int] = field(default_factory=lambda: {"mlp": 300, "cnn": 200})
    rethink_lr: Dict[str, float] = field(default_factory=lambda: {"mlp": 0.01, "cnn": 0.003})
    scaling_n: int = 3
    scaling_factor: float = 100.0
    grid: SearchGrid = field(default_factory=SearchGrid)
    svd: str = "exact"
    seeds: int = 1  # how many seeds the table is run for (seed, seed+1, ...)


PROFILES: Dict[str, Profile] = {
    "quick": Profile(
        name="quick", n_tasks=2,
        arch_kw={"mlp": {"width": 64, "depth": 2}, "cnn": {"channels": 4, "width": 32}},
        pretrain_steps={"mlp": 200, "cnn": 150}, probe_steps=100,
        ft_steps={"mlp": 80, "cnn": 60}, ft_lr={"mlp": 0.05, "cnn": 0.02},
        rethink_models=3, rethink_ns=(2, 3), rethink_steps={"mlp": 30, "cnn": 20}, scaling_n=2,
        grid=SearchGrid(ta_lams=(0.3, 0.5, 1.0), ties_densities=(0.2,), ties_lams=(0.5, 1.0),
                        cart_ranks=(0.1, 0.5, 1.0), cart_lams=(1.0, 2.0))),
    "demo": Profile(name="demo"),
    "full": Profile(
        name="full", pretrain_steps={"mlp": 1500, "cnn": 1500}, probe_steps=500,
        ft_steps={"mlp": 800, "cnn": 600}, rethink_steps={"mlp": 500, "cnn": 300}, seeds=3,
        grid=SearchGrid(
            ta_lams=(0.02, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0),
            ties_densities=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7),
            ties_lams=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0),
            cart_ranks=(0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0),
            cart_lams=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0))),
}


def get_profile(name: str, n_tasks: Optional[int] = None, heads: Optional[str] = None) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}")
    prof = PROFILES[name]
    if heads is not None:
        if heads not in ("zeroshot", "probe"):
            raise ValueError(f"heads must be 'zeroshot' or 'probe', got {heads!r}")
        prof = replace(prof, heads=heads)
    if n_tasks is not None:
        task_names(n_tasks)  # validates the number
        prof = replace(prof, n_tasks=n_tasks)
    return prof


# ----------------------------------------------------------------------------------------- training
def train_task_models(prof: Profile, arch: str, pre_task: TaskData, tasks: Sequence[TaskData], seed: int,
                      cache_dir: Optional[str]) -> Tuple[TaskModels, StateDict, dict]:
    """Pretrain (cached), fit per-task probe heads, fine-tune one encoder per task (cached)."""
    kw = prof.arch_kw[arch]
    base_cfg = {"arch": arch, "arch_kw": kw, "seed": seed, "batch": prof.batch,
                "pretrain_steps": prof.pretrain_steps[arch], "pretrain_lr": prof.pretrain_lr}
    t0 = time.time()
    pre_sd, hit = cached(cache_dir, "pretrained", {**base_cfg, "task": PRETRAIN_TASK},
                         lambda: pretrain(arch, kw, pre_task, prof.pretrain_steps[arch], prof.pretrain_lr,
                                          prof.batch, seed))
    timing = {"pretrain_s": time.time() - t0, "pretrain_cached": hit}
    enc0, head0 = split_state(pre_sd)
    pre_heads, fts, heads = [], [], []
    t0 = time.time()
    for i, task in enumerate(tasks):
        if prof.heads == "zeroshot":
            probe_cfg = {**base_cfg, "task": task.name, "heads": "zeroshot", "label_perm": task.label_perm}
            head_sd = zero_shot_head(head0, task)
        elif prof.heads == "probe":
            probe_cfg = {**base_cfg, "task": task.name, "heads": "probe", "probe_steps": prof.probe_steps,
                         "label_perm": task.label_perm}
            head_sd, _ = cached(cache_dir, "probe", probe_cfg,
                                lambda: fit_probe(arch, kw, enc0, task, prof.probe_steps, seed=seed))
        else:
            raise ValueError(f"heads must be 'zeroshot' or 'probe', got {prof.heads!r}")
        ft_cfg = {**probe_cfg, "ft_steps": prof.ft_steps[arch], "ft_lr": prof.ft_lr[arch],
                  "ft_optimizer": prof.ft_optimizer, "train_head": prof.train_head}
        sd, _ = cached(cache_dir, "finetuned", ft_cfg,
                       lambda: finetune(arch, kw, enc0, head_sd, task, prof.ft_steps[arch], prof.ft_lr[arch],
                                        prof.ft_optimizer, prof.batch, seed * 1000 + 17 + i, prof.train_head))
        enc, head = split_state(sd)
        pre_heads.append(head_sd)
        fts.append(enc)
        heads.append(head)
    timing["finetune_s"] = time.time() - t0
    return TaskModels(arch, kw, list(tasks), enc0, pre_heads, fts, heads), pre_sd, timing


def train_rethink_models(prof: Profile, arch: str, pre_sd: StateDict, task: TaskData, seed: int,
                         cache_dir: Optional[str]) -> List[StateDict]:
    kw = prof.arch_kw[arch]
    enc0, head0 = split_state(pre_sd)
    head0 = zero_shot_head(head0, task)
    models = []
    for j in range(prof.rethink_models):
        cfg = {"arch": arch, "arch_kw": kw, "seed": seed, "member": j, "task": task.name,
               "label_perm": task.label_perm,
               "pretrain_steps": prof.pretrain_steps[arch], "steps": prof.rethink_steps[arch],
               "lr": prof.rethink_lr[arch], "batch": prof.batch}
        sd, _ = cached(cache_dir, "rethink", cfg,
                       lambda: finetune(arch, kw, enc0, head0, task, prof.rethink_steps[arch], prof.rethink_lr[arch],
                                        "sgd", prof.batch, seed * 1000 + 500 + j, True))
        models.append(sd)
    return models


# ---------------------------------------------------------------------------------------- reporting
def _save_merged(out_dir: str, arch: str, res: TableResult, tm: TaskModels) -> str:
    from safetensors.torch import save_file

    d = os.path.join(out_dir, "merged", arch)
    os.makedirs(d, exist_ok=True)
    for method, sd in res.merged.items():
        params = next(r["params"] for r in res.rows if r["method"] == method)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, f"{method}.safetensors"),
                  metadata={"method": method, "params": json.dumps(params), "arch": arch,
                            "arch_kw": json.dumps(tm.arch_kw), "tasks": ",".join(tm.task_names)})
    heads = {f"{t}.{k}": v.contiguous() for t, h in zip(tm.task_names, tm.heads) for k, v in h.items()}
    save_file(heads, os.path.join(d, "task_heads.safetensors"), metadata={"tasks": ",".join(tm.task_names)})
    save_file({k: v.contiguous() for k, v in tm.pretrained.items()}, os.path.join(d, "pretrained.safetensors"))
    return d


def _seed_summary(tables: List[TableResult]) -> List[dict]:
    out = []
    for i, r0 in enumerate(tables[0].rows):
        vals = np.array([t.rows[i]["abs"] for t in tables])
        norms = np.array([t.rows[i]["norm"] for t in tables])
        out.append({"arch": tables[0].arch, "method": r0["method"], "seeds": len(tables),
                    "abs_mean": float(vals.mean()), "abs_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                    "norm_mean": float(norms.mean()),
                    "norm_std": float(norms.std(ddof=1)) if len(norms) > 1 else 0.0,
                    "abs_per_seed": [float(v) for v in vals]})
    return out


def run_lab(out_dir: str = "lab_out", profile: str = "demo", seed: int = 0, n_tasks: Optional[int] = None,
            cache_dir: Optional[str] = None, archs: Optional[Sequence[str]] = None, threads: int = 1,
            heads: Optional[str] = None, seeds: Optional[int] = None,
            log: Callable[[str], None] = print) -> dict:
    """Run the lab; returns a summary dict (also written to <out_dir>/results.json)."""
    import matplotlib
    matplotlib.use("Agg")

    prof = get_profile(profile, n_tasks, heads)
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        prof = replace(prof, seeds=int(seeds))
    if archs is not None:
        bad = [a for a in archs if a not in prof.arch_kw]
        if bad:
            raise ValueError(f"unknown architecture(s) {bad}; expected some of {list(prof.arch_kw)}")
        prof = replace(prof, archs=tuple(archs))
    if prof.rethink_task not in task_names(12):
        raise ValueError(f"rethink task {prof.rethink_task!r} is not a known task")
    os.makedirs(out_dir, exist_ok=True)
    cache_dir = cache_dir if cache_dir is not None else os.path.join(out_dir, "cache")
    # One thread by default: these models are tiny (batch 64, width <= 256) and a second thread buys nothing;
    # on a shared 2-core machine 2 threads were measured 4-10x *slower* (OpenMP threads spinning on busy cores).
    torch.set_num_threads(max(1, int(threads)))
    t_start = time.time()
    names = task_names(prof.n_tasks)
    log(f"centered_merge lab: profile {prof.name}, seed {seed}, {len(names)} tasks ({', '.join(names)}), "
        f"archs {', '.join(prof.archs)}, {prof.heads} heads (frozen while fine-tuning), "
        f"torch threads {torch.get_num_threads()}, CART svd={prof.svd}")

    summary: dict = {"profile": asdict(prof), "seed": seed, "tasks": names, "tables": {}, "seed_tables": {},
                     "rank_sweep": {}, "interior_optimum": {}, "spectrum_at": {}, "timing": {}, "files": []}
    files = summary["files"]
    rank_rows: Dict[str, List[dict]] = {}
    tables: Dict[str, TableResult] = {}
    spectrum_rows: List[dict] = []
    pretrained_sds: Dict[str, StateDict] = {}
    seeds = [seed + s for s in range(prof.seeds)]
    for s in seeds:
        all_tasks = make_tasks([PRETRAIN_TASK] + names, seed=s)
        pre_task, tasks = all_tasks[0], all_tasks[1:]
        for arch in prof.archs:
            t0 = time.time()
            tm, pre_sd, timing = train_task_models(prof, arch, pre_task, tasks, s, cache_dir)
            log(f"[{arch} seed {s}] trained: pretrain {timing['pretrain_s']:.1f}s"
                f"{' (cached)' if timing['pretrain_cached'] else ''}, {len(tasks)} fine-tunes "
                f"{timing['finetune_s']:.1f}s")
            res = table.merge_table(tm, prof.grid, svd=prof.svd, seed=s, log=log)
            summary["timing"][f"{arch}_seed{s}_train_s"] = timing["pretrain_s"] + timing["finetune_s"]
            summary["timing"][f"{arch}_seed{s}_table_s"] = time.time() - t0 - summary["timing"][f"{arch}_seed{s}_train_s"]
            summary["seed_tables"].setdefault(arch, []).append(res)
            if s != seed:
                continue
            pretrained_sds[arch] = pre_sd
            tables[arch] = res
            log("")
            log(table.format_table(res))
            log("")
            for fn, writer in ((f"table_{arch}.csv", table.write_table_csv),
                               (f"search_{arch}.csv", table.write_search_csv)):
                writer(res, os.path.join(out_dir, fn))
                files.append(fn)
            _save_merged(out_dir, arch, res, tm)
            summary["merged_dir"] = os.path.join(out_dir, "merged")
            t0 = time.time()
            rank_rows[arch] = cart_analysis.rank_sweep(tm, res)
            cart_analysis.write_rank_csv(rank_rows[arch], os.path.join(out_dir, f"rank_sweep_{arch}.csv"))
            files.append(f"rank_sweep_{arch}.csv")
            summary["interior_optimum"][arch] = {
                "by_val": cart_analysis.interior_optimum(rank_rows[arch], "val"),
                "by_test": cart_analysis.interior_optimum(rank_rows[arch], "test")}
            spectrum_rows += cart_analysis.spectrum_energy(tm)
            summary["timing"][f"{arch}_cart_analysis_s"] = time.time() - t0
            summary["tables"][arch] = {"tasks": res.task_names, "rows": res.rows}
            summary["rank_sweep"][arch] = rank_rows[arch]

    # multi-seed summary (full profile)
    if prof.seeds > 1:
        log(f"Mean ± std over {prof.seeds} seeds (absolute / normalized test accuracy, %):")
        import csv
        with open(os.path.join(out_dir, "table_seeds.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["arch", "method", "seeds", "abs_mean", "abs_std", "norm_mean", "norm_std", "abs_per_seed"])
            for arch, ts in summary["seed_tables"].items():
                for r in _seed_summary(ts):
                    w.writerow([arch, r["method"], r["seeds"], f"{r['abs_mean']:.4f}", f"{r['abs_std']:.4f}",
                                f"{r['norm_mean']:.4f}", f"{r['norm_std']:.4f}",
                                " ".join(f"{v:.4f}" for v in r["abs_per_seed"])])
                    log(f"  {arch:4s} {r['method']:16s} {100 * r['abs_mean']:5.1f} ± {100 * r['abs_std']:.1f}   "
                        f"{100 * r['norm_mean']:5.1f} ± {100 * r['norm_std']:.1f}")
        files.append("table_seeds.csv")
        log("")
    summary["seed_tables"] = {a: _seed_summary(ts) for a, ts in summary["seed_tables"].items()}

    # CART analyses
    cart_analysis.plot_rank_sweep(rank_rows, tables, os.path.join(out_dir, "cart_rank_sweep.png"))
    cart_analysis.write_spectrum_csv(spectrum_rows, os.path.join(out_dir, "cart_spectrum.csv"))
    cart_analysis.plot_spectrum(spectrum_rows, os.path.join(out_dir, "cart_spectrum.png"))
    files += ["cart_rank_sweep.png", "cart_spectrum.csv", "cart_spectrum.png"]
    log("CART rank sweep (λ chosen on validation for each rank ratio; mean accuracy %):")
    for arch, rows in rank_rows.items():
        log(f"  {arch}: " + "  ".join(f"r={r['rank']:g}:{100 * r['val']:.1f}/{100 * r['test']:.1f}" for r in rows)
            + "   (val/test)")
        io = summary["interior_optimum"][arch]
        log(f"  {arch}: best rank by validation r={io['by_val']['best_rank']:g} ({io['by_val']['where']}); "
            f"by test r={io['by_test']['best_rank']:g} ({io['by_test']['where']}); "
            f"best - worst rank on validation: {100 * io['by_val']['spread']:.1f} points")
    ratio = 0.12 if 0.12 in cart_analysis.SPECTRUM_RATIOS else cart_analysis.SPECTRUM_RATIOS[0]
    log(f"Spectrum: energy fraction in the top-k singular values at k = floor({ratio}·min(m,n)), mean over tasks:")
    spec = cart_analysis.spectrum_summary(spectrum_rows, ratio)
    summary["spectrum_at"] = spec
    for arch in prof.archs:
        for layer in dict.fromkeys(r["layer"] for r in spec if r["arch"] == arch):
            c = next(r for r in spec if (r["arch"], r["layer"], r["vector"]) == (arch, layer, "centered"))
            u = next(r for r in spec if (r["arch"], r["layer"], r["vector"]) == (arch, layer, "uncentered"))
            log(f"  {arch:4s} {layer:18s} {c['shape']:>8s}  centered {100 * c['energy_mean']:5.1f}%   "
                f"uncentered {100 * u['energy_mean']:5.1f}%")
    log("")

    # Rethinking analyses
    t0 = time.time()
    all_tasks = make_tasks([PRETRAIN_TASK, prof.rethink_task], seed=seed)
    tmpl = rethinking.linear_templates(all_tasks[0], seed=seed)
    rethinking.plot_templates(tmpl, os.path.join(out_dir, "rethinking_templates.png"))
    rethinking.write_templates_csv(tmpl, os.path.join(out_dir, "rethinking_templates.csv"))
    files += ["rethinking_templates.png", "rethinking_templates.csv"]
    cls = [r for r in tmpl["rows"] if r["kind"] == "class"]
    log(f"Rethinking 1 (patterns in weights): linear classifier on raw pixels, test acc {100 * tmpl['acc']:.1f}%; "
        f"row-vs-centered-class-mean correlation mean {np.mean([r['corr_row_vs_centered_mean'] for r in cls]):.2f}; "
        f"{sum(r['best_matching_class'] == int(r['classes']) for r in cls)}/10 rows match their own class best")
    mve_rows: List[dict] = []
    scale_rows: List[dict] = []
    for arch in prof.archs:
        models = train_rethink_models(prof, arch, pretrained_sds[arch], all_tasks[1], seed, cache_dir)
        mve_rows += rethinking.merge_vs_ensemble(arch, prof.arch_kw[arch], all_tasks[1], models, prof.rethink_ns)
        scale_rows += rethinking.weight_scaling(arch, prof.arch_kw[arch], all_tasks[1], models[:prof.scaling_n],
                                                prof.scaling_factor)
    rethinking.write_rows_csv(mve_rows, os.path.join(out_dir, "rethinking_merge_vs_ensemble.csv"))
    rethinking.plot_merge_vs_ensemble(mve_rows, os.path.join(out_dir, "rethinking_merge_vs_ensemble.png"))
    rethinking.write_rows_csv(scale_rows, os.path.join(out_dir, "rethinking_scaling.csv"))
    rethinking.plot_scaling(scale_rows, os.path.join(out_dir, "rethinking_scaling.png"))
    files += ["rethinking_merge_vs_ensemble.csv", "rethinking_merge_vs_ensemble.png",
              "rethinking_scaling.csv", "rethinking_scaling.png"]
    summary["timing"]["rethinking_s"] = time.time() - t0
    log(f"Rethinking 2 (merging vs ensembling), task {prof.rethink_task}, test accuracy %:")
    methods = list(dict.fromkeys(r["method"] for r in mve_rows if r["method"] != "greedy_soup_size"))
    log("  " + f"{'arch':4s} {'N':>2s} " + " ".join(f"{m[:14]:>14s}" for m in methods))
    for arch in prof.archs:
        for n in prof.rethink_ns:
            vals = {r["method"]: r["test_acc"] for r in mve_rows if (r["arch"], r["N"]) == (arch, n)}
            log("  " + f"{arch:4s} {n:2d} " + " ".join(f"{100 * vals[m]:14.1f}" for m in methods))
    log(f"Rethinking 3 (weights ×{prof.scaling_factor:g}), N={prof.scaling_n} models, test accuracy %:")
    smethods = list(dict.fromkeys(r["method"] for r in scale_rows))
    log("  " + f"{'arch':4s} {'variant':13s} " + " ".join(f"{m[:14]:>14s}" for m in smethods))
    for arch in prof.archs:
        for v in rethinking.SCALING_VARIANTS:
            vals = {r["method"]: r["test_acc"] for r in scale_rows if (r["arch"], r["variant"]) == (arch, v)}
            log("  " + f"{arch:4s} {v:13s} " + " ".join(f"{100 * vals[m]:14.1f}" for m in smethods))
    summary["rethinking"] = {"templates": tmpl["rows"], "merge_vs_ensemble": mve_rows, "scaling": scale_rows}

    summary["timing"]["total_s"] = time.time() - t_start
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    files.append("results.json")
    log("")
    log(f"Done in {summary['timing']['total_s']:.1f}s. Plots and CSVs: {os.path.abspath(out_dir)}/ "
        f"({', '.join(sorted(f for f in files if f.endswith('.png')))}); merged checkpoints (safetensors): "
        f"{os.path.abspath(os.path.join(out_dir, 'merged'))}/<arch>/<method>.safetensors; "
        f"checkpoint cache: {os.path.abspath(cache_dir)}")
    return summary
