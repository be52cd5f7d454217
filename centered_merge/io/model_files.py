"""The files of a merged model directory besides its tensors: config.json, the tokenizer, generation_config.json
and the chat template, taken as mergekit 0.1.5 takes them (facts read from its merge.py and tokenizer/build.py):

- config.json comes from the donor: the base model, else the first model. Its dtype is set to the output dtype
  (`torch_dtype`, which every transformers version reads, and `dtype` where the file already uses that name).
- the tokenizer files and generation_config.json come from the tokenizer source: the donor by default
  (mergekit's `tokenizer_source: base`), or another model named by `tokenizer_source: PATH` /
  `tokenizer: {source: PATH}`. With a tokenizer source (`base` or a path), each input's embedding rows are
  re-indexed into its vocabulary as they are read (io/vocabulary.py) and config.json's `vocab_size` becomes the
  tokenizer's length, as mergekit does. Files are copied byte for byte (mergekit re-saves the tokenizer with
  transformers when a chat template or a tokenizer source is given; the vocabulary is the same).
- a chat template (`chat_template:`): one of the names mergekit knows (alpaca, chatml, exaone, llama3, mistral;
  our own templates for those formats, centered_merge/io/chat_templates.py), `auto` (the template most input
  models carry, as mergekit picks it), or a literal Jinja string. It is written to chat_template.jinja, which
  transformers reads first, and into tokenizer_config.json's `chat_template`, which older versions read.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import MergeConfigError
from .vocabulary import has_tokenizer, model_dir, output_vocabulary

CONFIG_FILE = "config.json"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# copied from the tokenizer source when present (mergekit's list, plus the vocabulary files of other tokenizers)
TOKENIZER_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json",
    "merges.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json",
)
COPY_FILES = (CONFIG_FILE,) + TOKENIZER_FILES  # every name copied (plus tokenizer* files)
CONFIG_COPY = "mergekit_config.yml"  # the merge's YAML config as given, where mergekit writes it


@dataclass(frozen=True)
class ModelFiles:
    """What goes into the output besides the tensors. config_dir: the donor (base, else first model);
    tokenizer_dir: the tokenizer source (None = the donor); chat_template: literal Jinja text to write in, or None;
    config_yaml: the merge's YAML config as given (written to mergekit_config.yml and quoted in the card);
    vocab_size: the output vocabulary's length, set in config.json (None: left as the donor has it);
    references: the models as the config names them, base first (the card's base_model list is drawn from them)."""
    config_dir: Optional[Path] = None
    tokenizer_dir: Optional[Path] = None
    chat_template: Optional[str] = None
    config_yaml: Optional[str] = None
    references: Tuple[str, ...] = ()
    vocab_size: Optional[int] = None  # config.json's vocab_size when a tokenizer source re-indexes the embeddings

    def with_config_dir(self, config_dir) -> "ModelFiles":
        return replace(self, config_dir=Path(config_dir) if config_dir is not None else None)

    def extra_files(self) -> Dict[str, str]:
        return {CONFIG_COPY: self.config_yaml} if self.config_yaml is not None else {}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _write_config(src: Path, dst: Path, out_dtype: Optional[torch.dtype], vocab_size: Optional[int] = None) -> None:
    if out_dtype is None and vocab_size is None:
        shutil.copyfile(src, dst)
        return
    try:
        cfg = json.loads(src.read_text())
    except (ValueError, UnicodeDecodeError):
        cfg = None
    if not isinstance(cfg, dict):
        shutil.copyfile(src, dst)
        return
    if out_dtype is not None:
        cfg["torch_dtype"] = _dtype_name(out_dtype)
        if "dtype" in cfg:
            cfg["dtype"] = _dtype_name(out_dtype)
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    dst.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_tokenizer_config(src: Path, dst: Path, template: str) -> None:
    try:
        cfg = json.loads(src.read_text())
    except (ValueError, UnicodeDecodeError):
        raise MergeConfigError(f"{src}: not valid JSON; cannot set its chat_template") from None
    if not isinstance(cfg, dict):
        raise MergeConfigError(f"{src}: not a JSON object; cannot set its chat_template")
    cfg["chat_template"] = template
    dst.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def copy_model_files(src: Union[ModelFiles, Path, str], dst: Path,
                     out_dtype: Optional[torch.dtype] = None) -> List[str]:
    """Write config, tokenizer, generation and chat-template files into `dst`; the names written. `src` is a
    ModelFiles, or a directory that is the donor and tokenizer source at once."""
    files = src if isinstance(src, ModelFiles) else ModelFiles(Path(src))
    dst = Path(dst)
    written = []
    if files.config_dir is not None and (files.config_dir / CONFIG_FILE).is_file():
        _write_config(files.config_dir / CONFIG_FILE, dst / CONFIG_FILE, out_dtype, files.vocab_size)
        written.append(CONFIG_FILE)
    tok = files.tokenizer_dir if files.tokenizer_dir is not None else files.config_dir
    if tok is not None:
        names = list(TOKENIZER_FILES) + sorted(p.name for p in tok.glob("tokenizer*") if p.name not in TOKENIZER_FILES)
        for name in names:
            p = tok / name
            if not p.is_file() or (files.chat_template is not None and name in (TEMPLATE_FILE, TOKENIZER_CONFIG)):
                continue
            shutil.copyfile(p, dst / name)
            written.append(name)
    if files.chat_template is not None:
        (dst / TEMPLATE_FILE).write_text(files.chat_template)
        written.append(TEMPLATE_FILE)
        if tok is not None and (tok / TOKENIZER_CONFIG).is_file():  # no tokenizer there: the .jinja file only
            _write_tokenizer_config(tok / TOKENIZER_CONFIG, dst / TOKENIZER_CONFIG, files.chat_template)
            written.append(TOKENIZER_CONFIG)
    return written


def _model_template(d: Optional[Path]) -> Optional[str]:
    """The chat template a model directory carries (chat_template.jinja first, as transformers reads it)."""
    if d is None:
        return None
    if (d / TEMPLATE_FILE).is_file():
        return (d / TEMPLATE_FILE).read_text()
    p = d / TOKENIZER_CONFIG
    if p.is_file():
        try:
            t = json.loads(p.read_text()).get("chat_template")
        except (ValueError, AttributeError, UnicodeDecodeError):
            return None
        if isinstance(t, list):  # several named templates: the default one
            t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
        return t if isinstance(t, str) and t.strip() else None
    return None


def resolve_chat_template(value: Optional[str], models: Sequence) -> Optional[str]:
    """The Jinja text for a config's `chat_template` (None: leave the copied files as they are).
    A known name -> its template; `auto` -> the template most inputs carry (first seen wins a tie; none -> None);
    otherwise a literal template, which must look like one (mergekit's test: 20 characters or more, with a `{`)."""
    from . import chat_templates

    if value is None:
        return None
    if value == "auto":
        found = [t.strip() for t in (_model_template(model_dir(m)) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in chat_templates.TEMPLATES:
        return chat_templates.TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise MergeConfigError(f"chat_template {value!r} is neither a known template name "
                               f"({', '.join(sorted(chat_templates.TEMPLATES))}, auto) nor a Jinja template")
    return value


def model_files_for(models: Sequence, base, tokenizer_source: Optional[str], chat_template: Optional[str],
                    config_yaml: Optional[str] = None, references: Sequence[str] = ()) -> ModelFiles:
    """Check a config's tokenizer_source and chat_template against the inputs and say where the side files come
    from; raises MergeConfigError before anything is read. models/base: paths or TensorSources."""
    donor = base if base is not None else models[0]
    tok_dir = None
    if tokenizer_source not in (None, "base"):
        tok_dir = model_dir(tokenizer_source)
        if tok_dir is None or not tok_dir.is_dir():
            raise MergeConfigError(f"tokenizer_source {tokenizer_source}: not a model directory")
    vocab_size = None
    if tok_dir is not None or (tokenizer_source == "base" and has_tokenizer(model_dir(donor))):
        # the inputs are re-indexed into it (config.py, io/vocabulary.py)
        vocab_size = len(output_vocabulary(tok_dir or model_dir(donor), base=tok_dir is None))
    everyone = ([base] if base is not None else []) + list(models)
    template = resolve_chat_template(chat_template, everyone)
    tc = (tok_dir or model_dir(donor) or Path("/nonexistent")) / TOKENIZER_CONFIG
    if template is not None and tc.is_file():  # refused now rather than after the tensors are written
        try:
            ok = isinstance(json.loads(tc.read_text()), dict)
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise MergeConfigError(f"{tc}: not a JSON object; cannot set its chat_template")
    return ModelFiles(None, tok_dir, template, config_yaml, tuple(references), vocab_size)
