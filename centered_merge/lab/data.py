"""Digits data for the lab: seeded train/validation/test splits and the fixed task transformations.

Everything comes from scikit-learn's bundled 8x8 digits (1,797 images, 10 classes); nothing is downloaded.
A *task* is the digits seen through one fixed transformation of the 8x8 image (a rotation, a flip, an
inversion, a fixed pixel permutation, ...). The transformation is fixed per task (its random parts, such as
the permutation or the noise, are drawn once from a seed), so each task is a distinct, deterministic dataset.
The split is made once on the original images, so the same image lands in the same split in every task:
no test image is ever seen in training or in the validation-based choices of any task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

SPLIT_SIZES = (1200, 250)  # train, validation; the remaining 347 images are the test split

# Tasks in the order the lab uses them; the first N are taken for --tasks N.
TASK_NAMES: Tuple[str, ...] = (
    "rot90", "flip_lr", "invert", "permute", "shift", "noise", "blur", "flip_ud",
    "rot270", "permute2", "checker", "transpose",
)
PRETRAIN_TASK = "identity"


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (n, 1, 8, 8) float32 in about [0, 1]
    y: torch.Tensor  # (n,) int64


@dataclass(frozen=True)
class TaskData:
    name: str
    train: Split
    val: Split
    test: Split
    # task label = label_perm[digit]: each task names the ten digits in its own order, so each task is a
    # distinct 10-way problem with its own head (as CLIP's tasks have their own class names and heads)
    label_perm: Tuple[int, ...] = tuple(range(10))

    def split(self, which: str) -> Split:
        if which not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {which!r}")
        return getattr(self, which)


def load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (images (1797, 8, 8) in [0, 1], labels).

    Reads the CSV that ships inside scikit-learn without importing sklearn.datasets (whose import costs
    more than the rest of a quick run); falls back to sklearn.datasets.load_digits if the file is elsewhere.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("sklearn")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if path is not None and os.path.exists(path):
        raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = raw[:, :-1].reshape(-1, 8, 8), raw[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.images.astype(np.float32), d.target.astype(np.int64)
    if x.shape != (1797, 8, 8):
        raise RuntimeError(f"unexpected digits data shape {x.shape} (expected (1797, 8, 8))")
    return x / 16.0, y


def load_digits_split(seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The digits split stratified by class into train / val / test (about 1200 / 250 / 347) with ``seed``.

    Within each class the images are shuffled with the seed and cut at the same fractions, so every split has
    the class proportions of the whole set. The split is disjoint and covers all images.
    """
    x, y = load_digits_arrays()
    rng = np.random.default_rng(seed)
    n = len(y)
    cuts = (SPLIT_SIZES[0] / n, (SPLIT_SIZES[0] + SPLIT_SIZES[1]) / n)
    which = np.empty(n, dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        q = (np.arange(len(idx)) + 0.5) / len(idx)
        which[idx] = np.searchsorted(cuts, q)  # 0 train, 1 val, 2 test
    out = {}
    for k, name in enumerate(("train", "val", "test")):
        sel = rng.permutation(np.flatnonzero(which == k))
        out[name] = (x[sel], y[sel])
    return out


def _stable_seed(name: str, seed: int) -> int:
    # a seed for a task's random parts that depends only on (task name, seed), not on the task order
    return (sum((i + 1) * ord(c) for i, c in enumerate(name)) * 7919 + seed * 104729) % (2**31 - 1)


def _box_blur(x: np.ndarray) -> np.ndarray:
    k = np.array([1.0, 2.0, 1.0], dtype=np.float32)
    k2 = np.outer(k, k) / 16.0
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="constant")
    out = np.zeros_like(x)
    for di in range(3):
        for dj in range(3):
            out += k2[di, dj] * padded[:, di:di + 8, dj:dj + 8]
    return out


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(x)
    h, w = x.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def make_transform(name: str, seed: int = 0) -> Callable[[np.ndarray, str], np.ndarray]:
    """The fixed transformation of a task: a function (images (n, 8, 8), split name) -> images."""
    rng = np.random.default_rng(_stable_seed(name, seed))
    if name == "identity":
        return lambda x, split: x
    if name == "rot90":
        return lambda x, split: np.rot90(x, 1, axes=(1, 2)).copy()
    if name == "rot270":
        return lambda x, split: np.rot90(x, 3, axes=(1, 2)).copy()
    if name == "flip_lr":
        return lambda x, split: x[:, :, ::-1].copy()
    if name == "flip_ud":
        return lambda x, split: x[:, ::-1, :].copy()
    if name == "transpose":
        return lambda x, split: np.transpose(x, (0, 2, 1)).copy()
    if name == "invert":
        return lambda x, split: 1.0 - x
    if name in ("permute", "permute2"):
        perm = rng.permutation(64)
        return lambda x, split: x.reshape(len(x), 64)[:, perm].reshape(-1, 8, 8).copy()
    if name == "shift":
        return lambda x, split: _shift(x, 2, 2)
    if name == "blur":
        return lambda x, split: _box_blur(x)
    if name == "checker":
        mask = ((np.add.outer(np.arange(8), np.arange(8)) % 2) == 0)
        return lambda x, split: np.where(mask, 1.0 - x, x).astype(np.float32)
    if name == "noise":
        # additive Gaussian noise, drawn once per image and split (a fixed, seeded dataset)
        split_offsets = {"train": 1, "val": 2, "test": 3}

        def noisy(x: np.ndarray, split: str) -> np.ndarray:
            r = np.random.default_rng(_stable_seed(name, seed) + split_offsets[split])
            return (x + 0.35 * r.standard_normal(x.shape)).astype(np.float32)
        return noisy
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(('identity',) + TASK_NAMES)}")


def label_permutation(name: str, seed: int = 0) -> Tuple[int, ...]:
    """The task's fixed relabelling of the digits (identity for the pretraining task)."""
    if name == PRETRAIN_TASK:
        return tuple(range(10))
    rng = np.random.default_rng(_stable_seed(name + "/labels", seed))
    return tuple(int(v) for v in rng.permutation(10))


def make_task(name: str, base: Dict[str, Tuple[np.ndarray, np.ndarray]], seed: int = 0,
              permute_labels: bool = True) -> TaskData:
    tf = make_transform(name, seed)
    perm = label_permutation(name, seed) if permute_labels else tuple(range(10))
    lut = np.array(perm, dtype=np.int64)
    splits = {}
    for which, (x, y) in base.items():
        xt = np.ascontiguousarray(tf(x, which), dtype=np.float32)
        splits[which] = Split(torch.from_numpy(xt).unsqueeze(1), torch.from_numpy(lut[y]))
    return TaskData(name, splits["train"], splits["val"], splits["test"], perm)


def make_tasks(names: Sequence[str], seed: int = 0, permute_labels: bool = True) -> List[TaskData]:
    base = load_digits_split(seed)
    return [make_task(n, base, seed, permute_labels) for n in names]


def task_names(n: int) -> List[str]:
    if not 1 <= n <= len(TASK_NAMES):
        raise ValueError(f"number of tasks must be between 1 and {len(TASK_NAMES)}, got {n}")
    return list(TASK_NAMES[:n])
