"""Element-wise passes of a merge, dispatched to the native extension or to the torch twins.

Methods call these functions; centered_merge.backend decides per call which implementation runs.
"""
from ..backend import implementation as _impl
from .reference import kept_count, magnitude_threshold  # noqa: F401  (scalar helpers, no native twin needed)


def mean_fp32(inputs, weights=None, out=None):
    return _impl("mean_fp32", inputs[0])(inputs, weights, out)


def center_into(w, mean, out):
    return _impl("center_into", w)(w, mean, out)


def finalize(x, dtype, add=None):
    return _impl("finalize", x)(x, dtype, add)


def ties_merge(inputs, base, density, lam):
    return _impl("ties_merge", base)(inputs, base, density, lam)


def dare(tau, p, seed):
    return _impl("dare", tau)(tau, p, seed)
