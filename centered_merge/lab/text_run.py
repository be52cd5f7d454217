"""The lab's text profile: a real pretrained transformer (all-MiniLM-L6-v2) fine-tuned on six real text
classification tasks, its encoders merged by every method, the table over seeds, CART's rank curve and the
centered-vs-uncentered spectra of its task vectors.

    run_text_lab("lab_out", seeds=3)          # `centered-merge lab --profile text`

Per seed: seeded subsets of each task's own train / dev / test files (text_data), one fine-tune per task from the
pretrained encoder with its zero-shot head frozen (text_model; cached as safetensors under <out>/cache), then the
table: every method's settings chosen on dev (mean accuracy over tasks), test accuracy reported for the chosen
settings only. Seeds differ in the training sample, the batch order and the dev / test subsets.
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import cart_analysis, table
from .table import SearchGrid, TableResult
from .text_data import TEXT_TASKS, load_text_tasks
from .train import cached

StateDict = Dict[str, torch.Tensor]
ARCH = "minilm"


@dataclass
class TextProfile:
    name: str = "text"
    tasks: Tuple[str, ...] = tuple(TEXT_TASKS)
    n_train: Optional[int] = 2000   # training sample per task (fine-tuning sees steps * batch examples of it)
    n_val: int = 100                # dev examples per task, for every choice of settings
    n_test: int = 250               # test examples per task, for the reported accuracies
    steps: int = 40
    lr: float = 1e-4
    batch: int = 32
    num_layers: Optional[int] = None  # None: all six blocks; tests cut the encoder shorter
    seeds: int = 3
    # Scales above the first run's edges (TIES 1.5, TSV-M 1.5, Iso 2, CART 3 were each the top of their grid),
    # the values that scored far below the best dropped; every scale costs one dev evaluation, no merge.
    grid: SearchGrid = field(default_factory=lambda: SearchGrid(
        ta_lams=(0.3, 0.5, 0.7, 1.0),
        ties_densities=(0.1, 0.2), ties_lams=(1.0, 1.5, 2.0, 2.5),
        cart_ranks=(0.02, 0.04, 0.08, 0.16, 0.32), cart_lams=(1.0, 2.0, 3.0, 4.0),
        tsv_alphas=(1.0, 1.5, 2.0, 2.5), iso_alphas=(1.0, 1.5, 2.0, 2.5, 3.0)))
    svd: str = "exact"  # CART's and TSV-M's row; CART is re-run randomized at its chosen settings
    spectrum_layers: Tuple[int, ...] = (0, 5)  # blocks drawn in the spectrum figure (the CSV holds all)


TEXT_PROFILES = {
    "text": TextProfile(),
    # for tests: 2 tasks, a 2-block encoder, a few steps, a tiny grid
    "text-quick": TextProfile(name="text-quick", tasks=("trec6", "banking77"), n_train=400, n_val=60, n_test=80,
                              steps=12, lr=2e-4, num_layers=2, seeds=1,
                              grid=SearchGrid(ta_lams=(0.5,), ties_densities=(0.2,), ties_lams=(1.0,),
                                              cart_ranks=(0.04, 0.5), cart_lams=(1.0,), tsv_alphas=(1.0,),
                                              iso_alphas=(1.0,)),
                              spectrum_layers=(0,)),
}


@dataclass
class _Models:
    """What cart_analysis.spectrum_energy reads."""
    arch: str
    task_names: List[str]
    pretrained: StateDict
    finetuned: List[StateDict]


def _tokens_for(tasks, split):
    from .text_model import Tokens
    return [Tokens(t.split(split).texts) for t in tasks]


def run_seed(prof: TextProfile, seed: int, model, pre: StateDict, cache_dir: Optional[str],
             log: Callable[[str], None]) -> Tuple[TableResult, List[StateDict], dict]:
    from .text_model import MAX_TOKENS, SCALE, TextEvaluator, Tokens, finetune, zero_shot_head

    timing = {}
    t0 = time.time()
    tasks = load_text_tasks(prof.tasks, prof.n_train, prof.n_val, prof.n_test, seed)
    model.load_state_dict(pre, strict=False)
    heads = [zero_shot_head(model, t.classes) for t in tasks]
    tokens = {s: _tokens_for(tasks, s) for s in ("val", "test")}
    labels = {s: [t.split(s).y for t in tasks] for s in ("val", "test")}
    ev = TextEvaluator(model, heads, tokens, labels)
    timing["data_s"] = time.time() - t0

    t0 = time.time()
    fts, hits = [], 0
    for i, task in enumerate(tasks):
        cfg = {"arch": ARCH, "task": task.name, "seed": seed, "n_train": prof.n_train, "steps": prof.steps,
               "lr": prof.lr, "batch": prof.batch, "num_layers": prof.num_layers, "max_tokens": MAX_TOKENS,
               "scale": SCALE, "heads": "zeroshot-classnames"}
        sd, hit = cached(cache_dir, "text-finetuned", cfg,
                         lambda: finetune(model, pre, heads[i], Tokens(task.train.texts), task.train.y,
                                          prof.steps, prof.lr, prof.batch, seed * 1000 + 17 + i))
        hits += hit
        fts.append(sd)
    timing["finetune_s"] = time.time() - t0
    timing["finetune_cached"] = f"{hits}/{len(tasks)}"
    log(f"[text seed {seed}] data {timing['data_s']:.1f}s, {len(tasks)} fine-tunes {timing['finetune_s']:.1f}s "
        f"({hits} cached)")

    t0 = time.time()
    individual = {s: np.array([ev.accs(fts[t], s, [t])[0] for t in range(len(tasks))]) for s in ("val", "test")}
    fixed = {"pretrained": (ev.accs(pre, "val"), ev.accs(pre, "test")),
             "individual": (individual["val"], individual["test"])}
    res = table.search_table(ARCH, [t.name for t in tasks], fts, pre, ev.accs, fixed,
                             table.method_configs(prof.grid, prof.svd, seed), log, scale_once=True)
    timing["table_s"] = time.time() - t0

    t0 = time.time()
    res.rank_rows = rank_curve(res, ev)
    res.group_best = {}
    timing["rank_curve_s"] = time.time() - t0
    return res, fts, timing


def rank_curve(res: TableResult, ev) -> List[dict]:
    """CART's test accuracy per rank ratio, at the lambda that rank scores best on dev (WA is r = 1), from the
    search's best merge of each rank (the chosen rank's test accuracy is the table's)."""
    cart = next(row for row in res.rows if row["method"] == "cart")
    rows = []
    for params, val, merged in sorted(res.group_best["cart"], key=lambda g: g[0]["rank"]):
        test = cart["abs"] if params == cart["params"] else float(ev.accs(merged, "test").mean())
        rows.append({"arch": ARCH, "rank": params["rank"], "lam": params["lam"], "val": val, "test": test})
    wa = next(row for row in res.rows if row["method"] == "weight_average")
    rows.append({"arch": ARCH, "rank": 1.0, "lam": 0.0, "val": wa["val"], "test": wa["abs"]})
    return rows


