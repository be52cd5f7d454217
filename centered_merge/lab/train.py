"""Pretraining, linear probes, fine-tuning and evaluation, with a safetensors checkpoint cache.

All training is on CPU, seeded (torch.manual_seed for initialisation, a torch.Generator for data order),
deterministic for a given seed and thread count. A checkpoint is cached under ``cache_dir`` as
``<kind>-<arch>-<task>-<hash>.safetensors`` where the hash covers every setting that produced it, so a rerun
with the same settings loads it instead of training.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Split, TaskData
from .models import Classifier, make_encoder

CACHE_VERSION = "lab-v2"  # bump when training code changes in a way that changes checkpoints

StateDict = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------- cache
def config_hash(cfg: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **cfg}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(cache_dir: Optional[str], kind: str, cfg: dict,
           produce: Callable[[], StateDict]) -> Tuple[StateDict, bool]:
    """Load the checkpoint for ``cfg`` from the cache, or produce and save it. Returns (state, was_cached)."""
    if cache_dir is None:
        return produce(), False
    from safetensors.torch import load_file, save_file

    os.makedirs(cache_dir, exist_ok=True)
    name = f"{kind}-{cfg.get('arch', 'x')}-{cfg.get('task', 'x')}-{config_hash({'kind': kind, **cfg})}.safetensors"
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        try:
            return load_file(path), True
        except Exception:  # a truncated or foreign file: retrain and overwrite
            pass
    sd = produce()
    tmp = path + f".tmp{os.getpid()}"
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, tmp,
              metadata={"config": json.dumps(cfg, sort_keys=True, default=str), "kind": kind})
    os.replace(tmp, path)
    return sd, False


def split_state(sd: StateDict) -> Tuple[StateDict, StateDict]:
    """A Classifier state dict -> (encoder state, head state) with the prefixes removed."""
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    return enc, head


def join_state(enc: StateDict, head: StateDict) -> StateDict:
    return {**{f"encoder.{k}": v for k, v in enc.items()}, **{f"head.{k}": v for k, v in head.items()}}


# ---------------------------------------------------------------------------------------------- models
def build(arch: str, arch_kw: dict, enc: Optional[StateDict] = None,
          head: Optional[StateDict] = None) -> Classifier:
    model = Classifier(make_encoder(arch, **arch_kw))
    if enc is not None:
        model.encoder.load_state_dict(enc)
    if head is not None:
        model.head.load_state_dict(head)
    return model


@torch.no_grad()
def features(encoder: nn.Module, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(x[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def accuracy(model: Classifier, split: Split) -> float:
    model.eval()
    pred = model.head(features(model.encoder, split.x)).argmax(1)
    return (pred == split.y).float().mean().item()


class Optimizer:
    """Plain SGD with momentum, or Adam, with the same update rules as torch.optim.SGD / torch.optim.Adam
    (L2 weight decay added to the gradient). Written out because constructing a torch.optim optimizer imports
    torch._dynamo, which costs more CPU than a whole quick lab run's training."""

    def __init__(self, params, kind: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        if kind not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {kind!r}")
        self.params = [p for p in params if p.requires_grad]
        self.kind, self.lr, self.momentum, self.wd, self.betas, self.eps = kind, lr, momentum, weight_decay, betas, eps
        self.state = [None] * len(self.params)
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad if self.wd == 0 else p.grad.add(p, alpha=self.wd)
            if self.kind == "sgd":
                if self.momentum == 0:
                    p.add_(g, alpha=-self.lr)
                    continue
                if self.state[i] is None:
                    self.state[i] = g.clone()
                else:
                    self.state[i].mul_(self.momentum).add_(g)
                p.add_(self.state[i], alpha=-self.lr)
            else:
                if self.state[i] is None:
                    self.state[i] = (torch.zeros_like(p), torch.zeros_like(p))
                m, v = self.state[i]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))


def _train_loop(model: nn.Module, params, split: Split, steps: int, lr: float, optimizer: str,
                batch: int, seed: int, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
    opt = Optimizer(params, optimizer, lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(split.y)
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        loss = F.cross_entropy(model(split.x[idx]), split.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# -------------------------------------------------------------------------------------------- training
def pretrain(arch: str, arch_kw: dict, task: TaskData, steps: int, lr: float, batch: int,
             seed: int) -> StateDict:
    """Train encoder + head from a seeded random init on ``task`` (the original digits). Classifier state."""
    torch.manual_seed(seed)
    model = build(arch, arch_kw)
    _train_loop(model, model.parameters(), task.train, steps, lr, "adam", batch, seed + 1)
    return model.state_dict()


def fit_probe(arch: str, arch_kw: dict, enc: StateDict, task: TaskData, steps: int = 300,
              lr: float = 0.01, weight_decay: float = 1e-4, seed: int = 0) -> StateDict:
    """A linear head fitted on the frozen encoder's features of the task's training split (full batch)."""
    torch.manual_seed(seed)
    model = build(arch, arch_kw, enc)
    feats = features(model.encoder, task.train.x)
    head = model.head
    fit_full_batch(head, feats, task.train.y, steps, lr, weight_decay)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def fit_full_batch(module: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
                   weight_decay: float) -> None:
    """Full-batch Adam on cross-entropy: the linear probes and the raw-pixel classifier."""
    opt = Optimizer(module.parameters(), "adam", lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def zero_shot_head(pretrained_head: StateDict, task: TaskData) -> StateDict:
    """The task's head built from the pretrained classifier alone, with no task data (the analogue of CLIP's
    zero-shot head built from class names): row label_perm[d] is the pretrained row of digit d."""
    inv = torch.argsort(torch.tensor(task.label_perm))
    return {"weight": pretrained_head["weight"][inv].clone(), "bias": pretrained_head["bias"][inv].clone()}


def finetune(arch: str, arch_kw: dict, enc: StateDict, head: StateDict, task: TaskData, steps: int,
             lr: float, optimizer: str, batch: int, seed: int, train_head: bool) -> StateDict:
    """Fine-tune from (enc, head) on the task's training split. With train_head=False the head stays frozen
    (as CLIP's zero-shot heads do) and only the encoder moves. Returns the Classifier state."""
    torch.manual_seed(seed)
    model = build(arch, arch_kw, enc, head)
    if train_head:
        params = list(model.parameters())
    else:
        for p in model.head.parameters():
            p.requires_grad_(False)
        params = list(model.encoder.parameters())
    _train_loop(model, params, task.train, steps, lr, optimizer, batch, seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
