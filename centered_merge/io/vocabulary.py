"""Embedding rows re-indexed into the output tokenizer's vocabulary (mergekit's `tokenizer_source: base | PATH`).

Facts from mergekit 0.1.5 (tokenizer/build.py, tokenizer/embed.py, plan.py, merge.py):
- with a tokenizer source, every input's vocabulary-indexed tensors (for Llama: embed_tokens and lm_head, rows
  = tokens) are re-indexed into the output vocabulary before the method sees them, and config.json's
  `vocab_size` becomes the output tokenizer's length (so rows an input pads its embedding with are dropped);
- the output vocabulary is the source model's tokenizer (token -> id, added tokens included); `base` means the
  base model's (else the first model's), with the tokens at ids >= its config's vocab_size left out;
- an input without tokenizer files is taken to have the base's vocabulary;
- row `id` of input i is input i's row of the same token. Where some input lacks the token, it gets a default
  row, the same for every input that lacks it: the row of the only input that has the token; zero when none
  has it; the base's row when the base has it; otherwise the mean of the rows of the inputs that have it.
  Inputs that have the token keep their own row. The inputs here are those mergekit gathers for the tensor:
  the models and the base.

Here the re-indexing happens where a tensor is read: `VocabularyAligned` wraps each input's TensorSource, and its
`get` gathers the rows of one vocabulary-indexed tensor (plus the default rows, read from the other inputs'
views of that tensor) into one new tensor; every other tensor passes through untouched. Memory: one re-indexed
tensor per input at a time, the same bound as the merge itself.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import MergeConfigError
from .base import TensorInfo, TensorSource

# the tensors whose axis 0 is the vocabulary (mergekit's architectures mark them with vocabulary_axis: 0)
VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings|tok_embeddings)"
                          r"\.weight$")


def model_dir(model) -> Optional[Path]:
    """The directory holding a model's config/tokenizer files (a path or a TensorSource), else None."""
    d = getattr(model, "config_dir", None)
    if d is not None:
        return Path(d)
    if isinstance(model, (str, Path)):
        p = Path(model)
        return p if p.is_dir() else p.parent
    return None


