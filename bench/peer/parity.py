"""Parity with mergekit itself: the same YAML configs through `mergekit-yaml` and `centered-merge merge --config`.

Builds small Llama-shaped models (transformers, random weights, no download), writes one YAML per (method,
variant) -- differing weights, a gradient, a filter list, normalize flipped -- runs both tools, and prints per
method and variant: the largest per-tensor relative difference ||ours - mergekit|| / ||mergekit|| (deterministic
methods; the target is <= 1e-3 with bf16 output), or for random-mask methods the kept fraction and each merged
tensor's mean and norm as the largest relative gap to mergekit's, plus wall time and peak RSS of each tool.

Run with `make peer-parity` (the venv of `make peer`, with a pinned mergekit; never part of `make test`). `make peer`
(bench/peer/run_peer.py) is the head-to-head on the YAML files of bench/peer/configs/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
MIN_RANDOM_NUMEL = 100_000
FILTER = [{"filter": "self_attn", "value": 0.8}, {"value": 0.4}]


def build_models(root: Path, n_models: int, layers: int, seed: int, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    paths = []
    for i in range(n_models + 1):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        with torch.no_grad():
            for (k, p), (_, q) in zip(m.named_parameters(), base.named_parameters()):
                p.copy_(q if i == 0 else q + 0.02 * torch.randn_like(q.float()).to(q.dtype) * (1 + i))
        d = root / ("base" if i == 0 else f"ft{i}")
        m.save_pretrained(d, safe_serialization=True)
        paths.append(str(d))
    return paths[0], paths[1:]


def write_tokenizer(d: Path, tokens) -> None:
    """A word-level tokenizer whose token -> id map is `tokens` in order (tokenizer.json and the rest, as
    transformers saves them), so that both tools read the vocabulary a model's embedding rows follow."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=tokens[0]).save_pretrained(d)


def build_vocabularies(root: Path, base: str, models, vocab: int = 256, seed: int = 0) -> str:
    """Tokenizers for the models of build_models, all of `vocab` entries (the embedding's rows): the base has
    t0..t255; ft1 the same tokens in another order, but with t200..t209 replaced by m0..m9; ft2 the base's order
    with t220..t249 replaced by n0..n29 and m0..m9; ft3 the base's. The returned tokenizer-only directory (the
    tokenizer source) orders the base's tokens at random, leaves t250..t255 out and adds n0..n19 (only ft2 has
    them), m0..m9 (ft1 and ft2) and x0..x4 (no model): every default-row rule of mergekit is exercised."""
    g = torch.Generator().manual_seed(seed)
    base_toks = [f"t{i}" for i in range(vocab)]
    write_tokenizer(Path(base), base_toks)
    ft1 = [base_toks[i] for i in torch.randperm(vocab, generator=g).tolist()]
    ft1 = [f"m{int(t[1:]) - 200}" if 200 <= int(t[1:]) < 210 else t for t in ft1]
    ft2 = [f"n{i - 220}" if 220 <= i < 250 else t for i, t in enumerate(base_toks)]
    ft2 = [f"m{i - 200}" if 200 <= i < 210 else t for i, t in enumerate(ft2)]
    for d, toks in zip(models, (ft1, ft2, base_toks)):
        write_tokenizer(Path(d), toks)
    src = base_toks[:250] + [f"n{i}" for i in range(20)] + [f"m{i}" for i in range(10)] + [f"x{i}" for i in range(5)]
    src = [src[i] for i in torch.randperm(len(src), generator=g).tolist()]
    tok_dir = root / "tokenizer_source"
    write_tokenizer(tok_dir, src)
    return str(tok_dir)


def slices_cfg(method: str, base, two, layers: int = 4):
    """Two slices over the models' layers with a value at each precedence level: the sources' own weight in the
    first slice, a slice-level gradient in the second, a global filter list under both (passthrough: `scale`,
    one model per slice, stacking layers)."""
    key = "scale" if method == "passthrough" else "weight"
    half = layers // 2
    if method == "passthrough":
        first = [{"model": two[0], "layer_range": [0, half], "parameters": {key: 0.5}}]
        second = [{"model": two[1], "layer_range": [half - 1, layers]}]
    else:
        first = [{"model": m, "layer_range": [0, half], "parameters": {key: w}} for m, w in zip(two, (0.7, 0.4))]
        second = [{"model": m, "layer_range": [half, layers]} for m in two]
        if base is not None:
            first.append({"model": base, "layer_range": [0, half]})
            second.append({"model": base, "layer_range": [half, layers]})
    c = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16",
         "parameters": {key: [{"filter": "self_attn", "value": 0.9}, {"value": 0.6}]},
         "slices": [{"sources": first}, {"sources": second, "parameters": {key: [{"filter": "mlp", "value": [0.2, 1.0]}]}}]}
    if base is not None:
        c["base_model"] = base
    return c


