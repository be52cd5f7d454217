"""Layer stacking (mergekit's `slices` with `passthrough`): one model assembled from layer ranges of others.

    slices:
      - sources: [{model: A, layer_range: [0, 16]}]
      - sources: [{model: B, layer_range: [8, 24]}]
    merge_method: passthrough

gives a model whose layers 0..15 are A's 0..15 and whose layers 16..31 are B's 8..23. Tensors outside the layers
come from the first slice's model when they are embeddings (name holds embed, wte or wpe), from the last slice's
model otherwise (final norm, LM head), as mergekit takes pre-layer weights from the first slice and post-layer
weights from the last. The result is one lazy TensorSource; its config directory holds the first model's
config/tokenizer files with the layer count (num_hidden_layers, n_layer or num_layers) set to the new total.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import MergeConfigError
from .io import open_model
from .io.base import TensorInfo, TensorSource
from .methods import method_class
from .methods.schedule import Schedule, layer_index, value_at

_EMBED = re.compile(r"embed|wte|wpe")
_LAYER_SEGMENT = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks)\.)(\d+)(\.)")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class StackedLayers(TensorSource):
    def __init__(self, ranges: List[Tuple[str, int, int]], label: str):
        """ranges: (model path, first layer, end layer (exclusive)) in output order."""
        self.label = label
        self.ranges = ranges
        self._sources: Dict[str, TensorSource] = {}
        self._map: Dict[str, Tuple[str, str]] = {}  # output name -> (model, input name)
        self._tmp: Optional[Path] = None
        self.config_dir = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _source(self, model: str) -> TensorSource:
        if model not in self._sources:
            self._sources[model] = open_model(model)
        return self._sources[model]

    def _build(self) -> None:
        out_layer = 0
        for i, (model, lo, hi) in enumerate(self.ranges):
            src = self._source(model)
            by_layer: Dict[int, List[str]] = {}
            for k in src.keys():
                li = layer_index(k)
                if li is not None:
                    by_layer.setdefault(li, []).append(k)
            have = max(by_layer) + 1 if by_layer else 0
            if hi > have:
                raise MergeConfigError(f"{self.label}: slice {i}: layer_range [{lo}, {hi}] runs past the {have} "
                                       f"layers of {model}")
            for L in range(lo, hi):
                for k in by_layer.get(L, []):
                    self._map[_LAYER_SEGMENT.sub(lambda m: f"{m.group(1)}{out_layer}{m.group(3)}", k, count=1)] = (model, k)
                out_layer += 1
        first, last = self.ranges[0][0], self.ranges[-1][0]
        for model, pick in ((first, True), (last, False)):
            for k in self._source(model).keys():
                if layer_index(k) is None and bool(_EMBED.search(k)) == pick:
                    self._map[k] = (model, k)
        self.num_layers = out_layer
        self._write_config(first, out_layer)

    def _write_config(self, model: str, num_layers: int) -> None:
        src_dir = self._sources[model].config_dir
        if src_dir is None:
            return
        self._tmp = Path(tempfile.mkdtemp(prefix="centered_merge_stack_"))
        for p in Path(src_dir).iterdir():
            if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth")) and \
                    p.name != "model.safetensors.index.json":
                shutil.copyfile(p, self._tmp / p.name)
        cfg_path = self._tmp / "config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except ValueError:
                cfg = None
            if isinstance(cfg, dict):
                for k in LAYER_KEYS:
                    if k in cfg:
                        cfg[k] = num_layers
                cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        self.config_dir = self._tmp

    def keys(self) -> List[str]:
        return list(self._map)

    def info(self, key: str) -> TensorInfo:
        model, k = self._map[key]
        return self._sources[model].info(k)

    def get(self, key: str):
        model, k = self._map[key]
        return self._sources[model].get(k)

    def prefetch(self, key: str) -> None:
        model, k = self._map[key]
        self._sources[model].prefetch(k)

    def release(self, key: str) -> None:
        model, k = self._map[key]
        self._sources[model].release(k)  # another output key may map to k too: a later get re-faults the pages

    def file_of(self, key: str) -> str:
        model, k = self._map[key]
        return self._sources[model].file_of(k)

    def close(self) -> None:
        for s in self._sources.values():
            s.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


class SliceSchedule(Schedule):
    """A parameter value set per slice (mergekit's precedence inside a slice: source > slice > global), each
    evaluated with the slice's own layer numbering: a gradient in a slice runs over t = i / (n - 1) for the
    slice's n layers, as mergekit's planner computes t. Tensors outside the layers take the first slice's value
    (embeddings) or the last slice's (the rest), at t = 0, as mergekit plans them."""

    def __init__(self, slices: Sequence[Tuple[int, int, Any]]):
        self.slices = [(lo, hi, v) for lo, hi, v in slices]

    def at(self, name: str):
        li = layer_index(name)
        if li is None:
            return value_at(self.slices[0 if _EMBED.search(name) else -1][2], name)
        for lo, hi, v in self.slices:
            if lo <= li < hi:
                local = _LAYER_SEGMENT.sub(lambda m: f"{m.group(1)}{li - lo}{m.group(3)}", name, count=1)
                return value_at(v, local)
        raise MergeConfigError(f"tensor {name!r} is in layer {li}, past the {self.slices[-1][1]} stacked layers")

    def map_values(self, fn):
        return SliceSchedule([(lo, hi, v.map_values(lambda x, w: fn(x, f"layers {lo}..{hi - 1}, {w}"))
                               if isinstance(v, Schedule) else fn(v, f"layers {lo}..{hi - 1}"))
                              for lo, hi, v in self.slices])

    def describe(self):
        return [{"layers": [lo, hi], "value": v.describe() if isinstance(v, Schedule) else v}
                for lo, hi, v in self.slices]


def _layer_range(e, where: str) -> Tuple[int, int]:
    lr = e.get("layer_range")
    if (not isinstance(lr, (list, tuple)) or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr) or not 0 <= lr[0] < lr[1]):
        raise MergeConfigError(f"{where}.layer_range must be [first, end) with 0 <= first < end; got {lr!r}")
    return lr[0], lr[1]


