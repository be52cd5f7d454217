"""Small synthetic checkpoints for the engine's tests (tensors of a few KB; no network, no GPU)."""
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.o_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (32, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 32),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (40, 16),
}


def make_state_dicts(T=3, dtype=torch.bfloat16, seed=0, scale=0.05, with_int=True):
    """(base, [T fine-tuned]) state dicts: float tensors perturbed from one base, plus an int buffer."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = [{k: (v + scale * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
              for _ in range(T)]
    base = {k: v.to(dtype) for k, v in base.items()}
    if with_int:
        for sd in models + [base]:
            sd["model.position_ids"] = torch.arange(8, dtype=torch.int64)
    return base, models


def save_models(tmp_path, base, models, kind="file"):
    """Write base + models as .safetensors files ('file'), HF dirs ('dir') or torch .bin ('bin')."""
    tmp_path = Path(tmp_path)
    paths = []
    for name, sd in [("base", base)] + [(f"ft{i}", m) for i, m in enumerate(models)]:
        if kind == "file":
            p = tmp_path / f"{name}.safetensors"
            save_file(sd, str(p))
        elif kind == "dir":
            p = tmp_path / name
            p.mkdir()
            save_file(sd, str(p / "model.safetensors"))
            (p / "config.json").write_text('{"model_type": "toy", "torch_dtype": "bfloat16"}')
        elif kind == "bin":
            p = tmp_path / f"{name}.bin"
            torch.save(sd, str(p))
        else:
            raise ValueError(kind)
        paths.append(str(p))
    return paths[0], paths[1:]


def tree_bytes(d):
    """{relative path: bytes} of every file under d (README excluded: it names the input paths)."""
    d = Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and p.name != "README.md"}


def leftovers(parent, name):
    """Anything at or next to the output path that a failed merge may have left (partial/old dirs)."""
    parent = Path(parent)
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))
