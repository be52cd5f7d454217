"""The lab: a small, honest replica of the CART paper's multi-task merging setting on scikit-learn's digits,
plus the analyses of both papers (CART's rank sweep and spectra; the Rethinking paper's three analyses).

    from centered_merge.lab import run_lab
    run_lab("lab_out", profile="demo")          # or: python -m centered_merge.lab --profile demo

Modules: data (splits, task transforms), models (MLP/CNN encoders, heads), train (pretrain / probe /
fine-tune / cache), merging (the door to centered_merge.merge), table (merge table with validation search),
cart_analysis (rank sweep, spectrum energy), rethinking (templates, merging vs ensembling, weight scaling),
run (end to end), cli (argument parsing).
"""
from .cli import main
from .run import PROFILES, run_lab

__all__ = ["main", "run_lab", "PROFILES"]
