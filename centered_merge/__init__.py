"""centered_merge: merge fine-tuned checkpoints with CART and the usual baselines, fast and in bounded memory."""
from . import threads  # noqa: F401  (first: chooses the OpenMP wait policy before torch is loaded)
from . import methods
from .api import cart, merge
from .errors import MergeConfigError, MergeError, MergeInputError, MergeOutputError
from .engine import merge_checkpoints

__version__ = "0.1.0"

from .build import build_info

__all__ = ["merge", "cart", "merge_checkpoints", "methods", "build_info", "MergeError", "MergeConfigError",
           "MergeInputError", "MergeOutputError"]
