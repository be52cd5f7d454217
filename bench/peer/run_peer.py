"""Head-to-head with mergekit: the same YAML files through `mergekit-yaml` and `centered-merge merge --config`.

For every config in bench/peer/configs/ (or those named with --configs), on synthetic Llama-shaped models that it
builds itself (bench/peer/models.py), the harness runs both tools as separate processes, one after the other,
and prints per config: wall time, CPU time and peak anonymous memory of each process tree (bench/peer/measure.py),
the speed and memory ratios (mergekit / ours), and how far the outputs are apart (bench/peer/compare.py). A config
that centered_merge refuses is reported as `refused: <its message>`; one that mergekit fails on, as
`mergekit failed: <last line>`; neither stops the run.

Adding a config: drop a mergekit YAML file into bench/peer/configs/. Name models by the directories of the
synthetic set: `base` and `ft_1` ... `ft_T` (T is --T, default 4). The harness writes a copy of the file in which
those names are replaced by absolute paths (mergekit's model-card step takes a bare relative name for a Hugging
Face hub id and tries to look it up) and feeds that same copy to both tools. Random-mask methods (dare_*, della*)
are recognised by merge_method and compared by statistics instead of entry by entry. A config whose slices need
more layers than the set has is skipped with a note.

    make peer                                     # small set, every config
    .venv/bin/python bench/peer/run_peer.py --size 0.5b --configs task_arithmetic ties --repeats 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import compare as cmp  # noqa: E402
import measure  # noqa: E402
import models as synth  # noqa: E402

RANDOM_MASK = {"dare_linear", "dare_ties", "della", "della_linear"}
MODEL_KEYS = ("model", "base_model", "tokenizer_source")


@dataclass
class ToolRun:
    status: str               # "ok", "refused: ...", "failed: ..."
    wall_s: List[float] = field(default_factory=list)
    cpu_s: List[float] = field(default_factory=list)
    peak_anon: List[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def wall(self) -> float:
        return statistics.median(self.wall_s) if self.wall_s else float("nan")

    def peak(self) -> float:
        return max(self.peak_anon) if self.peak_anon else float("nan")

    def cpu(self) -> float:
        return statistics.median(self.cpu_s) if self.cpu_s else float("nan")


@dataclass
class Row:
    config: str
    method: str
    note: str = ""
    mergekit: Optional[ToolRun] = None
    ours: Optional[ToolRun] = None
    result: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- configs

def config_paths(names: List[str]) -> List[Path]:
    """Every *.yaml in configs/ (sorted), or the named ones (a name, a name.yaml, or a path)."""
    if not names:
        return sorted((HERE / "configs").glob("*.yaml"))
    out = []
    for n in names:
        p = Path(n)
        if not p.exists():
            p = HERE / "configs" / (n if n.endswith((".yaml", ".yml")) else n + ".yaml")
        if not p.exists():
            raise SystemExit(f"run_peer: no config {n!r} (looked in {HERE / 'configs'})")
        out.append(p)
    return out


def _resolve(node: Any, model_dir: Path, names: set, used: set) -> Any:
    """Copy of a parsed config with model names of the synthetic set replaced by absolute paths."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "tokenizer_source" and v in ("base", "union"):
                out[k] = v  # mergekit's keywords, not model names
            elif k in MODEL_KEYS and isinstance(v, str) and v in names:
                used.add(v)
                out[k] = str(model_dir / v)
            elif k in MODEL_KEYS and isinstance(v, str) and v.split("/")[0] in names:
                raise SystemExit(f"run_peer: model reference {v!r}: name models by their directory only")
            else:
                out[k] = _resolve(v, model_dir, names, used)
        return out
    if isinstance(node, list):
        return [_resolve(v, model_dir, names, used) for v in node]
    return node


def _max_layer(cfg: dict) -> int:
    top = 0
    for s in cfg.get("slices") or []:
        for src in (s or {}).get("sources") or []:
            lr = (src or {}).get("layer_range")
            if isinstance(lr, list) and len(lr) == 2:
                top = max(top, int(lr[1]))
    return top


def prepare(cfg_path: Path, model_dir: Path, spec: synth.ModelSpec, work: Path):
    """(method, resolved config path or None, note) for one config file."""
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    method = str((cfg or {}).get("merge_method", "?"))
    names = set(synth.model_names(spec))
    used: set = set()
    resolved = _resolve(cfg, model_dir, names, used)
    missing = sorted(_referenced(cfg) - names)
    if missing:
        return method, None, f"skipped: names {', '.join(missing)}, not in the set (base, ft_1..ft_{spec.T})"
    if _max_layer(cfg) > spec.layers:
        return method, None, f"skipped: its slices need {_max_layer(cfg)} layers, the set has {spec.layers}"
    out = work / "configs" / cfg_path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {cfg_path.name} with model names resolved by bench/peer/run_peer.py\n"
                   + yaml.safe_dump(resolved, sort_keys=False))
    return method, out, ""


def _referenced(cfg: Any) -> set:
    refs = set()
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if k in ("model", "base_model") and isinstance(v, str):
                refs.add(v)
            else:
                refs |= _referenced(v)
    elif isinstance(cfg, list):
        for v in cfg:
            refs |= _referenced(v)
    return refs


