"""The README.md model card of a merged model, and the library version it names."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("centered_merge")
    except Exception:  # noqa: BLE001  (not installed: running from a source tree)
        import centered_merge

        return getattr(centered_merge, "__version__", "unknown")


def model_card(method: Dict[str, Any], models: Sequence[str], base: Optional[str], out_dtypes: Sequence[str],
               merged: int, passthrough: int) -> str:
    import yaml

    front = {"library_name": "transformers", "tags": ["merge", "centered_merge", str(method.get("method"))]}
    params = {k: v for k, v in method.items() if k != "method"}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        "# Merged model", "",
        f"Merged with centered_merge {library_version()} "
        f"using the **{method.get('method')}** method.", "",
        "## Inputs", "",
    ]
    lines += [f"- {m}" for m in models]
    if base is not None:
        lines += ["", f"Base model: {base}"]
    lines += ["", "## Method and parameters", "", "```yaml",
              yaml.safe_dump({"method": method.get("method"), "parameters": params}, sort_keys=True).rstrip(),
              "```", "",
              f"Output dtype of merged tensors: {', '.join(out_dtypes) or '-'}; "
              f"{merged} tensors merged, {passthrough} copied through unchanged.", ""]
    return "\n".join(lines)
