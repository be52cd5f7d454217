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
from typing import Dict, List, Optional, Tuple

from .errors import MergeConfigError
from .io import open_model
from .io.base import TensorInfo, TensorSource
from .methods.schedule import layer_index

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

    def file_of(self, key: str) -> str:
        model, k = self._map[key]
        return self._sources[model].file_of(k)

    def close(self) -> None:
        for s in self._sources.values():
            s.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def parse_slices(slices, cfg_dir: Path, source: str):
    """The `slices:` list of a passthrough config -> a StackedLayers source."""
    from .config import _model_path

    if not isinstance(slices, list) or not slices:
        raise MergeConfigError(f"{source}: 'slices' must be a non-empty list")
    ranges = []
    for i, s in enumerate(slices):
        where = f"{source}: slices[{i}]"
        srcs = s.get("sources") if isinstance(s, dict) else None
        if not isinstance(srcs, list) or len(srcs) != 1:
            raise MergeConfigError(f"{where}: passthrough takes exactly one source per slice")
        e = srcs[0]
        if not isinstance(e, dict):
            raise MergeConfigError(f"{where}.sources[0]: expected {{model, layer_range}}")
        if e.get("parameters") or s.get("parameters"):
            raise MergeConfigError(f"{where}: per-slice parameters are not supported with slices here")
        lr = e.get("layer_range")
        if (not isinstance(lr, (list, tuple)) or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr) or not 0 <= lr[0] < lr[1]):
            raise MergeConfigError(f"{where}.sources[0].layer_range must be [first, end) with 0 <= first < end; "
                                   f"got {lr!r}")
        ranges.append((_model_path(e, cfg_dir, f"{where}.sources[0]"), lr[0], lr[1]))
    return StackedLayers(ranges, f"{source}: slices")
