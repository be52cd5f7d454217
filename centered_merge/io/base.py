"""What every reader gives the engine: names, shapes and dtypes up front, tensors one at a time on demand."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch


@dataclass(frozen=True)
class TensorInfo:
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def dtype_size(dtype: torch.dtype) -> int:
    if dtype == torch.bool:
        return 1
    return torch.empty((), dtype=dtype).element_size()


class TensorSource:
    """One model to merge, read lazily.

    `label` names the model in messages (a path, or "model #2 (state dict)"). `get` returns the tensor stored
    under a name, zero-copy where the format allows (a view of an mmap for safetensors); the caller must not
    write into it. `config_dir` is where config.json and tokenizer files live, or None.
    """

    label: str = "?"
    config_dir: Optional[Path] = None

    def keys(self) -> List[str]:
        raise NotImplementedError

    def info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def prefetch(self, key: str) -> None:
        """Hint that `key` will be read soon (start reading it into the page cache); may do nothing."""

    def close(self) -> None:
        pass

    def file_of(self, key: str) -> str:
        """The file holding `key`, for messages."""
        return self.label

    def total_bytes(self) -> int:
        return sum(self.info(k).nbytes for k in self.keys())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
