"""Resume benchmark: a merge of >= 2 GB output killed (SIGKILL) N times at random points, resumed each time with
the same command; at the end the output must be byte-identical to one uninterrupted run. Prints the total time
of the interrupted runs against the uninterrupted one (same inputs, same machine, same run of this script).

    python bench/bench_resume.py --size-gb 2 --kills 10 --method weight_average

Inputs are synthetic bf16 Llama-shaped checkpoints written with the engine's own writer (bench_engine's
make_checkpoint). The kill points are N distinct tensor counts drawn at random from 1..(number of tensors): run i
is killed as soon as the journal holds its count of finished tensors (polled every 5 ms), so every kill lands
inside the merge, and the last point may fall after the last tensor, while the directory is being finished.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_engine import layers_for, make_checkpoint, model_bytes  # noqa: E402


def digest_tree(d: Path) -> dict:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            out[str(p.relative_to(d))] = h.hexdigest()
    return out


def journal_lines(partial: Path) -> int:
    """Finished tensors recorded in the partial directory's journals (0 while there is none)."""
    n = 0
    try:
        for p in partial.glob(".centered_merge-journal*"):
            n += p.read_bytes().count(b"\n")
    except OSError:
        pass
    return n


def merge_cmd(models, out, method):
    return [sys.executable, "-m", "centered_merge", "merge", *models, "--method", method, "--out", str(out),
            "--shard-size", "1GB", "-q"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="output size (each of the T inputs is this size)")
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--method", default="weight_average")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed at the end)")
    a = ap.parse_args(argv)
    work = Path(a.dir or tempfile.mkdtemp(prefix="bench_resume-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(a.seed)
    try:
        layers = layers_for(a.size_gb)
        models = []
        for t in range(a.T):
            p = work / f"ft{t}"
            if not p.exists():
                make_checkpoint(p, layers, seed=t)
            models.append(str(p))
        print(f"inputs: {a.T} x {model_bytes(layers) / 1e9:.2f} GB bf16 ({layers} layers); method {a.method}; "
              f"load {os.getloadavg()}", flush=True)

        t0 = time.perf_counter()
        subprocess.run(merge_cmd(models, work / "reference", a.method), check=True, env=env)
        t_ref = time.perf_counter() - t0
        print(f"uninterrupted: {t_ref:.1f} s", flush=True)

        out = work / "resumed"
        partial = work / ".resumed.partial"
        n_tensors = len(json.loads((work / "reference" / "model.safetensors.index.json").read_text())["weight_map"])
        targets = sorted(rng.sample(range(1, n_tensors + 1), a.kills))
        t_total, kills = 0.0, []
        for target in targets:
            t0 = time.perf_counter()
            p = subprocess.Popen(merge_cmd(models, out, a.method), env=env, stderr=subprocess.DEVNULL)
            while p.poll() is None and journal_lines(partial) < target:
                time.sleep(0.005)
            p.send_signal(signal.SIGKILL)
            p.wait()
            t_total += time.perf_counter() - t0
            kills.append((target, round(time.perf_counter() - t0, 1), p.returncode))
            if p.returncode == 0:
                print("a run finished before its kill point", file=sys.stderr)
                return 1
        t0 = time.perf_counter()
        r = subprocess.run(merge_cmd(models, out, a.method)[:-1], env=env, capture_output=True, text=True)
        t_total += time.perf_counter() - t0
        resumed_line = next((l for l in r.stderr.splitlines() if "resuming" in l or "starting over" in l), "")
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        same = digest_tree(work / "reference") == digest_tree(out)
        result = {"uninterrupted_s": round(t_ref, 1), "interrupted_total_s": round(t_total, 1),
                  "ratio": round(t_total / t_ref, 2), "kills (tensor count, s, rc)": kills, "byte_identical": same,
                  "last_run": resumed_line.strip(), "load_end": os.getloadavg()}
        print(json.dumps(result, indent=1))
        return 0 if same else 1
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
