"""Element-wise passes of a merge. Each public function here is derived from one row of the ops table
(centered_merge/ops/table.py), which decides per call whether the native kernel or the torch twin runs.

    mean_fp32(inputs, weights=None, out=None)                   -> float32 tensor
    center_into(w, mean, out)                                   -> out
    finalize(x, dtype, add=None)                                -> (tensor of dtype, non-finite count)
    ties_merge(inputs, base, density, lam, weights=None, normalize=True) -> float32 tensor
    ties_merge_to(inputs, base, density, lam, weights=None, normalize=True, out_dtype=float32, out=None)
                                                                -> (tensor of out_dtype, non-finite count of
                                                                    it + of the task vectors x_t - base)
    dare(tau, p, seed)                                          -> float32 tensor
    linear_merge(inputs, weights, out_dtype=None, scale=1.0, divisor=1.0, out=None)
                                                                -> (tensor of out_dtype, non-finite count)
    task_arithmetic_merge(inputs, base, weights, lam, out_dtype=None, out=None)
                                                                -> (tensor of out_dtype, non-finite count)
    (out=: a caller's tensor of the result's shape and dtype to write into, e.g. a reused buffer)
"""
from .reference import kept_count, magnitude_threshold  # noqa: F401  (scalar helpers, no native twin needed)
from .table import DISPATCH, OPS, choose  # noqa: F401

mean_fp32 = DISPATCH["mean_fp32"]
center_into = DISPATCH["center_into"]
finalize = DISPATCH["finalize"]
ties_merge = DISPATCH["ties_merge"]
ties_merge_to = DISPATCH["ties_merge_to"]
dare = DISPATCH["dare"]
linear_merge = DISPATCH["linear_merge"]
task_arithmetic_merge = DISPATCH["task_arithmetic_merge"]

assert set(DISPATCH) == {"mean_fp32", "center_into", "finalize", "ties_merge", "ties_merge_to", "dare", "linear_merge",
                         "task_arithmetic_merge"}, "a row of ops/table.py has no public name here"