def _mean_rows(tables: Sequence[TableResult]) -> TableResult:
    """A table whose accuracies are the means over seeds (for the rank plot's reference lines)."""
    rows = []
    for i, r0 in enumerate(tables[0].rows):
        rows.append({**r0, "abs": float(np.mean([t.rows[i]["abs"] for t in tables]))})
    return TableResult(tables[0].arch, tables[0].task_names, rows)


def _mean_rank_rows(per_seed: Sequence[List[dict]]) -> List[dict]:
    out = []
    for i, r0 in enumerate(per_seed[0]):
        vals = [rows[i]["val"] for rows in per_seed]
        tests = [rows[i]["test"] for rows in per_seed]
        out.append({"arch": ARCH, "rank": r0["rank"], "lam": r0["lam"], "val": float(np.mean(vals)),
                    "test": float(np.mean(tests)), "test_std": float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0,
                    "lams": [rows[i]["lam"] for rows in per_seed]})
    return out


def _seed_job(prof: TextProfile, seed: int, first: bool, cache_dir: Optional[str], threads: int,
              log: Optional[Callable[[str], None]], model=None, pre: Optional[StateDict] = None) -> dict:
    """One seed's fine-tunes, table and rank curve (and, for the first seed, the spectrum), in this process or a
    worker (log None: a worker prints its progress as it goes, each line marked with its seed). Returns the table
    without its merged state dicts and the timings."""
    from .text_model import load_encoder, trainable_state

    if log is None:
        def log(line: str) -> None:
            print(f"[seed {seed}] {line}", flush=True)
    if model is None:
        torch.set_num_threads(max(1, int(threads)))
        model = load_encoder(prof.num_layers)
        pre = trainable_state(model)
    res, fts, timing = run_seed(prof, seed, model, pre, cache_dir, log)
    res.merged = {}
    spectrum: List[dict] = []
    if first:
        t0 = time.time()
        spectrum = cart_analysis.spectrum_energy(_Models(ARCH, res.task_names, pre, fts),
                                                 ratios=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0))
        timing["spectrum_s"] = time.time() - t0
    return {"table": res, "timing": timing, "spectrum": spectrum}


