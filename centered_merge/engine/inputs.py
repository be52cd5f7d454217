"""The T models (+ base) of a merge, opened lazily, with key sets and per-tensor metadata checked up front."""
from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..errors import MergeConfigError, MergeInputError
from ..io import TensorInfo, TensorSource, open_model
from ..io.base import check_computable
from ..validation import FLOAT, PASSTHROUGH, check_group, check_key_sets

# files an HF directory may read weights from: each must be a regular file (a FIFO would block the open forever)
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.json")


def check_input_path(model) -> None:
    """Refuse, before anything opens it, an input path that is neither a regular file nor a directory (a FIFO, a
    device, a socket), and weight files of a directory that are not regular files."""
    if not isinstance(model, (str, Path)):
        return
    p = Path(model).expanduser()
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        return  # open_model says "not found"
    except OSError as e:
        raise MergeInputError(f"{model}: cannot read it ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        for pattern in _WEIGHT_GLOBS:
            for f in p.glob(pattern):
                check_input_path(f)
        return
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device file" if stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise MergeInputError(f"{model}: is {kind}; inputs must be regular files or model directories")


def source_files(src: TensorSource) -> Optional[List[Path]]:
    """The files a source reads its tensors from, or None for a source that is not backed by files."""
    names = sorted({src.file_of(k) for k in src.keys()})
    files = [Path(n) for n in names]
    if not files or not all(f.is_file() for f in files):
        return None
    return files


def file_fingerprint(path: Path) -> Dict:
    """Size, modification time and a digest of the header bytes (safetensors: the JSON header; else 1 MiB)."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = 1 << 20
        if path.suffix == ".safetensors" and len(head) == 8:
            n = min(int.from_bytes(head, "little"), 100 << 20)
        head += f.read(n)
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "header_sha256": hashlib.sha256(head).hexdigest()}


def is_mmapped(src: TensorSource) -> bool:
    """Whether a source's tensors live in the page cache (mmap) rather than in the process's own memory."""
    files = source_files(src)
    if files is None:
        return False
    return all(f.suffix == ".safetensors" or zipfile.is_zipfile(f) for f in files)


class Inputs:
    """The T models (+ base) opened lazily; `kind(key)` says from metadata alone how a tensor is merged."""

    def __init__(self, models, base, method, trust_pickle: bool = False, labels: Optional[List[str]] = None):
        if isinstance(models, (str, Path, dict)) or hasattr(models, "state_dict"):
            raise MergeConfigError("models must be a list of models (paths, state dicts or nn.Modules)")
        models = list(models)
        if not models:
            raise MergeConfigError("no models to merge (T = 0)")
        if method.needs_base and base is None:
            raise MergeConfigError(f"method {method.name!r} needs a base model (--base / base=...)")
        self.paths = [m if isinstance(m, (str, Path)) else m.path for m in models + [base]
                      if isinstance(m, (str, Path)) or getattr(m, "path", None) is not None]
        self.sources: List[TensorSource] = []
        self.base: Optional[TensorSource] = None
        try:
            for m in models + ([base] if base is not None else []):
                check_input_path(m)
            for i, m in enumerate(models):
                self.sources.append(open_model(m, trust_pickle=trust_pickle, index=i))
                if labels is not None:
                    self.sources[-1].label = labels[i]
            if base is not None:
                self.base = open_model(base, trust_pickle=trust_pickle, index=len(models))
                if labels is not None:
                    self.base.label = "base"
                elif not isinstance(base, (str, Path)):
                    self.base.label = "base model (in memory)"
            self.use_base = method.needs_base
            check_key_sets([s.keys() for s in self.group], [s.label for s in self.group])
        except BaseException:
            self.close()
            raise
        self.keys = self.sources[0].keys()

    @property
    def group(self) -> List[TensorSource]:
        """The sources every tensor is read from: the T models, then the base when the method uses it."""
        return self.sources + ([self.base] if self.use_base else [])

    def labels(self, key) -> List[str]:
        return [s.file_of(key) for s in self.group]

    def kind(self, key) -> str:
        """Shape and float-ness from metadata alone (no data read): FLOAT, PASSTHROUGH or raise."""
        infos = [s.info(key) for s in self.group]
        check_computable(key, [i.dtype for i in infos], self.labels(key))
        floats = [i.dtype.is_floating_point for i in infos]
        if all(floats) and len({i.shape for i in infos}) == 1:
            return FLOAT
        if not any(floats) and len({i.shape for i in infos}) == 1:
            return PASSTHROUGH  # values are compared when read
        metas = [torch.empty(i.shape, dtype=i.dtype, device="meta") for i in infos]
        check_group(key, metas, self.labels(key))  # raises with the core's wording
        raise MergeInputError(f"tensor {key!r} cannot be merged")  # unreachable in practice

    def out_info(self, key: str, kind: str, out_dtype: Optional[torch.dtype]) -> TensorInfo:
        info = self.sources[0].info(key)
        if kind == FLOAT and out_dtype is not None:
            return TensorInfo(info.shape, out_dtype)
        return info

    def fingerprint(self) -> Optional[List[Dict]]:
        """Every input file's size, mtime and header digest (models, then base); None if any is in memory."""
        out = []
        for s in self.sources + ([self.base] if self.base is not None else []):
            files = source_files(s)
            if files is None:
                return None
            out += [file_fingerprint(f) for f in files]
        return out

    def reference_config_dir(self) -> Optional[Path]:
        """Where config.json and tokenizer files are copied from: the base, else the first model that has them."""
        if self.base is not None and self.base.config_dir is not None:
            return self.base.config_dir
        return next((s.config_dir for s in self.sources if s.config_dir is not None), None)

    def close(self):
        for s in self.sources + ([self.base] if self.base is not None else []):
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass
