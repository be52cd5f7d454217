"""The output beside the tensors, as mergekit users expect it: the card's front matter and config, shard metadata,
config.json's dtype, tokenizer / generation config / chat template copying (tiny HF-style dirs built here)."""
import json
import os

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from centered_merge.cli import main
from centered_merge.engine.card import hub_ids, looks_like_hub_id
from centered_merge.io.chat_templates import TEMPLATES

from _engine_util import make_state_dicts


def _tokenizer(vocab):
    return {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []},
            "added_tokens": [{"id": len(vocab), "content": "<pad>"}]}


def hf_dir(path, sd, *, vocab=None, tok_extra="", template=None, config=None):
    """A tiny HF-style model directory: weights, config.json and (unless vocab is False) tokenizer files."""
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama", "num_hidden_layers": 1,
                                                            "torch_dtype": "float32"}))
    if vocab is not False:
        (path / "tokenizer.json").write_text(json.dumps(_tokenizer(vocab or {"a": 0, "b": 1})))
        tc = {"model_max_length": 8, "note": tok_extra}
        if template is not None:
            tc["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(tc))
        (path / "special_tokens_map.json").write_text('{"pad_token": "<pad>"}')
        (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "note": tok_extra}))
    return path


@pytest.fixture
def trio(tmp_path):
    base, models = make_state_dicts(T=2, with_int=False)
    root = tmp_path / "m"
    b = hf_dir(root / "base", base, tok_extra="base")
    ms = [hf_dir(root / f"ft{i}", m, tok_extra=f"ft{i}") for i, m in enumerate(models)]
    return tmp_path, b, ms


def run_config(tmp_path, cfg, out="o", extra=()):
    p = tmp_path / "merge.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc = main(["merge", "--config", str(p), "--out", str(tmp_path / out), "-q", *extra])
    return rc, tmp_path / out, p


def ta(base, models, **top):
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models], "out_dtype": "bfloat16",
            **top}


def front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_hub_id_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    (tmp_path / "org" / "clone").mkdir(parents=True)
    assert looks_like_hub_id("meta-llama/Llama-3.1-8B") and looks_like_hub_id("gpt2")  # not here: the hub
    assert looks_like_hub_id("org/clone")  # a local clone named like its repository
    assert not looks_like_hub_id("local") and not looks_like_hub_id("/abs/org/x") and not looks_like_hub_id("~/m")
    assert not looks_like_hub_id("a/b/c") and not looks_like_hub_id("./org") and not looks_like_hub_id("m.safetensors")
    assert hub_ids(["gpt2", "local", "gpt2", "org/clone"]) == ["gpt2", "org/clone"]


def test_card_front_matter_and_config(trio, monkeypatch):
    tmp, b, ms = trio
    monkeypatch.chdir(tmp)
    os.rename(tmp / "m", tmp / "org")  # relative names of the org/name shape: hub ids on the card
    cfg = ta("org/base", ["org/ft0", "org/ft1"])
    rc, out, cfg_path = run_config(tmp, cfg)
    assert rc == 0
    card = (out / "README.md").read_text()
    fm = front_matter(card)
    assert fm["base_model"] == ["org/base", "org/ft0", "org/ft1"]
    assert fm["library_name"] == "transformers" and "merge" in fm["tags"] and "mergekit" not in fm["tags"]
    text = cfg_path.read_text()
    assert f"```yaml\n{text.rstrip()}\n```" in card  # the configuration as given
    assert (out / "mergekit_config.yml").read_text() == text


def test_card_without_config_lists_no_local_paths(trio):
    tmp, b, ms = trio
    assert main(["merge", *map(str, ms), "--method", "task_arithmetic", "--base", str(b), "--out",
                 str(tmp / "o"), "-q"]) == 0
    card = (tmp / "o" / "README.md").read_text()
    assert front_matter(card)["base_model"] == []  # absolute paths are not hub ids
    body = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert body["merge_method"] == "task_arithmetic" and body["base_model"] == str(b)
    assert [m["model"] for m in body["models"]] == list(map(str, ms))
    assert not (tmp / "o" / "mergekit_config.yml").exists()