def _one_value(vs: List[Tuple[int, int, Any]]):
    """One slice-wise value: plain when every slice has the same plain value, else a SliceSchedule."""
    if all(v == vs[0][2] and not isinstance(v, Schedule) for _, _, v in vs):
        return vs[0][2]
    return SliceSchedule(vs)


def _per_position(value, n: int) -> List[Any]:
    return list(value) if isinstance(value, list) and len(value) == n and n > 1 else [value] * n


def from_slices(slices, method: str, base: Optional[str], base_is_reference: bool, global_params: Dict[str, Any],
                cfg_dir: Path, source: str):
    """mergekit's `slices:` for any method -> (models, base, params, ignored).

    Each slice lists sources with layer ranges of equal length; output layers are the slices' layers in order.
    The k-th source of every slice forms one stacked input model (StackedLayers); when the method works relative
    to a base, the source naming base_model in each slice forms the stacked base instead. Parameters follow
    mergekit's precedence: the source's own > the slice's > the global ones, each evaluated per slice."""
    from .config import _Values, _mapping, _model_path

    if not isinstance(slices, list) or not slices:
        raise MergeConfigError(f"{source}: 'slices' must be a non-empty list")
    parsed = []  # per slice: (n layers, [(model, lo, hi, params)], slice params)
    for i, s in enumerate(slices):
        where = f"{source}: slices[{i}]"
        srcs = s.get("sources") if isinstance(s, dict) else None
        if not isinstance(srcs, list) or not srcs:
            raise MergeConfigError(f"{where}: expected sources: [{{model, layer_range}}, ...]")
        entries = []
        for j, e in enumerate(srcs):
            if not isinstance(e, dict):
                raise MergeConfigError(f"{where}.sources[{j}]: expected {{model, layer_range}}")
            lo, hi = _layer_range(e, f"{where}.sources[{j}]")
            entries.append((_model_path(e, cfg_dir, f"{where}.sources[{j}]"), lo, hi,
                            _mapping(e.get("parameters"), f"{where}.sources[{j}].parameters")))
        lengths = {hi - lo for _, lo, hi, _ in entries}
        if len(lengths) != 1:
            raise MergeConfigError(f"{where}: all sources of a slice must span the same number of layers (as "
                                   "mergekit requires)")
        base_at = None
        if base is not None and base_is_reference:
            at = [j for j, (m, *_r) in enumerate(entries) if Path(m) == Path(base)]
            if len(at) != 1:
                raise MergeConfigError(f"{where}: {method} works relative to base_model {base}; each slice must "
                                       "list it exactly once among its sources")
            base_at = at[0]
        parsed.append((lengths.pop(), entries, base_at, _mapping(s.get("parameters"), f"{where}.parameters")))
    counts = {len(e) for _, e, _, _ in parsed}
    if len(counts) != 1:
        raise MergeConfigError(f"{source}: slices with different numbers of sources are not supported (each "
                               "position across the slices is one stacked model)")

    positions: List[List[Tuple[str, int, int]]] = []
    base_ranges: List[Tuple[str, int, int]] = []
    per_slice = []  # (first output layer, end, params dict of that slice)
    ignored: List[str] = []
    out = 0
    for i, (n, entries, base_at, sparams) in enumerate(parsed):
        tasks = [e for j, e in enumerate(entries) if j != base_at]
        if base_at is not None:
            m, lo, hi, _ = entries[base_at]
            base_ranges.append((m, lo, hi))
        for k, (m, lo, hi, _) in enumerate(tasks):
            if len(positions) <= k:
                positions.append([])
            positions[k].append((m, lo, hi))
        vals = _Values(method, n, source)
        vals.read_global(global_params)
        vals.read_slice(i, sparams)
        for k, (_, _, _, mp) in enumerate(tasks):
            vals.read_model(k, mp, where=f"slices[{i}].sources[{k}]")
        per_slice.append((out, out + n, vals.params(), len(tasks)))
        ignored += [x for x in vals.ignored if x not in ignored]
        out += n
    if not positions:
        raise MergeConfigError(f"{source}: no models to merge besides the base model")

    params: Dict[str, Any] = {}
    for p in method_class(method).parameters:
        if not any(p.name in sp for _, _, sp, _ in per_slice):
            continue
        if not p.per_model:
            params[p.name] = _one_value([(lo, hi, sp.get(p.name)) for lo, hi, sp, _ in per_slice])
            continue
        cols = [_per_position(sp.get(p.name), t) for _, _, sp, t in per_slice]
        per_pos = [_one_value([(lo, hi, c[k]) for (lo, hi, _, _), c in zip(per_slice, cols)])
                   for k in range(len(positions))]
        params[p.name] = per_pos[0] if all(v == per_pos[0] and not isinstance(v, list) for v in per_pos) \
            else per_pos
    built: List[StackedLayers] = []
    try:
        for k, r in enumerate(positions):
            built.append(StackedLayers(r, f"{source}: slices, model {k + 1}"))
        if base_ranges:
            built.append(StackedLayers(base_ranges, f"{source}: slices, base"))
    except BaseException:
        for b in built:
            b.close()
        raise
    stacked_base = built.pop() if base_ranges else None
    return built, stacked_base, params, ignored


