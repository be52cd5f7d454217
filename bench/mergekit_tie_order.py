"""Separates tie-breaking from everything else in the TIES/breadcrumbs parity with mergekit.

mergekit picks the entries it keeps with torch.argsort / torch.sort without `stable=True`; among equal magnitudes
at the threshold (bf16 task vectors hold many) the ones kept then follow that sort's internal order, which
depends on the implementation, device and torch version. centered_merge keeps the lowest flat indices. This
script re-runs mergekit on the YAML files a parity run left behind (`bench/peer/parity.py --workdir W`) with
those two functions forced stable (ties in flat order: the lowest indices first for a descending argsort, as
centered_merge keeps them) and compares the results with centered_merge's outputs in the same directory: what
remains is every difference that is not tie order.

Run it with the python of `make peer`'s venv (it imports mergekit):
    PYTHONPATH=. bench/peer/.venv/bin/python bench/peer/parity.py --methods ties breadcrumbs breadcrumbs_ties \
        --workdir /tmp/parity
    bench/peer/.venv/bin/python bench/mergekit_tie_order.py /tmp/parity
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

STABLE_MERGEKIT = """
import sys, torch
_argsort, _sort = torch.argsort, torch.sort
torch.argsort = lambda *a, **k: _argsort(*a, **{**k, "stable": True})
torch.sort = lambda *a, **k: _sort(*a, **{**k, "stable": True})
from mergekit.scripts.run_yaml import main
sys.argv[0] = "mergekit-yaml"
sys.exit(main())
"""


def load_dir(d: Path):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(ours, theirs):
    worst, entries = 0.0, 0
    for k in sorted(set(ours) & set(theirs)):
        a, b = ours[k].float(), theirs[k].float()
        worst = max(worst, float((a - b).norm() / b.norm().clamp(min=1e-12)))
        entries += int((a != b).sum())
    return worst, entries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path, help="a parity.py --workdir with <tag>.yaml and ours-<tag>/ in it")
    ap.add_argument("--methods", nargs="*", default=["ties", "breadcrumbs", "breadcrumbs_ties"])
    a = ap.parse_args(argv)
    print(f"{'config':<36} {'vs mergekit':>12} {'vs mergekit, stable sorts':>26} {'entries differing':>18}")
    for cfg in sorted(a.workdir.glob("*.yaml")):
        tag = cfg.stem
        if tag.rsplit("-", 1)[0] not in a.methods or not (a.workdir / f"ours-{tag}").is_dir():
            continue
        out = a.workdir / f"mk-stable-{tag}"
        r = subprocess.run([sys.executable, "-c", STABLE_MERGEKIT, str(cfg), str(out), "--random-seed", "0",
                            "--no-copy-tokenizer"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{tag:<36} mergekit failed: {r.stderr.strip().splitlines()[-1:]}")
            continue
        ours = load_dir(a.workdir / f"ours-{tag}")
        plain = compare(ours, load_dir(a.workdir / f"mk-{tag}"))[0] if (a.workdir / f"mk-{tag}").is_dir() else None
        stable, entries = compare(ours, load_dir(out))
        print(f"{tag:<36} {'-' if plain is None else format(plain, '.2e'):>12} {stable:>26.2e} {entries:>18}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