def test_shards_carry_format_pt_and_config_dtype(trio):
    tmp, b, ms = trio
    rc, out, _ = run_config(tmp, ta(b, ms), extra=("--shard-size", "2KB"))
    assert rc == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    for s in shards:
        with safe_open(str(s), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 1


def test_config_dtype_set_even_when_absent(tmp_path):
    base, models = make_state_dicts(T=2, with_int=False)
    b = hf_dir(tmp_path / "b", base, config={"model_type": "llama", "dtype": "float32"})
    ms = [hf_dir(tmp_path / f"f{i}", m) for i, m in enumerate(models)]
    rc, out, _ = run_config(tmp_path, ta(b, ms, out_dtype="float16"))
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and cfg["dtype"] == "float16"


def test_tokenizer_files_come_from_the_base_by_default(trio):
    tmp, b, ms = trio
    rc, out, _ = run_config(tmp, ta(b, ms))
    assert rc == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (b / name).read_bytes(), name
    assert not (out / "chat_template.jinja").exists()


def test_tokenizer_source_another_model_with_the_same_vocabulary(trio):
    tmp, b, ms = trio
    for top in ({"tokenizer_source": str(ms[1])}, {"tokenizer": {"source": str(ms[1])}}):
        rc, out, _ = run_config(tmp, ta(b, ms, **top), out="o" + str(len(top)) + list(top)[0])
        assert rc == 0
        for name in ("tokenizer_config.json", "generation_config.json", "tokenizer.json"):
            assert (out / name).read_bytes() == (ms[1] / name).read_bytes(), name
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"  # config: the base's


def _tok(vocab, pad_id=None):
    """tokenizer.json content: `vocab` plus <pad> as an added token (at `pad_id`, default len(vocab))."""
    return {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []},
            "added_tokens": [{"id": len(vocab) if pad_id is None else pad_id, "content": "<pad>"}]}


def _vocab_model(path, vocab, m, rows=None, config=None):
    """A model whose embedding / LM-head row r is [100 m + r, -(100 m + r) / 2] (and 10 m + r in the head)."""
    n = rows or len(vocab) + 1
    r = torch.arange(n, dtype=torch.float32) + 100 * m
    sd = {"model.embed_tokens.weight": torch.stack([r, -r / 2], 1), "lm_head.weight": torch.stack([r / 10, r], 1),
          "model.norm.weight": torch.full((2,), 1.0 + m), "model.layers.0.mlp.up_proj.weight": torch.full((2, 2), float(m))}
    d = hf_dir(path, sd, config=config)
    (d / "tokenizer.json").write_text(json.dumps(_tok(vocab)))
    return d, sd


@pytest.fixture
def vocab_trio(tmp_path):
    """base {a, b, e}, ft0 {b, a, e, f} (a and b swapped), ft1 {a, b, c, f}, each + <pad>; the tokenizer source
    {c, b, a, d, e, f} + <pad>: c only in ft1, d in none, e in base and ft0, f in ft0 and ft1 only."""
    b, sb = _vocab_model(tmp_path / "m" / "base", {"a": 0, "b": 1, "e": 2}, 0)
    f0, s0 = _vocab_model(tmp_path / "m" / "ft0", {"b": 0, "a": 1, "e": 2, "f": 3}, 1)
    f1, s1 = _vocab_model(tmp_path / "m" / "ft1", {"a": 0, "b": 1, "c": 2, "f": 3}, 2)
    tok, _ = _vocab_model(tmp_path / "m" / "tok", {"c": 0, "b": 1, "a": 2, "d": 3, "e": 4, "f": 5}, 3)
    return tmp_path, (b, f0, f1, tok), (sb, s0, s1)


def _expected_rows(key, sb, s0, s1):
    """Each input's rows in the source's order (c, b, a, d, e, f, <pad>), by mergekit's rules, worked by hand."""
    B, A0, A1 = sb[key], s0[key], s1[key]
    z = torch.zeros(2)
    c, d = A1[2], z                        # c: only ft1 has it (all take its row); d: nobody (zero)
    e_b, e_0 = B[2], A0[2]                 # e: base and ft0 have it; ft1 takes the base's row
    f_0, f_1 = A0[3], A1[3]                # f: ft0 and ft1 have it; the base takes their mean
    return (torch.stack([c, B[1], B[0], d, e_b, (f_0 + f_1) / 2, B[3]]),
            torch.stack([c, A0[0], A0[1], d, e_0, f_0, A0[4]]),
            torch.stack([c, A1[1], A1[0], d, e_b, f_1, A1[4]]))


def test_rows_land_where_the_tokens_say(vocab_trio):
    from centered_merge.io import open_model
    from centered_merge.io.vocabulary import VocabularyAligned, align_inputs

    tmp, (b, f0, f1, tok), sds = vocab_trio
    models, base = align_inputs([str(f0), str(f1)], str(b), str(tok), open_model)
    try:
        assert all(isinstance(s, VocabularyAligned) for s in models + [base])
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            want = _expected_rows(key, *sds)
            for s, w in zip([base] + models, want):
                assert s.info(key).shape == (7, 2)
                assert torch.equal(s.get(key), w), (s.label, key)
        assert torch.equal(models[0].get("model.norm.weight"), sds[1]["model.norm.weight"])  # not vocabulary rows
    finally:
        for s in models + [base]:
            s.close()