def read_vocabulary(d: Optional[Path]) -> Optional[Dict[str, int]]:
    """A model directory's token -> id map (added tokens included, as transformers' get_vocab()), from
    tokenizer.json, else vocab.json (+ added_tokens.json), else vocab.txt (one token a line); None when it has
    none of them."""
    if d is None:
        return None
    tj = d / "tokenizer.json"
    if tj.is_file():
        try:
            data = json.loads(tj.read_text())
        except (ValueError, UnicodeDecodeError):
            raise MergeConfigError(f"{tj}: not valid JSON") from None
        model = data.get("model") if isinstance(data, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
            vocab = {str(e[0] if isinstance(e, list) else e): i for i, e in enumerate(vocab)}
        if not isinstance(vocab, dict):
            raise MergeConfigError(f"{tj}: no model.vocab in it")
        out = {str(k): int(v) for k, v in vocab.items()}
        for t in data.get("added_tokens") or []:
            if isinstance(t, dict) and "content" in t and "id" in t:
                out[str(t["content"])] = int(t["id"])
        return out
    vj = d / "vocab.json"
    if vj.is_file():
        try:
            out = {str(k): int(v) for k, v in json.loads(vj.read_text()).items()}
            at = d / "added_tokens.json"
            if at.is_file():
                out.update({str(k): int(v) for k, v in json.loads(at.read_text()).items()})
        except (ValueError, AttributeError, TypeError, UnicodeDecodeError):
            raise MergeConfigError(f"{vj}: not a JSON token -> id map") from None
        return out
    vt = d / "vocab.txt"
    if vt.is_file():
        return {tok: i for i, tok in enumerate(vt.read_text().splitlines())}
    return None


def has_tokenizer(d: Optional[Path]) -> bool:
    """Whether a model directory has tokenizer files of any kind (sentencepiece models included)."""
    return d is not None and any((d / n).is_file() for n in (
        "tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"))


def _config_vocab_size(d: Optional[Path]) -> Optional[int]:
    try:
        v = json.loads((d / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def output_vocabulary(source: Path, base: bool) -> Dict[str, int]:
    """The output tokenizer's token -> id map; `base`: the base's, without ids >= its config's vocab_size."""
    vocab = read_vocabulary(source)
    if vocab is None and has_tokenizer(source):
        raise MergeConfigError(f"tokenizer_source {source}: no tokenizer.json, vocab.json or vocab.txt there "
                               "(a sentencepiece-only tokenizer cannot be read without its library)")
    if vocab is None:
        raise MergeConfigError(f"tokenizer_source {source}: no tokenizer files there (tokenizer.json, vocab.json "
                               "or vocab.txt)")
    if base:
        n = _config_vocab_size(source)
        if n is not None and any(i >= n for i in vocab.values()):
            raise MergeConfigError(f"tokenizer_source base: {source}'s tokenizer has tokens at ids >= its "
                                   f"vocab_size {n}; mergekit re-saves a tokenizer without them, which is not "
                                   "done here (name a tokenizer whose ids fit)")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise MergeConfigError(f"tokenizer_source {source}: its token ids are not 0..{len(ids) - 1} without gaps "
                               "or repeats")
    return vocab


class Alignment:
    """The row maps of the inputs of one merge: `perm[i][new_id]` = input i's row of that token, or -1."""

    def __init__(self, out_vocab: Dict[str, int], vocabs: Sequence[Dict[str, int]], base_index: Optional[int]):
        self.size = len(out_vocab)
        self.base_index = base_index
        tokens = sorted(out_vocab, key=out_vocab.get)
        self.perm = [torch.tensor([v.get(t, -1) for t in tokens], dtype=torch.long) for v in vocabs]
        self.sources: List[TensorSource] = []  # the inner sources, set by wrap()
        self._cache = None  # (key, present, missing ids, default rows) of the last tensor re-indexed

    def is_identity(self) -> bool:
        ar = torch.arange(self.size)
        return all(torch.equal(p, ar) for p in self.perm)

    def wrap(self, sources: Sequence[TensorSource]) -> List["VocabularyAligned"]:
        self.sources = list(sources)
        return [VocabularyAligned(s, self, i) for i, s in enumerate(sources)]

    def is_vocabulary_tensor(self, key: str, info: TensorInfo) -> bool:
        return bool(VOCAB_TENSOR.search(key)) and len(info.shape) >= 1 and info.dtype.is_floating_point

    def _present(self, key: str) -> torch.Tensor:
        """[inputs, new ids]: whether input i has a row for the token (its id is below its row count)."""
        rows = []
        for p, s in zip(self.perm, self.sources):
            n = s.info(key).shape[0]
            rows.append((p >= 0) & (p < n))
        return torch.stack(rows)

    def _defaults(self, key: str):
        """(present, ids, rows) for tensor `key`: which input has which token, the output ids some input lacks,
        and their default rows (float32). A token's default row is the same for every input that lacks it, so it
        is computed once per tensor, not once per input; the last tensor's is kept for the other inputs' reads."""
        cached = self._cache
        if cached is not None and cached[0] == key:
            return cached[1:]
        present = self._present(key)
        missing = (~present.all(0)).nonzero().flatten()
        pm = present[:, missing]  # [inputs, ids some input lacks]
        count = pm.sum(0)
        use_base = torch.zeros_like(count, dtype=torch.bool)
        if self.base_index is not None:
            use_base = (count >= 2) & pm[self.base_index]
        donor = torch.where(use_base, torch.full_like(count, self.base_index or 0), pm.float().argmax(0))
        single = (count == 1) | use_base
        shape = tuple(self.sources[0].info(key).shape[1:])
        acc = torch.zeros((missing.numel(),) + shape, dtype=torch.float32)
        for j in range(len(self.sources)):
            take = (single & (donor == j)) | ((count >= 2) & ~use_base & pm[j])
            if not bool(take.any()):
                continue
            rows = self.sources[j].get(key).index_select(0, self.perm[j][missing[take]]).float()
            acc[take] += rows
        mean = (count >= 2) & ~use_base
        acc[mean] /= count[mean].unsqueeze(-1).float().reshape((-1,) + (1,) * (acc.dim() - 1))
        self._cache = (key, present, missing, acc)  # count 0: zero rows
        return present, missing, acc

    def aligned(self, key: str, i: int) -> torch.Tensor:
        """Input i's tensor `key` with its rows in the output vocabulary's order (a new tensor)."""
        src = self.sources[i].get(key)
        present, missing, defaults = self._defaults(key)
        mine = present[i]
        out = torch.zeros((self.size,) + tuple(src.shape[1:]), dtype=src.dtype)
        out[mine] = src.index_select(0, self.perm[i][mine])
        lacks = ~mine[missing]  # of the ids some input lacks, those input i lacks
        if bool(lacks.any()):
            out[missing[lacks]] = defaults[lacks].to(src.dtype)
        return out


class VocabularyAligned(TensorSource):
    """One input whose vocabulary-indexed tensors are read re-indexed into the output vocabulary."""

    def __init__(self, inner: TensorSource, alignment: Alignment, index: int):
        self.inner, self.alignment, self.index = inner, alignment, index
        self.path = None  # the input's path when it was given as one (the output must not overwrite it)
        self.label = inner.label
        self.config_dir = inner.config_dir

    def keys(self) -> List[str]:
        return self.inner.keys()

    def _reindexed(self, key: str, info: TensorInfo) -> bool:
        return self.alignment.is_vocabulary_tensor(key, info)

    def info(self, key: str) -> TensorInfo:
        info = self.inner.info(key)
        if not self._reindexed(key, info):
            return info
        return TensorInfo((self.alignment.size,) + tuple(info.shape[1:]), info.dtype)

    def get(self, key: str) -> torch.Tensor:
        info = self.inner.info(key)
        if not self._reindexed(key, info):
            return self.inner.get(key)
        return self.alignment.aligned(key, self.index)

    def read_into(self, key: str, out: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if not self._reindexed(key, self.inner.info(key)):
            return self.inner.read_into(key, out, offset)
        return TensorSource.read_into(self, key, out, offset)

    def check_unchanged(self) -> None:
        self.inner.check_unchanged()

    def prefetch(self, key: str) -> None:
        self.inner.prefetch(key)

    def release(self, key: str) -> None:
        self.inner.release(key)

    def file_of(self, key: str) -> str:
        return self.inner.file_of(key)

    def close(self) -> None:
        self.inner.close()


def _label(m) -> str:
    return str(getattr(m, "label", m))


def _vocabulary_of(dirs: Sequence[Optional[Path]], label: str) -> Optional[Dict[str, int]]:
    """The vocabulary an input's rows follow: that of the directories it is read from (several for a model
    stacked from slices, which must then agree); None when none of them has tokenizer files."""
    found = [(d, v) for d, v in ((d, read_vocabulary(d)) for d in dirs) if v is not None]
    for d, v in found[1:]:
        if v != found[0][1]:
            raise MergeConfigError(f"tokenizer_source: {label} is stacked from models with different vocabularies "
                                   f"({found[0][0]} and {d}); re-indexing such a model is not supported")
    return found[0][1] if found else None


def align_inputs(models: Sequence, base, tokenizer_source: str, open_model: Callable,
                 dirs_of: Callable = lambda m: [model_dir(m)]) -> Tuple[List, object]:
    """(models, base) with every input re-indexed into the tokenizer source's vocabulary (`base` or a model
    directory), as VocabularyAligned sources; the inputs as given when no row moves. models/base: paths or
    TensorSources; dirs_of(m): the directories whose vocabulary m's rows follow."""
    donor = base if base is not None else models[0]
    src_dir = model_dir(donor) if tokenizer_source == "base" else model_dir(tokenizer_source)
    if tokenizer_source == "base" and not has_tokenizer(src_dir):
        return list(models), base  # no tokenizer anywhere to follow: nothing to re-index (and nothing copied)
    if src_dir is None or not src_dir.is_dir():
        raise MergeConfigError(f"tokenizer_source {tokenizer_source}: not a model directory")
    out_vocab = output_vocabulary(src_dir, base=tokenizer_source == "base")
    everyone = list(models) + ([base] if base is not None else [])
    donor_vocab = _vocabulary_of(dirs_of(donor), _label(donor))
    vocabs = []
    for m in everyone:
        v = _vocabulary_of(dirs_of(m), _label(m))
        v = donor_vocab if v is None else v  # no tokenizer files: the base's vocabulary, as mergekit assumes
        if v is None:
            raise MergeConfigError(f"tokenizer_source {tokenizer_source}: {_label(m)} has no tokenizer.json, "
                                   "vocab.json or vocab.txt to re-index its embeddings by")
        vocabs.append(v)
    alignment = Alignment(out_vocab, vocabs, len(models) if base is not None else None)
    opened = [not isinstance(m, TensorSource) for m in everyone]
    sources: List[TensorSource] = []
    try:
        for m in everyone:
            sources.append(open_model(m))
        still = alignment.is_identity() and all(
            s.info(k).shape[0] == alignment.size for s in sources for k in s.keys()
            if alignment.is_vocabulary_tensor(k, s.info(k)))
    except BaseException:
        for s, o in zip(sources, opened):
            if o:
                s.close()
        raise
    if still:
        for s, o in zip(sources, opened):
            if o:
                s.close()
        return list(models), base
    wrapped = alignment.wrap(sources)
    for w, m in zip(wrapped, everyone):
        w.path = m if isinstance(m, (str, Path)) else None
    return wrapped[:len(models)], (wrapped[-1] if base is not None else None)