def variants(method: str, base: str, models, tokenizer: str = None):
    """(variant name, config) pairs for one method; `tokenizer`: the tokenizer source of build_vocabularies."""
    two = models[:2]

    def cfg(model_params, params=None, with_base=True):
        c = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16",
             "models": [{"model": m, "parameters": p} for m, p in zip(two, model_params)]}
        if with_base:
            c["base_model"] = base
        if params:
            c["parameters"] = params
        return c

    sparse = {"ties": {"density": 0.5}, "dare_linear": {"density": 0.5}, "dare_ties": {"density": 0.5},
              "breadcrumbs": {"density": 0.8, "gamma": 0.05}, "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
              "della": {"density": 0.5, "epsilon": 0.1}, "della_linear": {"density": 0.5, "epsilon": 0.1}}
    extra = sparse.get(method, {})
    if method in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                  "della", "della_linear"):
        with_base = method != "linear"
        out = [("weights 0.7/0.3", cfg([{"weight": 0.7, **extra}, {"weight": 0.3, **extra}], with_base=with_base)),
               ("gradient", cfg([{"weight": [0.2, 0.9], **extra}, {"weight": 0.5, **extra}], with_base=with_base)),
               ("filter list", cfg([{"weight": FILTER, **extra}, {"weight": 0.6, **extra}], with_base=with_base))]
        default_norm = method in ("linear", "ties", "della")
        out.append((f"normalize {not default_norm}".lower(),
                    cfg([{"weight": 0.7, **extra}, {"weight": 0.5, **extra}], {"normalize": not default_norm},
                        with_base=with_base)))
        if method in ("linear", "task_arithmetic"):
            out.append(("slices precedence", slices_cfg(method, base if with_base else None, two)))
            if tokenizer is not None:  # embeddings re-indexed into another vocabulary
                # a base_model always: without one mergekit's `base` is the first of an unordered set of models
                c = cfg([{"weight": 0.7}, {"weight": 0.3}])
                if not with_base:  # linear: the base is merged too (mergekit adds it to the inputs)
                    c["models"].insert(0, {"model": base, "parameters": {"weight": 0.2}})
                out.append(("tokenizer path", {**c, "tokenizer_source": tokenizer}))
                out.append(("tokenizer base", {**c, "tokenizer_source": "base"}))
        return out
    if method == "passthrough":
        return [("slices scale", slices_cfg(method, None, models[:1] + models[1:2]))]
    if method == "sce":
        return [("select_topk 1", cfg([{}, {}])), ("select_topk 0.5", cfg([{}, {}], {"select_topk": 0.5}))]
    if method == "slerp":
        return [("t 0.3", {**cfg([{}], {"t": 0.3}), "models": [{"model": base}, {"model": models[0]}]}),
                ("t gradient", {**cfg([{}], {"t": [0.0, 0.5, 1.0]}), "models": [{"model": base}, {"model": models[0]}]})]
    if method == "nuslerp":
        return [("weights 0.7/0.3", cfg([{"weight": 0.7}, {"weight": 0.3}], with_base=False))]
    if method == "multislerp":
        return [("weights 0.7/0.3", cfg([{"weight": 0.7}, {"weight": 0.3}], with_base=False))]
    if method == "karcher":
        return [("defaults", cfg([{}, {}], with_base=False))]
    if method == "model_stock":
        return [("defaults", cfg([{}, {}]))]
    raise ValueError(method)


def run(cmd, env=None):
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return None, wall, r.stderr.strip().splitlines()[-3:]
    rss_kb = int(r.stderr.strip().splitlines()[-1])
    return rss_kb / 1024, wall, None


