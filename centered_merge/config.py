"""mergekit-shaped YAML configs -> a centered_merge merge request, with mergekit's meaning for each piece (facts
read from mergekit's config.py and plan.py; see docs/mergekit.md for what is supported and what differs).

    merge_method: ties            # any registered method (centered_merge.methods.available()), cart included
    base_model: path/to/base      # the reference of the task-vector methods; config/tokenizer files come from it
    models:
      - model: path/to/ft1
        parameters: {weight: 0.7, density: [0.2, 0.5]}      # per-model values; a list = a gradient over layers
      - model: path/to/ft2
        parameters:
          weight: [{filter: self_attn, value: 0.3}, {value: 0.5}]   # chosen by tensor name
    parameters: {lambda: 1.0, normalize: true}               # global values (and fallbacks of per-model ones)
    dtype: float32                # mergekit's compute dtype (we always accumulate in float32)
    out_dtype: bfloat16

Rules: a parameter's value is looked up per tensor, per model first, then globally, then the method's default as
mergekit has it (`yaml_default` in the declaration: e.g. TIES's density 1.0, task arithmetic's lambda 1.0). Every
value is checked by the method's declaration (methods/params.py) before any file is read. Parameters the method
does not take are ignored with one warning naming them, as mergekit does. `slices` stack layers with passthrough
(centered_merge/stacking.py).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import MergeConfigError
from .methods import available, method_class
from .methods.catalog import yaml_keys
from .methods.schedule import Chain, Gradient, Schedule, from_yaml

METHOD_ALIASES = {name: name for name in available()}
METHOD_ALIASES["model_soup"] = "weight_average"
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "name")
# keys mergekit takes that change nothing here: accepted with the ignored-parameter warning
_MERGEKIT_NOOP = ("int8_mask",)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _model_path(spec, cfg_dir: Path, where: str) -> str:
    if isinstance(spec, dict):
        spec = spec.get("model", spec.get("path"))
    if not isinstance(spec, (str, Path)) or not str(spec):
        raise MergeConfigError(f"{where}: expected a model path; got {spec!r}")
    s = str(spec)
    if "+" in s and not Path(s).exists():
        raise MergeConfigError(f"{where}: {s!r}: model+LoRA references are not supported; merge the LoRA first")
    p = Path(s).expanduser()
    if not p.is_absolute() and not p.exists() and (cfg_dir / p).exists():
        return str(cfg_dir / p)
    return str(p)


def _mapping(value, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeConfigError(f"{where} must be a mapping; got {value!r}")
    return value


def read_num_layers(model: Optional[str]) -> Optional[int]:
    """The layer count in a model directory's config.json (num_hidden_layers, n_layer or num_layers), else None."""
    if model is None:
        return None
    p = Path(model)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    for k in LAYER_KEYS:
        v = data.get(k) if isinstance(data, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


class _Values:
    """Collects one method's parameter values from the levels of a config, and what was ignored."""

    def __init__(self, method: str, num_layers: Optional[int], source: str):
        self.method, self.num_layers, self.source = method, num_layers, source
        self.keys = yaml_keys(method)
        self.ignored: List[str] = []
        self.global_: Dict[str, Any] = {}
        self.slice_: Dict[str, Any] = {}  # a slice's own parameters (between per-model and global)
        self.per_model: List[Dict[str, Any]] = []

    def _value(self, p, raw, where):
        return from_yaml(raw, self.num_layers, where) if p.schedulable else raw

    def _read_level(self, params: Dict[str, Any], into: Dict[str, Any], where: str) -> None:
        """One level's `parameters:` mapping (global, or one slice's) into `into`, by canonical name."""
        for key, raw in params.items():
            p = self.keys.get(key)
            if p is None:
                self.ignored.append(f"{where}.{key}")
                continue
            if p.name in into:
                raise MergeConfigError(f"{self.source}: {where}: {key!r} and another name of {p.name} both given")
            into[p.name] = self._value(p, raw, f"{self.source}: {where}.{key}")

    def read_global(self, params: Dict[str, Any]) -> None:
        self._read_level(params, self.global_, "parameters")

    def read_slice(self, i: int, params: Dict[str, Any]) -> None:
        self._read_level(params, self.slice_, f"slices[{i}].parameters")

    def read_model(self, i: int, params: Dict[str, Any], where: Optional[str] = None) -> None:
        where = where or f"models[{i}]"
        mine = {}
        for key, raw in params.items():
            p = self.keys.get(key)
            if p is None or not p.per_model:  # mergekit reads only per-model ("tensor") parameters per model
                self.ignored.append(f"{where}.parameters.{key}")
                continue
            if p.name in mine:
                raise MergeConfigError(f"{self.source}: {where}.parameters: {key!r} and another name of "
                                       f"{p.name} both given")
            mine[p.name] = self._value(p, raw, f"{self.source}: {where}.parameters.{key}")
        self.per_model.append(mine)

    def params(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for p in method_class(self.method).parameters:
            g = _collapse([self.slice_.get(p.name), self.global_.get(p.name)])
            if p.per_model:
                levels = [[m.get(p.name), g] for m in self.per_model]
                if p.yaml_default is not None:
                    for lv in levels:
                        lv.append(p.yaml_default)
                if all(v is None for lv in levels for v in lv):
                    continue
                vals = [_collapse(lv) for lv in levels]
                vals = [p.default if v is None else v for v in vals]
                out[p.name] = vals[0] if all(v == vals[0] for v in vals) and not isinstance(vals[0], list) else vals
            else:
                if p.yaml_default is not None:
                    g = _collapse([g, p.yaml_default])
                if g is not None:
                    out[p.name] = g
        return out


def _collapse(levels: List[Any]):
    """A precedence list as a plain value when its first set level cannot fall through (a plain value or a
    gradient), else as a Chain."""
    levels = [v for v in levels if v is not None]
    if not levels:
        return None
    if not isinstance(levels[0], Schedule) or isinstance(levels[0], Gradient):
        return levels[0]
    return Chain(levels)


def from_mapping(cfg: Dict[str, Any], cfg_dir: Path = Path("."), source: str = "config") -> Dict[str, Any]:
    """A parsed mergekit-style mapping -> {method, models, base, params, dtype, out_dtype, tokenizer_source,
    chat_template}. Warns once (warnings.warn) naming the parameters the method ignores."""
    if not isinstance(cfg, dict):
        raise MergeConfigError(f"{source}: expected a mapping at the top level")
    if "modules" in cfg:
        raise MergeConfigError(f"{source}: 'modules' (multi-module architectures) is not supported; use models: "
                               "or slices:")
    unknown = sorted(set(cfg) - set(TOP_KEYS))
    raw_method = cfg.get("merge_method")
    if not isinstance(raw_method, str) or not raw_method.strip():
        raise MergeConfigError(f"{source}: 'merge_method' is required")
    raw_method = raw_method.strip()
    if raw_method not in METHOD_ALIASES:
        raise MergeConfigError(f"{source}: merge_method {raw_method!r} is not supported; "
                               f"supported: {', '.join(sorted(METHOD_ALIASES))} (docs/mergekit.md says why others "
                               "are not)")
    method = METHOD_ALIASES[raw_method]
    cls = method_class(method)

    base = cfg.get("base_model")
    base = _model_path(base, cfg_dir, f"{source}: base_model") if base is not None else None
    tokenizer_source = _tokenizer_source(cfg, cfg_dir, source)

    if ("slices" in cfg) == ("models" in cfg):
        raise MergeConfigError(f"{source}: give exactly one of 'models' and 'slices'")
    # mergekit's geometric methods work relative to the base whenever a config names one: here, use_base
    base_is_reference = cls.needs_base or (base is not None and "use_base" in cls.defaults)
    if "slices" in cfg:
        return _from_slices(cfg, method, base, base_is_reference, tokenizer_source, unknown, cfg_dir, source)
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeConfigError(f"{source}: 'models' must be a non-empty list of {{model: PATH}} entries")
    models, model_params = [], []
    for i, e in enumerate(entries):
        where = f"{source}: models[{i}]"
        path = _model_path(e, cfg_dir, where)
        mp = _mapping(e.get("parameters") if isinstance(e, dict) else None, f"{where}.parameters")
        if base is not None and base_is_reference and Path(path) == Path(base):
            continue  # mergekit lists the base among the models; it is the reference, not a task
        models.append(path)
        model_params.append(mp)
    if not models:
        raise MergeConfigError(f"{source}: no models to merge besides the base model")

    num_layers = read_num_layers(base or (models[0] if isinstance(models[0], str) else None))
    vals = _Values(method, num_layers, source)
    vals.read_global(_mapping(cfg.get("parameters"), f"{source}: parameters"))
    for i, mp in enumerate(model_params):
        vals.read_model(i, mp)
    return _request(cfg, method, models, base, vals.params(), vals.ignored, tokenizer_source, unknown, source)


def _request(cfg, method, models, base, params, ignored, tokenizer_source, unknown, source) -> Dict[str, Any]:
    if base is not None and "use_base" in method_class(method).defaults:
        params.setdefault("use_base", True)
    ignored = ignored + [f"{k} (top-level key)" for k in unknown]
    if ignored:
        warnings.warn(f"{source}: {method} ignores {', '.join(ignored)}", stacklevel=3)
    req = {"method": method, "models": models, "base": base, "params": params,
           "dtype": cfg.get("dtype"), "out_dtype": cfg.get("out_dtype"),
           "tokenizer_source": tokenizer_source, "chat_template": _chat_template(cfg, source),
           "references": _references(cfg)}
    req = checked(req)
    if tokenizer_source is not None:
        req["models"], req["base"] = _reindexed(models, base, tokenizer_source)
    return req


def _reindexed(models, base, tokenizer_source: str):
    """The inputs with their embedding rows re-indexed into the tokenizer source's vocabulary (mergekit's
    tokenizer_source; centered_merge/io/vocabulary.py), read lazily by the one pipeline."""
    from .engine.inputs import check_input_path
    from .io import open_model
    from .io.vocabulary import align_inputs, model_dir
    from .stacking import StackedLayers

    def dirs_of(m):
        if isinstance(m, StackedLayers):  # its rows follow its slices' models
            return [model_dir(path) for path, _, _ in m.ranges]
        return [model_dir(m)]

    for m in list(models) + ([base] if base is not None else []):
        check_input_path(m)
    return align_inputs(models, base, tokenizer_source, open_model, dirs_of)


def _from_slices(cfg, method, base, base_is_reference, tokenizer_source, unknown, cfg_dir, source):
    """`slices:` (layer stacking, or any method over layer ranges): centered_merge/stacking.py."""
    from .stacking import from_slices

    models, stacked_base, params, ignored = from_slices(
        cfg["slices"], method, base, base_is_reference, _mapping(cfg.get("parameters"), f"{source}: parameters"),
        cfg_dir, source)
    try:
        # a base the method does not work relative to is only mergekit's donor of config files: the stacked
        # model's own (layer count updated) serve instead
        return _request(cfg, method, models, stacked_base, params, ignored, tokenizer_source, unknown, source)
    except BaseException:
        for m in models + ([stacked_base] if stacked_base is not None else []):
            m.close()
        raise


def _references(cfg: Dict[str, Any]) -> List[str]:
    """The models as the config names them (base first), for the card's base_model list: mergekit lists the
    hub-style ones among them."""
    out: List[str] = []

    def add(spec):
        if isinstance(spec, dict):
            spec = spec.get("model", spec.get("path"))
        if isinstance(spec, str) and spec not in out:
            out.append(spec)

    add(cfg.get("base_model"))
    for e in cfg.get("models") or []:
        add(e)
    for s in cfg.get("slices") or []:
        for e in (s.get("sources") or []) if isinstance(s, dict) else []:
            add(e)
    return out


def _tokenizer_source(cfg, cfg_dir: Path, source: str) -> Optional[str]:
    """'base', a model path, or None. `union` (a merged vocabulary) is refused: it needs embedding surgery."""
    ts = cfg.get("tokenizer_source")
    tok = cfg.get("tokenizer")
    if ts is not None and tok is not None:
        raise MergeConfigError(f"{source}: give tokenizer_source or tokenizer, not both (as mergekit requires)")
    if tok is not None:
        tok = _mapping(tok, f"{source}: tokenizer")
        extra = sorted(set(tok) - {"source"})
        if extra:
            raise MergeConfigError(f"{source}: tokenizer.{extra[0]} is not supported (it changes the embeddings); "
                                   "only tokenizer.source is")
        ts = tok.get("source", "union")  # mergekit's default for the tokenizer: block
    if ts is None or ts == "base":
        return ts
    if ts == "union":
        raise MergeConfigError(f"{source}: tokenizer source 'union' (a merged vocabulary, with embedding surgery) "
                               "is not supported; use 'base' or a model path")
    if not isinstance(ts, str):
        raise MergeConfigError(f"{source}: tokenizer source must be 'base' or a model path; got {ts!r}")
    return _model_path(ts, cfg_dir, f"{source}: tokenizer_source")


def _chat_template(cfg, source: str) -> Optional[str]:
    ct = cfg.get("chat_template")
    if ct is not None and (not isinstance(ct, str) or not ct.strip()):
        raise MergeConfigError(f"{source}: chat_template must be a template name or a Jinja template string")
    return ct


def checked(req: Dict[str, Any]) -> Dict[str, Any]:
    """`req` after building its method once, so every value is checked by its declaration (naming it)."""
    from .methods import get_method

    m = get_method(req["method"], **req["params"])
    for p in m.parameters:
        v = m.params[p.name]
        if p.per_model and isinstance(v, list) and len(v) != len(req["models"]):
            raise MergeConfigError(f"{req['method']}: {len(v)} values of {p.name} for {len(req['models'])} models")
    return req


def load_config(path) -> Dict[str, Any]:
    """Read a YAML config file (see the module docstring) into a merge request."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise MergeConfigError(f"{p}: config file not found") from None
    except OSError as e:
        raise MergeConfigError(f"{p}: cannot read config ({e.strerror})") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeConfigError(f"{p}: not valid YAML ({e})") from None
    req = from_mapping(cfg, p.absolute().parent, str(p))
    req["config_yaml"] = text  # quoted in the model card and kept as mergekit_config.yml, as mergekit does
    return req
