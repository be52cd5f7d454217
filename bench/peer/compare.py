"""Compare two merged Hugging Face directories tensor by tensor (ours against mergekit's, mergekit the reference).

Deterministic methods: per-tensor relative difference ||a - b|| / ||b|| in float32 (b = mergekit's tensor);
the largest and the median over tensors are reported, with the tensor that holds the largest.

Random-mask methods (dare, della): the two tools draw different masks, so their outputs cannot agree entry by
entry; what must agree is the statistics. For each tensor, against the base model's tensor:
  - kept fraction: the share of entries where the merged tensor differs from the base;
  - the norm of the merged change ||merged - base||;
  - the mean of the merged tensor;
each reported as the largest relative deviation |ours / mergekit's - 1| over tensors (for the mean: over tensors
whose mergekit mean is at least 3 standard errors from zero, where a ratio means something).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def tensor_files(model_dir: Path) -> Dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for an HF directory (index.json or lone files)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in wm.items()}
    from safetensors import safe_open

    out: Dict[str, Path] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = f
    return out


class LazyModel:
    """Reads one tensor at a time from an HF directory, keeping its files open."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.files = tensor_files(model_dir)
        self._open = {f: safe_open(str(f), framework="pt") for f in set(self.files.values())}

    def keys(self):
        return self.files.keys()

    def get(self, name: str):
        return self._open[self.files[name]].get_tensor(name)

    def dtype(self, name: str):
        return self._open[self.files[name]].get_slice(name).get_dtype()


@dataclass
class Comparison:
    n_tensors: int = 0
    only_ours: List[str] = field(default_factory=list)
    only_theirs: List[str] = field(default_factory=list)
    shape_mismatch: List[str] = field(default_factory=list)
    dtypes: Tuple[str, str] = ("", "")
    rel: Dict[str, float] = field(default_factory=dict)
    # random-mask statistics: name -> (ours, mergekit's)
    kept: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    delta_norm: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    mean: Dict[str, Tuple[float, float, float]] = field(default_factory=dict)  # (ours, theirs, std error)

    @property
    def structure_ok(self) -> bool:
        return not (self.only_ours or self.only_theirs or self.shape_mismatch)

    def max_rel(self) -> Tuple[float, str]:
        if not self.rel:
            return float("nan"), ""
        name = max(self.rel, key=self.rel.get)
        return self.rel[name], name

    def median_rel(self) -> float:
        return statistics.median(self.rel.values()) if self.rel else float("nan")

    @staticmethod
    def _worst(pairs: Dict[str, tuple]) -> Tuple[float, str]:
        worst, where = 0.0, ""
        for name, p in pairs.items():
            ours, theirs = p[0], p[1]
            dev = abs(ours / theirs - 1.0) if theirs else (0.0 if ours == 0 else float("inf"))
            if dev > worst:
                worst, where = dev, name
        return worst, where

    def kept_dev(self):
        return self._worst(self.kept)

    def norm_dev(self):
        return self._worst(self.delta_norm)

    def mean_dev(self):
        return self._worst({k: v for k, v in self.mean.items() if abs(v[1]) >= 3 * v[2]})

    def mean_kept(self) -> Tuple[float, float]:
        if not self.kept:
            return float("nan"), float("nan")
        return (statistics.fmean(v[0] for v in self.kept.values()),
                statistics.fmean(v[1] for v in self.kept.values()))


def compare(ours_dir: Path, theirs_dir: Path, base_dir: Optional[Path] = None) -> Comparison:
    """Compare every tensor; with `base_dir`, also the random-mask statistics against the base."""
    import torch

    a, b = LazyModel(ours_dir), LazyModel(theirs_dir)
    base = LazyModel(base_dir) if base_dir is not None else None
    c = Comparison()
    ka, kb = set(a.keys()), set(b.keys())
    c.only_ours, c.only_theirs = sorted(ka - kb), sorted(kb - ka)
    common = sorted(ka & kb)
    c.n_tensors = len(common)
    if common:
        c.dtypes = (str(a.dtype(common[0])), str(b.dtype(common[0])))
    for name in common:
        x, y = a.get(name), b.get(name)
        if x.shape != y.shape:
            c.shape_mismatch.append(f"{name} {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        x32, y32 = x.float(), y.float()
        den = float(torch.linalg.vector_norm(y32))
        num = float(torch.linalg.vector_norm(x32 - y32))
        c.rel[name] = num / den if den else num
        if base is not None and name in base.keys():
            z = base.get(name)
            if z.shape != y.shape:
                continue
            z32 = z.float()
            c.kept[name] = (float((x32 != z32).float().mean()), float((y32 != z32).float().mean()))
            c.delta_norm[name] = (float(torch.linalg.vector_norm(x32 - z32)),
                                  float(torch.linalg.vector_norm(y32 - z32)))
            n = y32.numel()
            c.mean[name] = (float(x32.mean()), float(y32.mean()), float(y32.std()) / max(1, n) ** 0.5 if n > 1 else 0.0)
    return c