# --------------------------------------------------------------------------------------------- running

def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def run_tool(which: str, cmd: List[str], out_dir: Path, cwd: Path, timeout: float, log: Path) -> measure.RunResult:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    r = measure.run_measured(cmd, cwd=cwd, env=_env(), timeout=timeout)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n# rc={r.rc} wall={r.wall_s:.2f}s peak_anon={r.peak_anon}\n"
                   f"--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}\n")
    return r


def commands(args, cfg: Path, out_mk: Path, out_ours: Path):
    mk = [str(args.mergekit), str(cfg), str(out_mk)] + args.mergekit_args
    ours = [str(args.ours), "merge", "--config", str(cfg), "--out", str(out_ours)] + args.ours_args
    return mk, ours


def head_to_head(args, cfg_path: Path, model_dir: Path, spec, work: Path, pair_index: int) -> Row:
    method, cfg, note = prepare(cfg_path, model_dir, spec, work)
    row = Row(cfg_path.stem, method, note)
    if cfg is None:
        return row
    out_mk, out_ours = work / "out" / cfg_path.stem / "mergekit", work / "out" / cfg_path.stem / "ours"
    mk_cmd, ours_cmd = commands(args, cfg, out_mk, out_ours)
    row.mergekit, row.ours = ToolRun("ok"), ToolRun("ok")
    logs = work / "logs" / cfg_path.stem
    for rep in range(args.repeats):
        order = [("mergekit", mk_cmd, out_mk), ("ours", ours_cmd, out_ours)]
        if (pair_index + rep) % 2:  # alternate who goes first, so neither always meets the other's leftovers
            order.reverse()
        if args.skip_refused and rep == 0:
            order.sort(key=lambda o: o[0] != "ours")  # ours first, so that a refusal spares the mergekit run
        for which, cmd, out in order:
            tr: ToolRun = getattr(row, which)
            if not tr.ok:
                continue
            if which == "mergekit" and args.skip_refused and not row.ours.ok:
                tr.status = "not run (--skip-refused)"
                continue
            # The previous run's output may still be dirty in the page cache (mergekit does not fsync it, we do):
            # written back now, so that no run pays for the one before it.
            os.sync()
            if args.cache == "warm":
                measure.warm([model_dir / m for m in synth.model_names(spec)])
            r = run_tool(which, cmd, out, model_dir, args.timeout, logs / f"{which}-{rep + 1}.log")
            if r.rc != 0:
                # name the config as the user wrote it, not the resolved copy
                msg = _last_line(r.stderr if r.stderr.strip() else r.stdout).replace(str(cfg), cfg_path.name)
                if which == "ours":
                    msg = msg.split("error: ", 1)[-1]
                    tr.status = f"refused: {msg}" if r.rc in (1, 2) else f"failed (rc {r.rc}): {msg}"
                else:
                    tr.status = f"mergekit failed (rc {r.rc}): {msg}"
                continue
            tr.wall_s.append(r.wall_s)
            tr.cpu_s.append(r.cpu_s)
            tr.peak_anon.append(r.peak_anon)
    if row.mergekit.ok and row.ours.ok:
        base = model_dir / "base" if method in RANDOM_MASK else None
        c = cmp.compare(out_ours, out_mk, base)
        row.result = summarize(c, method)
    if not args.keep:
        shutil.rmtree(work / "out" / cfg_path.stem, ignore_errors=True)
    return row


def summarize(c: cmp.Comparison, method: str) -> Dict[str, Any]:
    r: Dict[str, Any] = {"tensors": c.n_tensors, "dtypes": list(c.dtypes)}
    if not c.structure_ok:
        r["structure"] = {"only_ours": c.only_ours[:5], "only_mergekit": c.only_theirs[:5],
                          "shape_mismatch": c.shape_mismatch[:5]}
    mx, where = c.max_rel()
    r.update(max_rel=mx, max_rel_tensor=where, median_rel=c.median_rel())
    if method in RANDOM_MASK:
        kept_ours, kept_mk = c.mean_kept()
        r.update(kept_ours=kept_ours, kept_mergekit=kept_mk)
        for key, (dev, name) in (("kept", c.kept_dev()), ("norm", c.norm_dev()), ("mean", c.mean_dev())):
            r[f"{key}_dev"], r[f"{key}_dev_tensor"] = dev, name
    return r


# --------------------------------------------------------------------------------------------- report

def _mib(b: float) -> str:
    return "" if b != b else f"{b / 2**20:.0f}"


def _s(x: float) -> str:
    return "" if x != x else f"{x:.2f}"


