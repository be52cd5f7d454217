"""Small encoders for the 8x8 digits (an MLP and a CNN) and the per-task linear heads.

The encoder is the part that gets merged; each task keeps its own head (as CLIP keeps one zero-shot head
per task). Encoders return a feature vector; ``Classifier`` = encoder + head.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPEncoder(nn.Module):
    """64 -> width -> width -> width, ReLU after each layer."""

    def __init__(self, width: int = 256, depth: int = 3):
        super().__init__()
        dims = [64] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            h = F.relu(layer(h))
        return h


class CNNEncoder(nn.Module):
    """conv(1->c) conv(c->2c) pool conv(2c->2c) pool -> flatten (2c*2*2) -> linear -> width, ReLU."""

    def __init__(self, channels: int = 16, width: int = 128):
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.fc = nn.Linear(2 * c * 2 * 2, width)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc(h.flatten(1)))


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int = 10):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


ARCHS = ("mlp", "cnn")


def make_encoder(arch: str, **kw) -> nn.Module:
    if arch == "mlp":
        return MLPEncoder(**kw)
    if arch == "cnn":
        return CNNEncoder(**kw)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")


def clone_state(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}