def write_seed_tables(out_dir: str, tables: Sequence[TableResult], rank_rows: Sequence[List[dict]],
                      log: Callable[[str], None] = print) -> dict:
    """The table over seeds (table_seeds_minilm.csv) and CART's mean rank curve (rank_sweep_minilm.csv and its
    plot) from per-seed tables; returns the summary entries."""
    from .run import _seed_summary

    summary: dict = {}
    files: List[str] = []
    seed_rows = _seed_summary(tables)
    summary["table"] = seed_rows
    with open(os.path.join(out_dir, f"table_seeds_{ARCH}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch", "method", "seeds", "abs_mean", "abs_std", "norm_mean", "norm_std", "abs_per_seed",
                    "params_per_seed"])
        for i, r in enumerate(seed_rows):
            w.writerow([ARCH, r["method"], r["seeds"], f"{r['abs_mean']:.4f}", f"{r['abs_std']:.4f}",
                        f"{r['norm_mean']:.4f}", f"{r['norm_std']:.4f}",
                        " ".join(f"{v:.4f}" for v in r["abs_per_seed"]),
                        json.dumps([t.rows[i]["params"] for t in tables], sort_keys=True)])
    files.append(f"table_seeds_{ARCH}.csv")
    log(f"Mean ± std over {len(tables)} seed(s), MiniLM encoder, {len(tables[0].task_names)} tasks "
        f"(absolute / normalized test accuracy, %):")
    for r in seed_rows:
        log(f"  {r['method']:16s} {100 * r['abs_mean']:5.1f} ± {100 * r['abs_std']:.1f}   "
            f"{100 * r['norm_mean']:5.1f} ± {100 * r['norm_std']:.1f}")

    curve = _mean_rank_rows(rank_rows)
    summary["rank_curve"] = curve
    with open(os.path.join(out_dir, f"rank_sweep_{ARCH}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch", "rank_ratio", "best_lam_on_val_per_seed", "val_mean", "test_mean", "test_std"])
        for r in curve:
            w.writerow([ARCH, r["rank"], " ".join(f"{l:g}" for l in r["lams"]), f"{r['val']:.4f}",
                        f"{r['test']:.4f}", f"{r['test_std']:.4f}"])
    files.append(f"rank_sweep_{ARCH}.csv")
    cart_analysis.plot_rank_sweep({ARCH: curve}, {ARCH: _mean_rows(tables)},
                                  os.path.join(out_dir, f"cart_rank_sweep_{ARCH}.png"))
    files.append(f"cart_rank_sweep_{ARCH}.png")
    summary["interior_optimum"] = {"by_val": cart_analysis.interior_optimum(curve, "val"),
                                   "by_test": cart_analysis.interior_optimum(curve, "test")}
    log("CART rank curve (λ chosen on dev per rank; mean over seeds; r = 1 is weight averaging), val/test %: "
        + "  ".join(f"r={r['rank']:g}:{100 * r['val']:.1f}/{100 * r['test']:.1f}" for r in curve))
    io = summary["interior_optimum"]
    log(f"  best rank by dev r={io['by_val']['best_rank']:g} ({io['by_val']['where']}); by test "
        f"r={io['by_test']['best_rank']:g} ({io['by_test']['where']})")

    summary["files_written"] = files
    return summary


