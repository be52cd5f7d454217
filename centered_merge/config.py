"""mergekit-shaped YAML configs -> a centered_merge merge (method name, models, base, parameters, dtypes).

Accepted shape (the part of mergekit's format that the methods we share can honour exactly):

    merge_method: cart            # or weight_average / linear, task_arithmetic, ties
    base_model: path/to/base      # needed by task_arithmetic and ties; config/tokenizer are copied from it
    models:
      - model: path/to/ft1
        parameters: {weight: 1.0, density: 0.2}
      - model: path/to/ft2
    parameters:                   # global; lambda -> lam; CART's own: rank, energy, indices, svd, ...
      lambda: 2.0
      rank: 0.12
    dtype: float32                # mergekit's compute dtype (we always accumulate in float32)
    out_dtype: bfloat16

Defaults follow mergekit where they differ from ours: a TIES config without density keeps every entry
(density 1.0), per-model weights default to 1.0, lambda to 1.0.

Anything we cannot honour exactly (per-layer schedules, filters, differing per-model weights where our method
has one global coefficient, normalize: false for TIES, slices, ...) is refused with a message saying so, rather
than silently merged differently from what mergekit would do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import MergeConfigError
from .methods import get_method, method_class
from .methods.params import Param
from .methods.catalog import yaml_keys

METHOD_ALIASES = {
    "linear": "weight_average", "weight_average": "weight_average", "model_soup": "weight_average",
    "task_arithmetic": "task_arithmetic", "ties": "ties", "cart": "cart", "dare": "dare",
}
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "name", "chat_template", "tokenizer"}


def _scalar(value, where: str):
    if isinstance(value, (list, dict)):
        raise MergeConfigError(
            f"{where}: per-layer schedules and filters (lists / [{{filter, value}}]) are not supported by "
            "centered_merge; give one value"
        )
    return value


def _resolve_model(spec, cfg_dir: Path, where: str) -> str:
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


def _all_equal(values: List[float], what: str, method: str) -> Optional[float]:
    cls = method_class(method)
    name = {"weights": "weight"}.get(what, what)
    check = cls.param(name).check if name in cls.defaults else Param(name, "float", 1.0, what).check
    values = [None if v is None else check(method, v) for v in values]
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    if max(vals) - min(vals) > 1e-12 * max(1.0, abs(max(vals))):
        raise MergeConfigError(
            f"{method}: per-model {what} differ ({', '.join(f'{v:g}' for v in vals)}); centered_merge's {method} "
            f"takes one {what} for all models"
        )
    return vals[0]


def from_mapping(cfg: Dict[str, Any], cfg_dir: Path = Path("."), source: str = "config") -> Dict[str, Any]:
    """Turn a parsed mergekit-style mapping into {method, models, base, params, dtype, out_dtype}."""
    if not isinstance(cfg, dict):
        raise MergeConfigError(f"{source}: expected a mapping at the top level")
    unknown = sorted(set(cfg) - _TOP_KEYS)
    if "slices" in cfg:
        raise MergeConfigError(f"{source}: 'slices' (layer stacking) is not supported; list whole models under 'models'")
    if unknown:
        raise MergeConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_TOP_KEYS))}")
    raw_method = str(cfg.get("merge_method", "")).strip()
    if not raw_method:
        raise MergeConfigError(f"{source}: 'merge_method' is required")
    if raw_method not in METHOD_ALIASES:
        raise MergeConfigError(f"{source}: merge_method {raw_method!r} is not supported; "
                               f"supported: {', '.join(sorted(METHOD_ALIASES))}")
    method = METHOD_ALIASES[raw_method]
    ts = cfg.get("tokenizer_source")
    if ts not in (None, "base"):
        raise MergeConfigError(f"{source}: tokenizer_source {ts!r} is not supported; tokenizer files are copied "
                               "from the base model (or the first model)")

    base = cfg.get("base_model")
    base = _resolve_model(base, cfg_dir, f"{source}: base_model") if base is not None else None
    entries = cfg.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise MergeConfigError(f"{source}: 'models' must be a non-empty list of {{model: PATH}} entries")
    models, weights, densities = [], [], []
    for i, e in enumerate(entries):
        where = f"{source}: models[{i}]"
        path = _resolve_model(e, cfg_dir, where)
        mp = (e.get("parameters") or {}) if isinstance(e, dict) else {}
        if not isinstance(mp, dict):
            raise MergeConfigError(f"{where}.parameters must be a mapping")
        per_model = {k: p.name for k, p in yaml_keys(method).items() if p.per_model}
        mp = {per_model.get(k, k): v for k, v in mp.items()}
        bad = sorted(set(mp) - {"weight", "density"})
        if bad:
            raise MergeConfigError(f"{where}.parameters: {', '.join(bad)} not supported per model (weight, density are)")
        if base is not None and method != "weight_average" and Path(path) == Path(base):
            continue  # mergekit lists the base among the models; it is the reference, not a task
        models.append(path)
        weights.append(_scalar(mp.get("weight"), f"{where}.parameters.weight"))
        densities.append(_scalar(mp.get("density"), f"{where}.parameters.density"))
    if not models:
        raise MergeConfigError(f"{source}: no models to merge besides the base model")

    gp = cfg.get("parameters") or {}
    if not isinstance(gp, dict):
        raise MergeConfigError(f"{source}: 'parameters' must be a mapping")
    # CART's indices is a list by nature (not a per-layer schedule): it goes through as given
    declared = yaml_keys(method)  # these are checked by their declarations, lists included
    gp = {k: v if k in declared else _scalar(v, f"{source}: parameters.{k}")
          for k, v in gp.items()}
    params: Dict[str, Any] = {}
    normalize = gp.pop("normalize", None)
    g_weight = gp.pop("weight", None)
    g_density = gp.pop("density", None)
    if g_weight is not None:
        weights = [g_weight if w is None else w for w in weights]
    if g_density is not None:
        densities = [g_density if d is None else d for d in densities]
    keys = yaml_keys(method)  # the method's declared parameters, by name and alias
    for k in list(gp):
        if k in keys and keys[k].name not in ("weight", "weights", "density"):
            p = keys[k]
            if p.name in params:
                raise MergeConfigError(f"{source}: parameters {k!r} and another name of {p.name} both given")
            params[p.name] = gp.pop(k)
    if gp:
        raise MergeConfigError(f"{source}: parameters {', '.join(sorted(gp))} are not used by {method}")

    where = f"{source} ({raw_method})"
    get_method(method, **params)  # the global values, checked by their declarations before any arithmetic
    if method == "weight_average":
        if "lam" in params:
            raise MergeConfigError(f"{where}: 'lambda' is not a parameter of weight averaging")
        if any(d is not None for d in densities):
            raise MergeConfigError(f"{where}: 'density' is not a parameter of weight averaging")
        if any(w is not None for w in weights):
            ws = [1.0 if w is None else w for w in weights]
            ws = get_method(method, weight=ws).params["weight"]  # checked by the declaration, naming it
            if normalize is False and abs(sum(ws) - 1.0) > 1e-6:
                raise MergeConfigError(f"{where}: normalize: false with weights not summing to 1 is not "
                                       "supported (weights are always normalised)")
            params["weight"] = ws
    elif method == "task_arithmetic":
        if any(d is not None for d in densities):
            raise MergeConfigError(f"{where}: 'density' is not a parameter of task arithmetic (use ties)")
        w = _all_equal([1.0 if x is None else x for x in weights], "weights", method)
        lam = float(params.get("lam", 1.0)) * w  # mergekit: base + lambda * sum_t w_t tau_t
        if normalize:
            lam /= w * len(models)  # ... / sum_t w_t
        params["lam"] = lam
    elif method == "ties":
        d = _all_equal(densities, "density", method)
        # mergekit's density defaults to 1.0 (no trimming) when a config gives none; keep its meaning
        params["density"] = 1.0 if d is None else d
        _all_equal([1.0 if x is None else x for x in weights], "weights", method)
        if normalize is False:
            raise MergeConfigError(f"{where}: normalize: false is not supported (TIES here takes the disjoint mean)")
    elif method == "cart":
        if any(d is not None for d in densities):
            raise MergeConfigError(f"{where}: 'density' is not a CART parameter (use rank or energy)")
        _all_equal([1.0 if x is None else x for x in weights], "weights", method)
        if normalize is False:
            raise MergeConfigError(f"{where}: normalize: false is not supported for cart")
    elif method == "dare":
        d = _all_equal(densities, "density", method)
        if d is not None:  # mergekit's density is the fraction kept
            if "p" in params:
                raise MergeConfigError(f"{where}: give density (kept) or p (dropped), not both")
            params["p"] = 1.0 - float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else d
        w = _all_equal([1.0 if x is None else x for x in weights], "weights", method)
        if w != 1.0:
            params["lam"] = float(params.get("lam", 1.0)) * w
    return checked({"method": method, "models": models, "base": base, "params": params,
                    "dtype": cfg.get("dtype"), "out_dtype": cfg.get("out_dtype")})


def checked(req: Dict[str, Any]) -> Dict[str, Any]:
    """`req` after building its method once, so every value is checked by its declaration (naming it)."""
    get_method(req["method"], **req["params"])
    return req


def load_config(path) -> Dict[str, Any]:
    """Read a YAML config file (see the module docstring) into {method, models, base, params, dtype, out_dtype}."""
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
    return from_mapping(cfg, p.absolute().parent, str(p))
