"""The `centered-merge` command (also `python -m centered_merge`).

    centered-merge merge MODEL... --method cart --out DIR [--base B] [--rank R] [--lambda L] ...
    centered-merge merge --config merge.yaml --out DIR
    centered-merge info PATH
    centered-merge lab [--profile quick|demo|full] ...   (the digits lab, centered_merge.lab)

Exit codes: 0 success; 1 the merge could not be done (the message says why, naming file and tensor);
2 bad command line; 130 interrupted. On any failure nothing is left at the output path.
"""
from __future__ import annotations

import importlib

import argparse
import gc
import os
import signal
import sys
import threading
import warnings
from typing import List, Optional

from .errors import MergeConfigError, MergeError

PROG = "centered-merge"


def build_parser() -> argparse.ArgumentParser:
    from .methods import available
    from .methods.catalog import add_cli_options

    p = argparse.ArgumentParser(prog=PROG, description="Merge fine-tuned checkpoints (CART and the usual "
                                f"baselines: {', '.join(available())}) tensor by tensor, in bounded memory.")
    sub = p.add_subparsers(dest="command", metavar="{merge,info,lab}")
    sub.required = True

    m = sub.add_parser("merge", help="merge models into an HF-style directory",
                       description="Merge models given on the command line or in a mergekit-style YAML config.")
    m.add_argument("models", nargs="*", metavar="MODEL",
                   help="a .safetensors file, an HF model directory, or a torch .bin/.pt file")
    m.add_argument("--config", metavar="FILE.yaml", help="mergekit-style YAML config (instead of MODEL and --method)")
    m.add_argument("--method", metavar="METHOD",
                   help=" | ".join(available()) + " (default: cart)")
    m.add_argument("--base", metavar="B", help="base model (needed by task_arithmetic and ties; config and "
                   "tokenizer files are copied from it, else from the first model)")
    m.add_argument("--out", metavar="DIR", help="output directory (required unless --dry-run)")
    g = m.add_argument_group("method parameters (derived from each method's declaration; a method refuses "
                             "those it does not take, by name)")
    add_cli_options(g)
    o = m.add_argument_group("output and execution")
    o.add_argument("--dtype", metavar="D", help="mergekit's compute dtype; accumulation is always float32 here, "
                   "so this only sets the default --out-dtype")
    o.add_argument("--out-dtype", metavar="D", help="dtype of merged tensors (default: --dtype, else the inputs')")
    o.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    o.add_argument("--shard-size", default="5GB", metavar="SIZE", help="max bytes per output shard (default 5GB)")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    o.add_argument("--no-resume", action="store_true", help="discard the partial output of an interrupted earlier run")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    o.add_argument("--dry-run", action="store_true",
                   help="print the plan (tensors, low-rank k, FLOPs, estimated peak memory) and exit")
    o.add_argument("--read-ahead", type=int, default=2, metavar="N", help="tensors read ahead (default 2; 0 = none)")
    o.add_argument("--trust-pickle", action="store_true",
                   help="allow torch checkpoints that need full pickle loading (can run code; trusted files only)")
    o.add_argument("--allow-nonfinite", action="store_true", help="merge even if an input holds NaN/Inf")

    i = sub.add_parser("info", help="list a checkpoint's tensors, shapes, dtypes and total size")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--trust-pickle", action="store_true", help="allow full pickle loading of torch files")

    sub.add_parser("lab", help="the digits lab: fine-tune, merge with every method, CART's and the Rethinking "
                               "paper's analyses; see `lab --help`",
                   add_help=False)
    return p


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return str(n)


def _model_files(req: dict):
    """Where the output's tokenizer, generation config and chat template come from, checked before any read."""
    from .io.model_files import model_files_for

    return model_files_for(req["models"], req["base"], req.get("tokenizer_source"), req.get("chat_template"),
                           req.get("config_yaml"), req.get("references", ()))


def _merge_request(a) -> dict:
    from .config import load_config
    from .methods import get_method
    from .methods.catalog import params_from_cli

    if a.config:
        if a.models or a.method:
            raise MergeConfigError("give either --config or MODEL... with --method, not both")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            req = load_config(a.config)
        for w in caught:  # parameters the method ignores, as mergekit does: one plain line
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    else:
        if not a.models:
            raise MergeConfigError("no models given (MODEL... or --config FILE.yaml)")
        req = {"method": a.method or "cart", "models": list(a.models), "base": a.base, "params": {},
               "dtype": None, "out_dtype": None}
    if a.base is not None:
        req["base"] = a.base
    if a.dtype is not None:
        req["dtype"] = a.dtype
    if a.out_dtype is not None:
        req["out_dtype"] = a.out_dtype
    req["params"].update(params_from_cli(a, req["method"]))
    get_method(req["method"], **req["params"])  # every value checked now, naming the parameter, before any read
    req["model_files"] = _model_files(req) if a.config else None
    return req


