"""End to end with real (tiny, randomly initialised) Hugging Face models, offline: build a 2-layer Llama
(hidden 32) and a 2-layer BERT with transformers, save fine-tuned-like variants with save_pretrained (one of them
sharded), merge them through the CLI with every method, load the result with AutoModel and run a forward pass."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from centered_merge.cli import main  # noqa: E402
from centered_merge.io import open_model  # noqa: E402

T = 3
METHODS = [
    ("cart", ["--rank", "0.25", "--lambda", "1.5"]),
    ("weight_average", []),
    ("task_arithmetic", ["--lambda", "0.4"]),
    ("ties", ["--density", "0.3"]),
]


def _variants(model, root, name, dtype, shard_first=False):
    """Save base + T perturbed copies of `model`; return (base_dir, [dirs])."""
    g = torch.Generator().manual_seed(1)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(T + 1):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(base_sd[k] + (0.02 * torch.randn(p.shape, generator=g) if i else 0))
        d = root / f"{name}{i}"
        model.to(dtype).save_pretrained(d, max_shard_size="40KB" if (shard_first and i == 1) else "5GB")
        model.to(torch.float32)
        dirs.append(str(d))
    return dirs[0], dirs[1:]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    base, fts = _variants(model, root, "llama", torch.bfloat16, shard_first=True)
    assert os.path.exists(os.path.join(fts[0], "model.safetensors.index.json"))  # a sharded input
    return base, fts


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=64)
    base, fts = _variants(transformers.BertModel(cfg), root, "bert", torch.float32)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    tok.save_pretrained(base)
    return base, fts


@pytest.mark.parametrize("method,flags", METHODS, ids=[m for m, _ in METHODS])
def test_llama_merge_loads_and_runs(tmp_path, llama, method, flags):
    base, fts = llama
    out = tmp_path / "merged"
    assert main(["merge", *fts, "--method", method, "--base", base, "--out", str(out), "-q", *flags]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "generation_config.json").exists()
    if method == "weight_average":  # the loaded weights are the average
        srcs = [open_model(d) for d in fts]
        k = "model.layers.1.mlp.up_proj.weight"
        ref = sum(s.get(k).float() for s in srcs) / T
        assert torch.equal(model.state_dict()[k], ref.bfloat16())


@pytest.mark.parametrize("method,flags", METHODS, ids=[m for m, _ in METHODS])
def test_bert_merge_loads_and_runs(tmp_path, bert, method, flags):
    base, fts = bert
    out = tmp_path / "merged"
    assert main(["merge", *fts, "--method", method, "--base", base, "--out", str(out), "-q",
                 "--shard-size", "50KB", *flags]) == 0
    assert (out / "model.safetensors.index.json").exists()
    model = transformers.AutoModel.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)  # tokenizer files copied from the base
    batch = tok(["w1 w2 w3", "w4"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[0] == 2 and hidden.shape[-1] == 32 and torch.isfinite(hidden).all()
    card = (out / "README.md").read_text()
    assert method in card and fts[0] in card