def test_tokenizer_source_with_another_vocabulary_reindexes_the_embeddings(vocab_trio):
    tmp, (b, f0, f1, tok), sds = vocab_trio
    cfg = {"merge_method": "task_arithmetic", "base_model": str(b), "out_dtype": "float32",
           "models": [{"model": str(f0), "parameters": {"weight": 0.5}},
                      {"model": str(f1), "parameters": {"weight": 0.25}}]}
    for top in ({"tokenizer_source": str(tok)}, {"tokenizer": {"source": str(tok)}}):
        rc, out, _ = run_config(tmp, {**cfg, **top}, out="o" + list(top)[0])
        assert rc == 0
        from safetensors.torch import load_file
        got = load_file(str(out / "model.safetensors"))
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            B, A0, A1 = _expected_rows(key, *sds)
            torch.testing.assert_close(got[key], B + 0.5 * (A0 - B) + 0.25 * (A1 - B), rtol=0, atol=1e-6)
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 7
        assert (out / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()


def test_tokenizer_source_base_reindexes_into_the_base_vocabulary(vocab_trio):
    """`base`: the base's vocabulary (a, b, e, <pad>); ft0's swapped a/b rows are put back in the base's order,
    and its row of f (not in the base's vocabulary) is dropped."""
    from safetensors.torch import load_file

    tmp, (b, f0, f1, tok), (sb, s0, s1) = vocab_trio
    cfg = {"merge_method": "linear", "out_dtype": "float32", "base_model": str(b), "tokenizer_source": "base",
           "models": [{"model": str(b), "parameters": {"weight": 0.5}}, {"model": str(f0), "parameters": {"weight": 0.5}}]}
    rc, out, _ = run_config(tmp, cfg)
    assert rc == 0
    got = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    E0 = s0["model.embed_tokens.weight"]
    A0 = torch.stack([E0[1], E0[0], E0[2], E0[4]])  # a, b, e, <pad> in ft0's ids
    torch.testing.assert_close(got, (sb["model.embed_tokens.weight"] + A0) / 2, rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 4


def test_same_vocabulary_is_read_unchanged(vocab_trio):
    from centered_merge.io import open_model
    from centered_merge.io.vocabulary import align_inputs

    tmp, (b, f0, f1, tok), _ = vocab_trio
    assert align_inputs([str(b)], str(b), "base", open_model) == ([str(b)], str(b))


def test_padded_embedding_rows_are_dropped_with_tokenizer_source_base(tmp_path):
    """mergekit sizes the embeddings by the tokenizer's length: padding rows beyond it go."""
    from centered_merge.io import open_model
    from centered_merge.io.vocabulary import align_inputs

    b, sb = _vocab_model(tmp_path / "b", {"a": 0, "b": 1}, 0, rows=8)
    models, base = align_inputs([str(b)], None, "base", open_model)
    try:
        assert torch.equal(models[0].get("lm_head.weight"), sb["lm_head.weight"][:3])
    finally:
        models[0].close()


def test_slices_are_reindexed_and_mixed_vocabularies_refused(vocab_trio, capsys):
    from safetensors.torch import load_file

    tmp, (b, f0, f1, tok), (sb, s0, s1) = vocab_trio
    src = lambda m: {"sources": [{"model": str(m), "layer_range": [0, 1]}]}  # noqa: E731
    cfg = {"merge_method": "passthrough", "out_dtype": "float32", "tokenizer_source": str(tok),
           "slices": [src(f0), src(f0)]}
    rc, out, _ = run_config(tmp, cfg)
    assert rc == 0
    got = load_file(str(out / "model.safetensors"))
    E = s0["model.embed_tokens.weight"]  # one input: what it lacks (c, d) is zero
    assert torch.equal(got["model.embed_tokens.weight"], torch.stack([0 * E[0], E[0], E[1], 0 * E[0], E[2], E[3], E[4]]))
    assert "model.layers.1.mlp.up_proj.weight" in got
    rc, out, _ = run_config(tmp, {**cfg, "slices": [src(f0), src(f1)]}, out="o2")
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists() and err.count("\n") == 1 and "different vocabularies" in err


def test_tokenizer_source_without_a_readable_vocabulary_is_refused(vocab_trio, capsys):
    tmp, (b, f0, f1, tok), _ = vocab_trio
    (tok / "tokenizer.json").unlink()
    (tok / "tokenizer.model").write_bytes(b"sentencepiece")
    rc, out, _ = run_config(tmp, ta(b, [f0, f1], tokenizer_source=str(tok)))
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    assert err.count("\n") == 1 and "sentencepiece" in err and "Traceback" not in err


@pytest.mark.parametrize("ts", ["union", "base"])
def test_tokenizer_block_sources(trio, capsys, ts):
    tmp, b, ms = trio
    rc, out, _ = run_config(tmp, ta(b, ms, tokenizer={"source": ts}))
    if ts == "union":
        err = capsys.readouterr().err
        assert rc == 1 and "union" in err and err.count("\n") == 1 and not out.exists()
    else:
        assert rc == 0 and (out / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_chat_template_by_name_written_where_transformers_reads_it(trio):
    tmp, b, ms = trio
    rc, out, _ = run_config(tmp, ta(b, ms, chat_template="chatml"))
    assert rc == 0
    assert (out / "chat_template.jinja").read_text() == TEMPLATES["chatml"]
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == TEMPLATES["chatml"] and tc["note"] == "base"  # the rest of the base's file kept


def test_chat_template_literal_and_auto(tmp_path, capsys):
    base, models = make_state_dicts(T=3, with_int=False)
    t1, t2 = "{% for m in messages %}{{ m['content'] }}{% endfor %}", "{{ messages[0]['content'] }} only one"
    b = hf_dir(tmp_path / "b", base, template=t1)
    ms = [hf_dir(tmp_path / f"f{i}", m, template=t) for i, (m, t) in enumerate(zip(models, (t2, t2, t1)))]
    (ms[2] / "chat_template.jinja").write_text(t2)  # read first, as transformers does
    rc, out, _ = run_config(tmp_path, ta(b, ms, chat_template="auto"), out="auto")
    assert rc == 0 and (out / "chat_template.jinja").read_text() == t2  # 3 of 4 carry t2
    rc, out, _ = run_config(tmp_path, ta(b, ms, chat_template=t1), out="lit")
    assert rc == 0 and json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == t1
    rc, out, _ = run_config(tmp_path, ta(b, ms, chat_template="nosuchname"), out="bad")
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists() and "neither a known template name" in err and err.count("\n") == 1


def test_templates_render_the_formats():
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

    def render(name, msgs, gen=True):
        return env.from_string(TEMPLATES[name]).render(messages=msgs, add_generation_prompt=gen, bos_token="<s>",
                                                       eos_token="</s>")

    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": " hi "}]
    assert render("chatml", conv) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n hi <|im_end|>\n" \
                                     "<|im_start|>assistant\n"
    assert render("llama3", conv, gen=False) == "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\n" \
                                                "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n"
    assert render("mistral", conv + [{"role": "assistant", "content": "A"}]) == "<s> [INST] S\n\n hi  [/INST] A</s>"
    assert render("alpaca", conv) == "S\n\n### Instruction:\nhi### Response:\n"
    assert render("exaone", conv[1:]) == "[|system|][|endofturn|]\n[|user|] hi \n[|assistant|]"


def test_transformers_reads_the_template_and_dtype(trio):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tmp, b, ms = trio
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    for d in [b] + ms:  # real tokenizer files in place of the stand-ins
        for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (d / n).unlink()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<unk>",
                                             eos_token="<unk>").save_pretrained(str(d))
    rc, out, _ = run_config(tmp, ta(b, ms, chat_template="chatml"))
    assert rc == 0
    loaded = transformers.AutoTokenizer.from_pretrained(str(out))
    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert transformers.AutoConfig.from_pretrained(str(out)).dtype == torch.bfloat16


def test_chat_template_without_tokenizer_files(tmp_path):
    base, models = make_state_dicts(T=2, with_int=False)
    b = hf_dir(tmp_path / "b", base, vocab=False)
    ms = [hf_dir(tmp_path / f"f{i}", m, vocab=False) for i, m in enumerate(models)]
    rc, out, _ = run_config(tmp_path, ta(b, ms, chat_template="llama3"))
    assert rc == 0 and (out / "chat_template.jinja").read_text() == TEMPLATES["llama3"]
    assert not (out / "tokenizer_config.json").exists()  # nothing to set it in: no half tokenizer


def test_bad_tokenizer_config_refused_before_merging(trio, capsys):
    tmp, b, ms = trio
    (b / "tokenizer_config.json").write_text("[1, 2]")
    rc, out, _ = run_config(tmp, ta(b, ms, chat_template="chatml"))
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists() and "tokenizer_config.json: not a JSON object" in err