def load_dir(d: Path):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(ours, theirs, base, random: bool):
    missing = sorted(set(ours) ^ set(theirs)) + sorted(k for k in set(ours) & set(theirs)
                                                      if ours[k].shape != theirs[k].shape)
    common = sorted(k for k in set(ours) & set(theirs) if k not in missing)
    if not random:
        worst, where = 0.0, None
        for k in common:
            a, b = ours[k].float(), theirs[k].float()
            rel = float((a - b).norm() / b.norm().clamp(min=1e-12))
            if rel > worst:
                worst, where = rel, k
        return {"max_rel": worst, "where": where, "missing": missing}
    # random draws: per-tensor statistics of tensors large enough for a 1% comparison to mean something
    # (the kept fraction of n entries has a sampling spread of about sqrt(d(1-d)/n)); smaller ones are skipped
    gaps = {"kept": 0.0, "mean": 0.0, "norm": 0.0, "delta_norm": 0.0}
    for k in (k for k in common if ours[k].numel() >= MIN_RANDOM_NUMEL):
        a, b, z = ours[k].float(), theirs[k].float(), base[k].float()
        ka, kb = float((a != z).float().mean()), float((b != z).float().mean())
        gaps["kept"] = max(gaps["kept"], abs(ka - kb) / max(kb, 1e-12))
        gaps["mean"] = max(gaps["mean"], abs(float(a.mean() - b.mean())) / max(abs(float(b.mean())), float(b.abs().mean())))
        gaps["norm"] = max(gaps["norm"], abs(float(a.norm() - b.norm())) / float(b.norm().clamp(min=1e-12)))
        da, db = (a - z).norm(), (b - z).norm()
        gaps["delta_norm"] = max(gaps["delta_norm"], abs(float(da - db)) / float(db.clamp(min=1e-12)))
    return {**gaps, "missing": missing}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "slerp", "nuslerp",
                    "multislerp", "karcher", "model_stock", "passthrough"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64, help="hidden size (random-mask statistics need >= 256)")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    bindir = Path(sys.executable).parent
    root = Path(a.workdir or tempfile.mkdtemp(prefix="peer_"))
    root.mkdir(parents=True, exist_ok=True)
    base, models = build_models(root / "models", 3, a.layers, seed=0, hidden=a.hidden)
    tokenizer = build_vocabularies(root, base, models)
    base_sd = load_dir(Path(base))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    print(f"models: Llama-shaped, hidden {a.hidden}, {a.layers} layers, bf16, in {root}; "
          f"load {os.getloadavg()[0]:.1f}; random-mask statistics over tensors of >= {MIN_RANDOM_NUMEL} entries")
    print(f"{'method':<17} {'variant':<16} {'result':<58} {'mk s':>6} {'ours s':>6} {'mk MiB':>7} {'ours MiB':>8}")
    worst_det = 0.0
    for method in a.methods:
        for vname, cfg in variants(method, base, models, tokenizer):
            tag = f"{method}-{vname.replace(' ', '_').replace('/', '_')}"
            cfg_path = root / f"{tag}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            mk_out, our_out = root / f"mk-{tag}", root / f"ours-{tag}"
            mk_rss, mk_s, mk_err = run([str(bindir / "mergekit-yaml"), str(cfg_path), str(mk_out), "--random-seed",
                                        "0", "--no-copy-tokenizer"], env)
            our_rss, our_s, our_err = run([sys.executable, "-m", "centered_merge", "merge", "--config", str(cfg_path),
                                           "--out", str(our_out), "-q", "--overwrite"], env)
            if mk_err or our_err:
                res = f"failed: {'mergekit: ' + ' '.join(mk_err) if mk_err else 'ours: ' + ' '.join(our_err)}"[:58]
            else:
                r = compare(load_dir(our_out), load_dir(mk_out), base_sd, method in RANDOM)
                if method in RANDOM:
                    res = (f"kept {r['kept']:.2%} mean {r['mean']:.2%} norm {r['norm']:.3%} dnorm {r['delta_norm']:.2%}")
                else:
                    worst_det = max(worst_det, r["max_rel"])
                    res = f"max rel {r['max_rel']:.2e} ({(r['where'] or '-').replace('model.', '')[:30]})"
                if r["missing"]:
                    res += f" names differ: {len(r['missing'])}"
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            print(f"{method:<17} {vname:<16} {res:<58} {mk_s:>6.1f} {our_s:>6.1f} {fmt(mk_rss, '>7.0f')} "
                  f"{fmt(our_rss, '>8.0f')}", flush=True)
    print(f"\nlargest per-tensor relative difference over deterministic methods: {worst_det:.2e}")
    json.dump({"worst_deterministic": worst_det}, open(root / "summary.json", "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