def combine_seed_runs(out_dir: str, run_dirs: Sequence[str], log: Callable[[str], None] = print) -> dict:
    """The seed table from finished runs of one seed each (e.g. `--seed 1 --seeds 1` in separate folders, run at
    the same time), read back from their results_minilm.json."""
    tables, rank_rows, seeds = [], [], []
    for d in run_dirs:
        with open(os.path.join(d, f"results_{ARCH}.json")) as f:
            r = json.load(f)
        for entry in r["seeds"]:
            names = r["profile"]["tasks"]
            tables.append(TableResult(ARCH, list(names), entry["rows"]))
            rank_rows.append(entry["rank_curve"])
            seeds.append(entry["seed"])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs to combine repeat seeds: {seeds}")
    os.makedirs(out_dir, exist_ok=True)
    summary = write_seed_tables(out_dir, tables, rank_rows, log)
    summary["seeds"] = seeds
    with open(os.path.join(out_dir, f"results_seeds_{ARCH}.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return summary


def run_text_lab(out_dir: str = "lab_out", profile: str = "text", seed: int = 0, seeds: Optional[int] = None,
                 cache_dir: Optional[str] = None, threads: Optional[int] = None, jobs: Optional[int] = None,
                 log: Callable[[str], None] = print) -> dict:
    """Run the text profile; returns a summary (also written to <out_dir>/results_text.json)."""
    import matplotlib
    matplotlib.use("Agg")
    from .text_model import load_encoder, trainable_state

    if profile not in TEXT_PROFILES:
        raise ValueError(f"unknown text profile {profile!r}; expected one of {', '.join(TEXT_PROFILES)}")
    prof = TEXT_PROFILES[profile]
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        prof = replace(prof, seeds=int(seeds))
    # One single-threaded process per seed by default: on two cores, processes keep both busy through the many
    # small forward passes and GEMMs, where one process with two threads leaves them idle between small GEMMs
    # (and its OpenMP threads spin on cores that other work holds).
    jobs = max(1, int(jobs if jobs is not None else prof.seeds))
    threads = max(1, int(threads if threads is not None else (1 if jobs > 1 else 2)))
    os.makedirs(out_dir, exist_ok=True)
    cache_dir = cache_dir if cache_dir is not None else os.path.join(out_dir, "cache")
    torch.set_num_threads(threads)
    t_start = time.time()
    log(f"centered_merge lab: profile {prof.name}, all-MiniLM-L6-v2"
        f"{'' if prof.num_layers is None else f' cut to {prof.num_layers} blocks'}, {len(prof.tasks)} tasks "
        f"({', '.join(prof.tasks)}), {prof.seeds} seed(s), zero-shot class-name heads frozen, {prof.steps} AdamW "
        f"steps of {prof.batch} per task, torch threads {torch.get_num_threads()}"
        f"{f', {jobs} seed processes' if jobs > 1 else ''}")
    summary: dict = {"profile": asdict(prof), "seeds": [], "timing": {}, "files": [], "jobs": int(jobs)}
    files = summary["files"]
    seed_list = [seed + i for i in range(prof.seeds)]
    if jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=int(jobs), mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_seed_job, prof, s, s == seed, cache_dir, threads, None) for s in seed_list]
            done = [f.result() for f in futures]
    else:
        model = load_encoder(prof.num_layers)
        pre = trainable_state(model)
        done = [_seed_job(prof, s, s == seed, cache_dir, threads, log, model, pre) for s in seed_list]
    tables, rank_rows = [], []
    spectrum_rows: List[dict] = []
    for s, d in zip(seed_list, done):
        res = d["table"]
        summary["timing"][f"seed{s}"] = d["timing"]
        tables.append(res)
        rank_rows.append(res.rank_rows)
        summary["seeds"].append({"seed": s, "rows": res.rows, "rank_curve": res.rank_rows})
        if s == seed:
            log("")
            log(table.format_table(res))
            log("")
            table.write_table_csv(res, os.path.join(out_dir, f"table_{ARCH}.csv"))
            table.write_search_csv(res, os.path.join(out_dir, f"search_{ARCH}.csv"))
            files += [f"table_{ARCH}.csv", f"search_{ARCH}.csv"]
            spectrum_rows = d["spectrum"]
            summary["timing"]["spectrum_s"] = d["timing"]["spectrum_s"]

    summary.update(write_seed_tables(out_dir, tables, rank_rows, log))
    files += summary.pop("files_written")

    cart_analysis.write_spectrum_csv(spectrum_rows, os.path.join(out_dir, f"cart_spectrum_{ARCH}.csv"))
    shown = [r for r in spectrum_rows if any(r["layer"].startswith(f"encoder.layer.{b}.") for b in prof.spectrum_layers)]
    cart_analysis.plot_spectrum([{**r, "layer": r["layer"].replace("encoder.layer.", "L").replace(".weight", "")}
                                 for r in shown], os.path.join(out_dir, f"cart_spectrum_{ARCH}.png"))
    files += [f"cart_spectrum_{ARCH}.csv", f"cart_spectrum_{ARCH}.png"]
    spec = cart_analysis.spectrum_summary(spectrum_rows, 0.04)
    cen = np.mean([r["energy_mean"] for r in spec if r["vector"] == "centered"])
    unc = np.mean([r["energy_mean"] for r in spec if r["vector"] == "uncentered"])
    summary["spectrum_at_0.04"] = {"centered": float(cen), "uncentered": float(unc), "matrices": len(spec) // 2}
    log(f"Spectrum: energy in the top 4% singular values, mean over the {len(spec) // 2} matrices and tasks: "
        f"centered {100 * cen:.1f}%, uncentered {100 * unc:.1f}%")

    summary["timing"]["total_s"] = time.time() - t_start
    with open(os.path.join(out_dir, f"results_{ARCH}.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    files.append(f"results_{ARCH}.json")
    log(f"Done in {summary['timing']['total_s']:.1f}s. Plots and CSVs in {os.path.abspath(out_dir)}/: "
        f"{', '.join(files)}; checkpoint cache: {os.path.abspath(cache_dir)}")
    return summary