def _print_plan(plan: dict, out=None) -> None:
    out = out or sys.stdout
    w = max([len(r["name"]) for r in plan["tensors"]] + [6])
    meth = dict(plan["method"])
    name = meth.pop("method", "?")
    print(f"method: {name}  " + " ".join(f"{k}={v}" for k, v in meth.items()), file=out)
    print(f"models: {len(plan['models'])}  " + "  ".join(plan["models"]), file=out)
    if plan["base"]:
        print(f"base:   {plan['base']}", file=out)
    print(f"device: {plan['device']} (element-wise ops: {plan['elementwise']})", file=out)
    print(f"\n{'tensor':<{w}}  {'shape':<16} {'dtype -> out':<20} {'treatment':<14} {'GFLOP':>10}", file=out)
    for r in plan["tensors"]:
        treat = (f"low rank k={r['k']}" if r["lowrank"] else ("copied" if r["kind"] == "passthrough" else "dense"))
        shape = "x".join(str(s) for s in r["shape"]) or "scalar"
        print(f"{r['name']:<{w}}  {shape:<16} {r['dtype'] + ' -> ' + r['out_dtype']:<20} {treat:<14} "
              f"{r['flops'] / 1e9:>10.3f}", file=out)
    est = plan["peak_memory_estimate"]
    print(f"\n{plan['num_tensors']} tensors, {plan['num_lowrank']} low rank; "
          f"{plan['total_flops'] / 1e9:.2f} GFLOP", file=out)
    print(f"read {_human(plan['bytes_in'])}, write {_human(plan['bytes_out'])}; "
          f"largest output tensor {_human(plan['largest_tensor_bytes'])}", file=out)
    print(f"estimated peak memory: host {_human(est['host_bytes'])} (anonymous; mmap'd inputs are page cache)"
          + (f", device {_human(est['device_bytes'])}" if est["device_bytes"] else ""), file=out)
    if plan["held_in_memory"]:
        print("note: in-memory inputs are not counted: " + ", ".join(plan["held_in_memory"]), file=out)


def cmd_merge(a) -> int:
    from .engine import merge_checkpoints, plan_merge

    # Everything imported so far (torch's modules, ~10^5 objects) lives for the whole run: moving it out of the
    # cyclic collector's generations keeps each full collection during the merge from walking it again.
    gc.freeze()

    req = _merge_request(a)
    common = dict(method=req["method"], base=req["base"], out_dtype=req["out_dtype"], dtype=req["dtype"],
                  device=a.device, read_ahead=a.read_ahead, trust_pickle=a.trust_pickle, **req["params"])
    if a.dry_run:
        _print_plan(plan_merge(req["models"], shard_size=a.shard_size, **common))
        return 0
    if not a.out:
        raise MergeConfigError("--out DIR is required")
    from .distributed import init_from_env

    ctx, created = init_from_env(a.device)  # under torchrun: every rank merges a share of the tensors
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rep = merge_checkpoints(req["models"], a.out, shard_size=a.shard_size, overwrite=a.overwrite,
                                    model_files=req["model_files"],
                                    progress=not a.quiet, allow_nonfinite=a.allow_nonfinite, resume=not a.no_resume,
                                    distributed=ctx is not None, **common)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    for w in caught if ctx is None or ctx.rank == 0 else ():  # one plain line each, not Python's file:line format
        print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    if not a.quiet and (ctx is None or ctx.rank == 0):
        ranks = "" if ctx is None else f" by {ctx.world} processes"
        print(f"wrote {rep.out_dir}: {rep.tensors} tensors ({rep.merged} merged, {rep.passthrough} copied), "
              f"{_human(rep.bytes_written)} in {rep.seconds:.1f} s{ranks}", file=sys.stderr)
    return 0


def cmd_info(a) -> int:
    from .io import open_model

    src = open_model(a.path, trust_pickle=a.trust_pickle)
    try:
        keys = src.keys()
        infos = [src.info(k) for k in keys]
        w = max([len(k) for k in keys] + [6])
        print(f"{'tensor':<{w}}  {'shape':<20} {'dtype':<10} {'size':>10}")
        for k, i in zip(keys, infos):
            shape = "x".join(str(s) for s in i.shape) or "scalar"
            print(f"{k:<{w}}  {shape:<20} {str(i.dtype).replace('torch.', ''):<10} {_human(i.nbytes):>10}")
        by_dtype = {}
        for i in infos:
            d = str(i.dtype).replace("torch.", "")
            by_dtype[d] = by_dtype.get(d, 0) + i.numel
        total = sum(i.nbytes for i in infos)
        print(f"\n{len(keys)} tensors, {sum(i.numel for i in infos):,} parameters "
              f"({', '.join(f'{d}: {n:,}' for d, n in sorted(by_dtype.items()))}), {_human(total)}")
    finally:
        src.close()
    return 0


def cmd_lab(argv: List[str]) -> int:
    try:
        # import_module reads sys.modules, so a stand-in lab (tests) or a missing one is honoured
        lab = importlib.import_module("centered_merge.lab")
    except ModuleNotFoundError as e:
        if e.name in ("centered_merge.lab",):
            print(f"{PROG}: error: the lab tools (centered_merge.lab) are not installed in this build",
                  file=sys.stderr)
            return 1
        raise
    if not hasattr(lab, "main"):
        print(f"{PROG}: error: centered_merge.lab has no main()", file=sys.stderr)
        return 1
    rc = lab.main(argv)
    return int(rc or 0)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds through the engine's cleanup like Ctrl-C


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: List[str]) -> int:
    try:
        if argv and argv[0] == "lab":
            return cmd_lab(argv[1:])
        a = build_parser().parse_args(argv)
        if a.command == "merge":
            return cmd_merge(a)
        if a.command == "info":
            return cmd_info(a)
        if a.command == "lab":  # pragma: no cover  (handled above)
            return cmd_lab([])
    except MergeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to the output path", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `centered-merge info big/ | head`: stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    return 2


def console() -> None:
    """The installed `centered-merge` command: main(), then, after a merge or info, leave without the interpreter's
    teardown. Unloading torch's modules at exit costs ~0.5 s of a short merge (this machine, 2026-12-01:
    `python -c "import torch"` 1.55-1.81 s, 1.07-1.30 s with os._exit). By then the writer has fsynced and closed
    every file it wrote; the standard streams are flushed here. If any other thread is still running, or for the
    lab (which writes through libraries' own file objects), the normal exit is kept."""
    argv = sys.argv[1:]
    code = main(argv)
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if argv[:1] in (["merge"], ["info"]) and not others:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (`| head`) or a closed stream: nothing left to flush
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
