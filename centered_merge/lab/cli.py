"""Command-line entry of the lab: ``centered_merge.lab.main(argv)`` (used by ``centered-merge lab``,
``make demo`` and ``python -m centered_merge.lab``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser(prog: str = "centered-merge lab") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the digits lab end to end: pretrain small encoders (MLP, CNN) on sklearn's digits, "
                    "fine-tune one per task, merge them with weight averaging / task arithmetic / TIES / CART "
                    "(settings chosen on validation), run CART's and the Rethinking paper's analyses, print "
                    "the tables, write PNG + CSV and merged safetensors checkpoints.")
    p.add_argument("--out", default="lab_out", metavar="DIR", help="output folder (default: lab_out)")
    p.add_argument("--profile", default="demo", choices=["quick", "demo", "full", "text", "text-quick"],
                   help="quick: tiny models, 2 tasks, seconds; demo (default): 8 tasks, MLP and CNN, about 80 s of CPU "
                        "with no cache; "
                        "full: longer training, finer grids, 3 seeds; text: a real pretrained transformer "
                        "(all-MiniLM-L6-v2) fine-tuned on 6 real text tasks, 3 seeds (needs the 'text' extra); "
                        "text-quick: 2 tasks, a 2-block encoder, for tests")
    p.add_argument("--seed", type=int, default=0, help="random seed (data split, init, data order); default 0")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="run the merge table for N seeds (seed, seed+1, ...) and report mean ± std "
                        "(default: 1; full profile: 3)")
    p.add_argument("--tasks", type=int, default=None, metavar="N",
                   help="number of tasks (1-12; default: the profile's, 8 for demo/full)")
    p.add_argument("--arch", action="append", choices=["mlp", "cnn"], default=None,
                   help="architecture(s) to run (repeatable; default: both)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="checkpoint cache folder (default: DIR/cache under --out)")
    p.add_argument("--heads", choices=["zeroshot", "probe"], default=None,
                   help="per-task heads, frozen while fine-tuning: zeroshot (default; the pretrained classifier's "
                        "rows in the task's label order, no task data, as CLIP's zero-shot heads) or probe (a "
                        "linear probe fitted on the pretrained features of the task)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 1 for the digits profiles: the models are tiny and extra threads "
                        "only add contention; text profiles: 1 per seed process, 2 when one process runs)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="text profiles: run the seeds in N processes at once (default: one per seed)")
    p.add_argument("--combine", nargs="+", metavar="RUN_DIR", default=None,
                   help="text profiles: instead of running, write the seed table of finished runs (their --out "
                        "folders, e.g. one seed each run side by side) into --out")
    p.add_argument("--no-cache", action="store_true", help="train everything afresh, write no cache")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    from .run import run_lab

    cache = args.cache
    if args.no_cache:
        import tempfile
        cache_ctx = tempfile.TemporaryDirectory(prefix="cm_lab_cache_")
        cache = cache_ctx.name
    try:
        if args.profile.startswith("text") and args.combine:
            from .text_run import combine_seed_runs

            combine_seed_runs(args.out, args.combine)
        elif args.profile.startswith("text"):
            from .text_run import run_text_lab

            run_text_lab(args.out, profile=args.profile, seed=args.seed, seeds=args.seeds, cache_dir=cache,
                         threads=args.threads, jobs=args.jobs)
        else:
            run_lab(args.out, profile=args.profile, seed=args.seed, n_tasks=args.tasks, cache_dir=cache,
                    archs=args.arch, threads=args.threads or 1, heads=args.heads, seeds=args.seeds)
    except ValueError as e:
        print(f"centered-merge lab: error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.no_cache:
            cache_ctx.cleanup()
    return 0
