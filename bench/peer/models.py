"""Synthetic Llama-shaped test models for the head-to-head: one base and T fine-tunes, as Hugging Face directories.

Each model is a directory with config.json (LlamaForCausalLM, which mergekit's architecture detection matches),
sharded safetensors (one shard per decoder layer, plus one for the embeddings and the head) and
model.safetensors.index.json, all bfloat16. Fine-tune t is the base plus a seeded task vector made of
  - a low-rank part (rank `rank`) carrying 70% of the task vector's energy, as fine-tuning updates tend to be,
  - dense Gaussian noise carrying the rest,
  - a small per-tensor mean shift (0.2 of the task vector's RMS), so that the means of merged tensors are a
    meaningful thing to compare for random-mask methods;
with an RMS of `delta` times the base tensor's RMS. Norm weights are 1 + noise in the base and move by the same
relative amount. Every tensor is drawn from its own generator seeded by (seed, model, tensor name), so the models
do not depend on generation order.

Sets are cached: a finished directory holds `.complete` with the spec it was built from and is reused when the
spec matches.

    python bench/peer/models.py --size small --T 4 --out bench/peer/work/models/small-T4
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    T: int = 4
    seed: int = 0
    rank: int = 8       # rank of each task vector's low-rank part
    delta: float = 0.05  # task-vector RMS / base RMS

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


# "small": seconds to build and merge, for parity checks. "0.5b": issue 10's set (4 x 0.49 B parameters, bf16):
# hidden 2048, MLP 5632, 8 layers, vocab 32000, 16 heads of 128 with 4 KV heads (k/v 512 x 2048), untied head.
SIZES = {
    "small": dict(hidden=512, intermediate=1408, layers=4, vocab=4096, heads=8, kv_heads=4),
    "0.5b": dict(hidden=2048, intermediate=5632, layers=8, vocab=32000, heads=16, kv_heads=4),
}


def spec_for(size: str, T: int, seed: int = 0, layers: int = 0) -> ModelSpec:
    kw = dict(SIZES[size])
    if layers:
        kw["layers"] = layers
    return ModelSpec(T=T, seed=seed, **kw)


def shards(spec: ModelSpec) -> List[Dict[str, Tuple[int, ...]]]:
    """Tensor names and shapes, grouped by output shard: embeddings + final norm + head first, then one per layer."""
    h, f, kv = spec.hidden, spec.intermediate, spec.kv_dim
    out = [{"model.embed_tokens.weight": (spec.vocab, h), "model.norm.weight": (h,),
            "lm_head.weight": (spec.vocab, h)}]
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        out.append({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    return out


def n_params(spec: ModelSpec) -> int:
    total = 0
    for shard in shards(spec):
        for shape in shard.values():
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def model_names(spec: ModelSpec) -> List[str]:
    return ["base"] + [f"ft_{t}" for t in range(1, spec.T + 1)]


def hf_config(spec: ModelSpec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.hidden // spec.heads,
        "vocab_size": spec.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }


def _generator(spec: ModelSpec, model: int, name: str):
    import torch

    seed = (spec.seed * 1_000_003 + model * 7919 + zlib.crc32(name.encode())) % (2**63)
    return torch.Generator().manual_seed(seed)


def base_tensor(spec: ModelSpec, name: str, shape):
    import torch

    g = _generator(spec, 0, name)
    if len(shape) == 1:  # RMSNorm weights sit around 1
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def task_vector(spec: ModelSpec, t: int, name: str, base):
    """Fine-tune t's change to one float32 base tensor (see the module docstring)."""
    import torch

    g = _generator(spec, t, name)
    rms = float(base.std()) if base.dim() == 2 else 0.05
    target = spec.delta * rms
    noise = torch.randn(base.shape, generator=g)
    if base.dim() == 2:
        m, n = base.shape
        r = min(spec.rank, m, n)
        a = torch.randn(m, r, generator=g)
        b = torch.randn(r, n, generator=g)
        low = (a @ b) / (r ** 0.5)  # entries of unit variance
        d = low.mul_(0.7 ** 0.5).add_(noise, alpha=0.3 ** 0.5)
    else:
        d = noise
    return d.mul_(target).add_(0.2 * target)


def _write_shard(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def build(spec: ModelSpec, out: Path, quiet: bool = False) -> Path:
    """Write base/ and ft_1..ft_T/ under `out` (reused when `out/.complete` records the same spec)."""
    import torch

    marker = out / ".complete"
    want = json.dumps(asdict(spec), sort_keys=True)
    if marker.exists() and marker.read_text() == want:
        return out
    if out.exists():
        shutil.rmtree(out)
    names = model_names(spec)
    layout = shards(spec)
    files = [f"model-{i + 1:05d}-of-{len(layout):05d}.safetensors" for i in range(len(layout))]
    for m in names:
        (out / m).mkdir(parents=True)
        (out / m / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
    for i, shard in enumerate(layout):
        if not quiet:
            print(f"\rbuilding models: shard {i + 1}/{len(layout)}", end="", file=sys.stderr, flush=True)
        per_model: List[dict] = [{} for _ in names]
        for name, shape in shard.items():
            base = base_tensor(spec, name, shape).to(torch.bfloat16)
            per_model[0][name] = base
            b32 = base.float()
            for t in range(1, spec.T + 1):
                per_model[t][name] = (b32 + task_vector(spec, t, name, b32)).to(torch.bfloat16)
        for m, tensors in zip(names, per_model):
            _write_shard(out / m / files[i], tensors)
    weight_map = {name: files[i] for i, shard in enumerate(layout) for name in shard}
    index = {"metadata": {"total_size": 2 * n_params(spec)}, "weight_map": weight_map}
    for m in names:
        (out / m / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if not quiet:
        print(file=sys.stderr)
    marker.write_text(want)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--T", type=int, default=4, help="number of fine-tunes (default 4)")
    ap.add_argument("--layers", type=int, default=0, help="override the preset's layer count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    spec = spec_for(a.size, a.T, a.seed, a.layers)
    build(spec, a.out)
    print(f"{a.out}: base + {spec.T} fine-tunes, {n_params(spec) / 1e9:.3f} B parameters each (bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
