"""The README.md model card of a merged model, and the library version it names.

The card has the Hugging Face front matter mergekit writes (facts from mergekit 0.1.5's card.py):
`base_model` lists the inputs named like hub ids, `library_name: transformers`, and `tags`. Our tags are
`merge` and `centered_merge` (plus the method's name), not mergekit's `mergekit`: the hub's `mergekit` tag lists
models made with mergekit, and this one was not. The body names the method and the inputs and quotes the merge
configuration as YAML: the config file as given when there was one (as mergekit does), else the same shape
built from the method, its parameters and the models.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("centered_merge")
    except Exception:  # noqa: BLE001  (not installed: running from a source tree)
        import centered_merge

        return getattr(centered_merge, "__version__", "unknown")


def looks_like_hub_id(ref: str) -> bool:
    """mergekit's rule (card.is_hf) without its network look-up: a name starting with / or ~ or holding more than
    one / is a local path; one that does not exist locally is a hub id; an existing local name counts as a hub id
    when it has the `org/name` shape (a local clone named like its hub repository)."""
    if not ref or ref[0] in "/~." or ref.count("/") > 1 or not _HUB_ID.match(ref) or ref.endswith(_WEIGHT_SUFFIXES):
        return False
    return not Path(ref).exists() or ref.count("/") == 1


def hub_ids(refs: Sequence[str]) -> List[str]:
    out: List[str] = []
    for r in refs:
        if isinstance(r, str) and looks_like_hub_id(r) and r not in out:
            out.append(r)
    return out


def _config_shape(method: Dict[str, Any], models: Sequence[str], base: Optional[str]) -> Dict[str, Any]:
    """A mergekit-shaped config for a merge that came without one (CLI arguments, the Python API)."""
    cfg: Dict[str, Any] = {"merge_method": method.get("method")}
    if base is not None:
        cfg["base_model"] = base
    cfg["models"] = [{"model": m} for m in models]
    params = {k: v for k, v in method.items() if k != "method"}
    if params:
        cfg["parameters"] = params
    return cfg


def model_card(method: Dict[str, Any], models: Sequence[str], base: Optional[str], out_dtypes: Sequence[str],
               merged: int, passthrough: int, *, config_yaml: Optional[str] = None,
               references: Optional[Sequence[str]] = None) -> str:
    """The card's text. references: the models as the config names them (default: base, then models)."""
    import yaml

    refs = list(references) if references else ([base] if base is not None else []) + list(models)
    front = {"base_model": hub_ids(refs), "library_name": "transformers",
             "tags": ["merge", "centered_merge", str(method.get("method"))]}
    if config_yaml is None:
        config_yaml = yaml.safe_dump(_config_shape(method, models, base), sort_keys=False)
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        "# Merged model", "",
        f"Merged with centered_merge {library_version()} using the **{method.get('method')}** method"
        + (f", with {base} as the base" if base is not None else "") + ".", "",
        "## Inputs", "",
    ]
    lines += [f"- {m}" for m in models]
    lines += ["", "## Configuration", "", "The following YAML configuration produced this model:", "", "```yaml",
              config_yaml.rstrip(), "```", "",
              f"Output dtype of merged tensors: {', '.join(out_dtypes) or '-'}; "
              f"{merged} tensors merged, {passthrough} copied through unchanged.", ""]
    return "\n".join(lines)