def table(rows: List[Row]) -> str:
    head = ("| config | method | mergekit s | ours s | speed-up | mergekit CPU s | ours CPU s | mergekit MiB | ours MiB "
            "| memory ours/mergekit | max rel diff | median rel diff | notes |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        mk, ours = r.mergekit, r.ours
        if mk is None:
            lines.append(f"| {r.config} | {r.method} |" + " |" * 10 + f" {r.note} |")
            continue
        notes = [s for s in (mk.status, ours.status) if s != "ok"]
        cells = [r.config, r.method, _s(mk.wall()) if mk.ok else "", _s(ours.wall()) if ours.ok else ""]
        both = mk.ok and ours.ok
        cells.append(f"{mk.wall() / ours.wall():.2f}x" if both else "")
        cells += [_s(mk.cpu()) if mk.ok else "", _s(ours.cpu()) if ours.ok else ""]
        cells += [_mib(mk.peak()) if mk.ok else "", _mib(ours.peak()) if ours.ok else ""]
        cells.append(f"{ours.peak() / mk.peak():.3f}" if both else "")
        res = r.result
        if res:
            cells += [f"{res['max_rel']:.2e}", f"{res['median_rel']:.2e}"]
            if "structure" in res:
                notes.append(f"different tensors: {res['structure']}")
            if res["dtypes"][0] != res["dtypes"][1]:
                notes.append(f"dtypes ours {res['dtypes'][0]} vs mergekit {res['dtypes'][1]}")
            if "kept_dev" in res:
                notes.append(f"random masks: kept {res['kept_ours']:.4f} vs {res['kept_mergekit']:.4f}; "
                             f"worst deviations kept {res['kept_dev']:.2%}, change norm {res['norm_dev']:.2%}, "
                             f"mean {res['mean_dev']:.2%}")
            elif res["max_rel"] > 0:
                notes.append(f"worst: {res['max_rel_tensor']}")
        else:
            cells += ["", ""]
        cells.append("; ".join(notes))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line() -> str:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--size", choices=sorted(synth.SIZES), default="small",
                    help="model set: small (parity, seconds) or 0.5b (issue 10's 4 x 0.49 B bf16)")
    ap.add_argument("--T", type=int, default=4, help="fine-tunes in the set (default 4)")
    ap.add_argument("--layers", type=int, default=0, help="override the size's layer count")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic models")
    ap.add_argument("--configs", nargs="*", default=[], help="config names or paths (default: all in configs/)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each tool per config (median wall, max memory)")
    ap.add_argument("--cache", choices=["warm", "as-is"], default="warm",
                    help="warm: read every input once before each run, so both tools start from the page cache")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="models, resolved configs, outputs, logs")
    ap.add_argument("--mergekit", type=Path, default=HERE / ".venv" / "bin" / "mergekit-yaml")
    ap.add_argument("--ours", type=Path, default=ROOT / ".venv" / "bin" / "centered-merge")
    ap.add_argument("--mergekit-args", nargs="*", default=[], help="extra arguments for mergekit-yaml")
    ap.add_argument("--ours-args", nargs="*", default=["--quiet"], help="extra arguments for centered-merge merge")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool run")
    ap.add_argument("--skip-refused", action="store_true",
                    help="run ours first and skip mergekit on configs that ours refuses (a quicker parity pass)")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs under WORK/out")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    # the tools run with the model directory as their working directory, so relative paths are resolved here
    args.mergekit, args.ours = args.mergekit.absolute(), args.ours.absolute()
    for tool in (args.mergekit, args.ours):
        if not tool.exists():
            raise SystemExit(f"run_peer: {tool} not found (run `make peer`, which builds both environments)")
    cfgs = config_paths(args.configs)
    spec = synth.spec_for(args.size, args.T, args.seed, args.layers)
    work = args.work.resolve()
    model_dir = work / "models" / f"{args.size}-L{spec.layers}-T{spec.T}-s{spec.seed}"
    print(f"models: {model_dir} (base + {spec.T} fine-tunes, {synth.n_params(spec) / 1e9:.3f} B parameters each, "
          f"bf16)", flush=True)
    synth.build(spec, model_dir)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    rows = []
    for i, p in enumerate(cfgs):
        print(f"[{i + 1}/{len(cfgs)}] {p.stem} ...", end=" ", flush=True)
        row = head_to_head(args, p, model_dir, spec, work, i)
        rows.append(row)
        if row.mergekit is None:
            print(row.note, flush=True)
        else:
            bits = [f"mergekit {row.mergekit.status if not row.mergekit.ok else _s(row.mergekit.wall()) + ' s'}",
                    f"ours {row.ours.status if not row.ours.ok else _s(row.ours.wall()) + ' s'}"]
            if row.result:
                bits.append(f"max rel {row.result['max_rel']:.2e}")
            print(", ".join(bits), flush=True)
    load_after = os.getloadavg()

    print()
    print(f"{started:%Y-%m-%d %H:%M} UTC; {machine_line()}")
    print(f"set: {args.size}, {spec.layers} layers, T={spec.T}; cache: {args.cache}; repeats: {args.repeats}; "
          f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, "
          f"after {'/'.join(f'{x:.2f}' for x in load_after)}")
    print(f"mergekit: {args.mergekit} {' '.join(args.mergekit_args)}; ours: {args.ours} {' '.join(args.ours_args)}")
    print()
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": started.isoformat(), "machine": machine_line(), "spec": asdict(spec), "size": args.size,
            "load_before": load_before, "load_after": load_after, "cache": args.cache, "repeats": args.repeats,
            "rows": [asdict(r) for r in rows]}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
