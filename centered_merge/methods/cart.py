"""CART — centered task vectors with low rank (Choi et al., "Revisiting Weight Averaging for Model Merging").

For each tensor W with inputs W_1..W_T:
    M   = mean_t W_t                                   (the weight average: the moved origin)
    C_t = W_t - M                                       (centered task vectors; sum_t C_t = 0)
    out = M + lam * sum_t SVD_k(C_t)                    (for matrices chosen by the selector)
    out = M                                             (every other tensor)
No base model is needed. All math runs in float32. Memory per low-rank tensor, whatever T is: M and one
reusable centering buffer (two float32 copies), a bf16 or int8 copy for the range finder, the (m + n)(k + p)
factors of one task, and LowRankSum's buffers of the T tasks' rank-k terms (at most 1.5 float32 copies, or one copy
plus one task's factors when those alone exceed half a matrix).

At full rank the low-rank sum is sum_t C_t = 0, so the method returns M without computing SVDs; this is the
formula's exact value, not an approximation.
"""
from __future__ import annotations

import threading
from collections import Counter

import torch

from .. import ops
from ..errors import MergeConfigError
from ..linalg import (
    INT8_BLOCK,
    SKETCH_DTYPES,
    energy_svd,
    exact_svd,
    power_iterations,
    randomized_lowrank_factors,
    resolve_rank,
    resolve_sketch_dtype,
    sketch,
    sketch_in,
    sketch_width,
)
from ..seeding import generator, in_content_order
from ..threads import compute_threads, run_tasks, task_workers
from ..validation import count_nonfinite
from ..selection import PRESETS, make_selector, matrix_shape
from .base import MergeMethod, numel_of
from .params import Param, lam_param, seed_param
from .registry import register

SVD_MODES = ("randomized", "exact")


@register
class Cart(MergeMethod):
    name = "cart"
    needs_base = False
    # Every input enters the mean (an IEEE sum with weight 1/T), so a NaN/Inf input leaves NaN/Inf in the mean and
    # hence in the output; _merge_lowrank then returns the mean without taking SVDs of it. The engine skips its
    # up-front scan and names the input only when the output's count is not 0 (engine/core.py).
    counts_nonfinite_inputs = True
    summary = "CART: mean + lam * sum_t SVD_k(W_t - mean) on the selected matrices, the mean elsewhere"
    # Defaults: the authors' released ViT-B/32 8-task setting (prior 2.0, rank 0.12); randomized SVD with
    # max(10, k/4) oversamples, 2-4 power iterations by k/min(m, n) and a float32 projection of the exact matrix
    # (one pass, or two where the range finder's rounding floor or a flat spectrum asks for it), whose rank-k error
    # stays <= max(1.01 x optimal, optimal + 2e-4 ||C||) on every spectrum tested (tests/test_linalg.py).
    parameters = (
        Param("rank", "rank", 0.12, "float in (0, 1] = ratio of min(m, n), int = absolute k", lo=0, lo_open=True),
        lam_param(2.0, "scale of the summed low-rank centered task vectors (the authors' prior)",
                  aliases=("prior",)),
        Param("energy", "float", None, "pick each task's k by this fraction of sigma^2 instead of rank",
              lo=0.0, hi=1.0, lo_open=True),
        Param("indices", "indices", None, "keep these 0-based singular triplets (list, or \"0-7,16\") instead of "
              "the top k; exact SVD"),
        Param("svd", "choice", "randomized", "SVD flavour", choices=SVD_MODES),
        Param("oversample", "int", None, "extra sketch columns of the randomized SVD (default max(10, k/4))",
              lo=0),
        Param("power_iters", "int", None, "power iterations of the randomized SVD (default 2, 3 or 4 by "
              "k/min(m, n))", lo=0),
        Param("sketch_dtype", "choice", "auto", "dtype of the randomized SVD's sketch GEMMs",
              choices=tuple(SKETCH_DTYPES)),
        seed_param("seed of the randomized SVD's test matrices (per tensor name)"),
        Param("select", "choice", "default", "which tensors get the low-rank step", choices=PRESETS),
        Param("include", "patterns", None, "regexes of tensors to treat low rank as well (beat select)"),
        Param("exclude", "patterns", None, "regexes of tensors never treated low rank (beat include)"),
    )

    def validate(self):
        # single values were checked by their declarations; here what involves the method's own rules
        p = self.params
        if p["energy"] is None:
            resolve_rank(p["rank"], 1 << 20, 1 << 20)  # raises on a float ratio above 1
        self.kept_indices = None if p["indices"] is None else parse_indices(p["indices"])
        if self.kept_indices is not None and p["energy"] is not None:
            raise MergeConfigError("cart: give energy or indices, not both")
        self.selector = make_selector(p["select"], p["include"], p["exclude"])

    def describe(self) -> dict:
        d = super().describe()
        if self.kept_indices is not None:  # these do not apply: indices picks the triplets, with the exact SVD
            for key in ("rank", "svd", "oversample", "power_iters", "sketch_dtype"):
                d.pop(key, None)
            d["indices"] = list(self.kept_indices)
        return d

    # -- planning -----------------------------------------------------------------------------------------
    def is_lowrank(self, name: str, shape) -> bool:
        return self.selector(name, shape)

    def rank_for(self, shape) -> int | None:
        """k for a selected tensor (None in energy mode, where k is found per task; in indices mode, how many of
        the listed indices the matrix has)."""
        if self.energy is not None:
            return None
        if self.kept_indices is not None:
            return len(self._indices_in(shape))
        return resolve_rank(self.rank, *matrix_shape(shape))

    def _indices_in(self, shape):
        """The listed singular indices that exist in a matrix of this shape (those >= min(m, n) are dropped)."""
        full = min(matrix_shape(shape))
        return [i for i in self.kept_indices if i < full]

    def plan_tensor(self, name, shape, dtype, num_models):
        n = numel_of(shape)
        T = num_models
        if T < 2 or not self.is_lowrank(name, shape):
            return {"lowrank": False, "k": None, "flops": n * T, "workspace_bytes": 4 * n}
        m, c = matrix_shape(shape)
        k = self.rank_for(shape)
        if k is not None and (k >= min(m, c) or k == 0):
            return {"lowrank": False, "k": k, "flops": n * T, "workspace_bytes": 4 * n}
        small, big = min(m, c), max(m, c)
        if not self._randomized(k, m, c):
            svd_flops = 4 * big * small * small + 8 * small ** 3  # Golub-Kahan bidiagonalisation, roughly
            factors = (m + c + 1) * small
        else:
            w = sketch_width(k, self.oversample)
            q = power_iterations(k, m, c, self.power_iters)
            # 2q + 2 GEMM passes over the matrix (2q + 1 finding the range, 1 projecting it in float32), q + 1 QRs
            # of (small x w), the float64 w x w Gram of the row basis (big x w), and the two factor products. Where
            # linalg._refined_projection's one-pass check declines (directions near the rounding floor, no gap
            # after k), a second float32 pass and a small x w Gram follow, which this estimate leaves out.
            svd_flops = (2 * q + 2) * 2 * m * c * w + (q + 1) * 4 * small * w * w + 2 * big * w * w
            svd_flops += 2 * (m + c) * w * k
            factors = (m + c) * w
        gemm = 2 * m * c * (k if k is not None else small)
        flops = T * (n + svd_flops + gemm) + 2 * n
        # the mean and the centered buffer (float32), a bf16 (or smaller int8) copy for the sketch GEMMs, one task's
        # SVD factors, and the buffers that gather the rank-k terms (energy mode: an accumulator, as its k varies per task)
        terms = LowRankSum.workspace_bytes(m, c, T, k) if k is not None else 4 * (n + T * (m + c))
        # a centered buffer, its bf16 copy (or an int8 copy and a float32 rounding block of at most
        # min(n, INT8_BLOCK) entries) and one task's factors
        per_task = 6 * n + 4 * min(n, INT8_BLOCK) + 8 * factors
        # as _merge_lowrank on a CPU: the randomized tasks in waves of as many as the factor buffers hold (one at a
        # time where they hold one), the exact / energy / indices tasks in waves of one per worker
        wave = LowRankSum.layout(m, c, T, k)[0] // k if self._randomized(k, m, c) else T
        workers = min(task_workers(T), wave)
        return {"lowrank": True, "k": k, "flops": int(flops), "workspace_bytes": 4 * n + workers * per_task + terms}

    # -- merging ------------------------------------------------------------------------------------------
    def merge_tensor(self, name, inputs, base=None):
        shape = tuple(inputs[0].shape)
        T = len(inputs)
        if T < 2 or not self.is_lowrank(name, shape):
            return ops.mean_fp32(inputs)
        # Model order never matters: the tasks are taken in an order fixed by their content, so the mean and every
        # sum below add the same numbers in the same order whatever order the caller gave (bit-identical). A
        # float32 mean in the caller's order would round differently per order, ~6e-8 of |W|, i.e. ~1e-4 of
        # each centered matrix where fine-tunes differ by ~1e-3 of the weights.
        # Inputs that are not a list (the engine's LazyDeviceInputs: each read is a fresh device copy) stay lazy: the
        # content keys are computed one input at a time and each input is read again when it is used.
        with compute_threads():
            return self._merge_lowrank(name, in_content_order(inputs), shape)

    def _merge_lowrank(self, name, inputs, shape):
        T = len(inputs)
        mean = ops.mean_fp32(inputs)
        if count_nonfinite(mean):
            return mean  # an input holds NaN/Inf (or the sum overflowed): no SVD of it; the engine reports which
        m, c = matrix_shape(shape)
        k = self.rank_for(shape)
        if k is not None and k >= min(m, c):
            return mean  # full rank: sum_t C_t = 0 exactly
        if k == 0:
            return mean  # indices mode, and none of the listed indices exists in this matrix
        mean2 = mean.reshape(m, c)
        terms = LowRankSum(mean2, float(self.lam), T, k or 1)  # energy mode: k varies per task
        omega, sketch_dt = None, None
        if self._randomized(k, m, c):
            # One sketch per tensor, shared by the T tasks: the merge then does not depend on model order.
            omega = sketch((m, c), sketch_width(k, self.oversample), generator(int(self.seed), name), mean.device)
            sketch_dt = resolve_sketch_dtype(self.sketch_dtype, k, m, c, mean.device)
            omega = sketch_in(omega, sketch_dt)  # converted once for the T tasks
            q = power_iterations(k, m, c, self.power_iters)
        in_memory = isinstance(inputs, list)  # else lazy: never more than one input read at a time
        if omega is not None and batches_tasks(mean.device) and in_memory and terms.whole_batch(T, k):
            # On a GPU, one batched GEMM / QR / eigh per step for the T tasks instead of T launches of each;
            # costs T float32 copies of the matrix in device memory. (Not used on CPUs: there a batched bf16 GEMM
            # of 8 x 768x3072 @ 3072x115 ran at half the speed of 8 single ones, 181 vs 376 GFLOP/s.)
            stacked = torch.stack([ops.center_into(x.reshape(m, c), mean2, torch.empty_like(mean2)) for x in inputs])
            randomized_lowrank_factors(stacked, omega, k, q, sketch_dt, out=terms.block_slots(T, k))
            del stacked
            return terms.finish().reshape(shape)
        if omega is None:
            # Exact, energy and indices modes: the tasks in waves of one per worker, so that at most that many tasks'
            # factors wait, added in task order, so the sum does not depend on which worker ran which task. On a
            # CPU with the inputs in memory, one single-threaded worker per core (threads.run_tasks); otherwise
            # waves of one, in this thread, with lazy inputs read one at a time. Measured on the 4 x 0.5 B set of
            # bench/peer with energy=0.9 (2026-12-02): see docs/measurements.md, CART speed.
            workers = task_workers(T) if mean.device.type == "cpu" and in_memory else 1
            bufs = [torch.empty_like(mean2) for _ in range(min(workers, T))]  # one per place in a wave, reused
            for lo in range(0, T, workers):
                found = [None] * min(workers, T - lo)

                def one_task(i, lo=lo, found=found):
                    ops.center_into(inputs[lo + i].reshape(m, c), mean2, bufs[i])
                    found[i] = self._truncated(bufs[i], k, name)

                run_tasks(one_task, len(found))
                for u, s, vh in found:
                    terms.add(u.mT, s[:, None] * vh)
            return terms.finish().reshape(shape)
        # The randomized tasks, each centered into a buffer of its worker's and written into its own rows of the
        # factor buffers, in waves of as many tasks as those buffers hold (all T when they fit at once; otherwise
        # they are flushed between waves, where one slots(k) call per task would flush them). On a CPU with the
        # inputs in memory, a wave's tasks run in parallel, one single-threaded worker per core
        # (threads.run_tasks), so the result does not depend on which worker ran which task; otherwise waves of
        # one, in this thread on all its threads, with lazy inputs read one at a time. Waves rather than one task
        # at a time on all threads also where the T terms do not fit at once (768x768, T = 8): its small ops ran
        # at a fraction of one thread's speed on two (cm.cart on that matrix: 86-95 -> 66-67 ms, interleaved,
        # 2 threads, 2026-12-02).
        wave = terms.capacity(k) if mean.device.type == "cpu" and in_memory else 1
        local = threading.local()
        for lo in range(0, T, wave):
            count = min(wave, T - lo)
            lt_all, r_all = terms.block_slots(count, k)

            def one_task(i, lo=lo, lt_all=lt_all, r_all=r_all):
                buf = getattr(local, "centered", None)
                if buf is None:
                    buf = local.centered = torch.empty_like(mean2)
                    local.workspace = {}
                ops.center_into(inputs[lo + i].reshape(m, c), mean2, buf)
                randomized_lowrank_factors(buf, omega, k, q, sketch_dt, out=(lt_all[i], r_all[i]),
                                           workspace=local.workspace)

            run_tasks(one_task, count)
        # Every task has been centered, so the mean may now receive lam * sum_t of the rank-k terms in place.
        return terms.finish().reshape(shape)

    def _randomized(self, k, m, c) -> bool:
        """Whether this matrix's truncated SVDs use the randomized range finder (else the exact SVD)."""
        return (self.svd == "randomized" and self.energy is None and self.kept_indices is None
                and sketch_width(k, self.oversample) < min(m, c))

    def _truncated(self, centered, k, name):
        if self.kept_indices is not None:
            # Individual triplets, not a leading subspace: the exact SVD, as in the authors' code. A randomized
            # sketch approximates the top-k subspace as a whole, not each singular vector near its edge.
            idx = self._indices_in(centered.shape)
            u, s, vh = exact_svd(centered, idx[-1] + 1)
            return u[:, idx], s[idx], vh[idx]
        if self.energy is not None:
            return energy_svd(
                centered, float(self.energy), self.svd, self.oversample, self.power_iters,
                generator=generator(int(self.seed), name, "energy"), sketch_dtype=self.sketch_dtype,
            )
        return exact_svd(centered, k)


def batches_tasks(device: torch.device) -> bool:
    """Whether the T tasks' randomized SVDs of a matrix run as one batched call per step: on GPUs, not on CPUs
    (the measurement in CART._merge_lowrank). A function of its own so that the tests run the GPU's batched branch
    on a CPU too (tests/test_cart.py), where it must give the per-task merge."""
    return device.type == "cuda"


MAX_INDEX = 1 << 20  # no weight matrix has a million singular values; also bounds what a range may expand to


def parse_indices(spec) -> tuple:
    """Singular indices (0-based) for CART's indices mode, from an int, a sequence of ints or a string such as
    "0-7,16,20-23" (ranges inclusive). Returns them sorted; raises MergeConfigError on anything else."""
    where = f"cart: indices {spec!r}"
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, str):
        out = []
        for part in spec.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise MergeConfigError(f"{where}: expected integers and ranges like 0-7,16") from None
            if b < a:
                raise MergeConfigError(f"{where}: range {part!r} runs backwards")
            if b >= MAX_INDEX:
                raise MergeConfigError(f"{where}: indices must be below {MAX_INDEX}")
            out.extend(range(a, b + 1))
    elif isinstance(spec, (list, tuple)):
        out = list(spec)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in out):
            raise MergeConfigError(f"{where}: expected a list of ints")
    else:
        raise MergeConfigError(f"{where}: expected a list of ints or a string like 0-7,16")
    if not out:
        raise MergeConfigError(f"{where}: name at least one singular index")
    if min(out) < 0:
        raise MergeConfigError(f"{where}: indices count from 0; got {min(out)}")
    if max(out) >= MAX_INDEX:
        raise MergeConfigError(f"{where}: indices must be below {MAX_INDEX}")
    dup = sorted(i for i, n in Counter(out).items() if n > 1)
    if dup:
        raise MergeConfigError(f"{where}: {dup[:10]} listed more than once")
    return tuple(sorted(out))


class LowRankSum:
    """target + lam * sum_t lt_t^T r_t for rank-k terms arriving one task at a time, in as few GEMMs as memory
    allows.

    The factors of successive tasks are stacked into two row buffers, LT (rows x m) and R (rows x n), and added
    to the target with one GEMM once every task is in. That spares the float32 accumulator matrix, its zero
    fill and the final pass that adds it to the mean (~3% of a ViT-B/32 merge, bench/bench_cart_speed.py).
    The buffers may hold up to 1.5 matrices' worth of floats. When the T tasks' factors need more, the buffers
    shrink to half a matrix (or one task's factors, if those are larger) and are flushed into an accumulator
    whenever they fill up, because the target (the mean) must stay unchanged until every task has been
    centered on it. Either way the factors and the accumulator together take at most 1.5 float32 copies of the
    matrix, whatever T is (one copy plus one task's factors when k > mn / (2(m + n))).
    """

    BUDGET = 1.5  # float32 matrices' worth of memory for the factor buffers and the accumulator together

    @staticmethod
    def layout(m: int, n: int, num_terms: int, k: int):
        """(rows of the factor buffers, whether an accumulator is needed) for T = num_terms rank-k terms."""
        if (m + n) * num_terms * k <= LowRankSum.BUDGET * m * n:
            return num_terms * k, False
        return max(k, int((LowRankSum.BUDGET - 1.0) * m * n / (m + n)) // k * k), True

    @staticmethod
    def workspace_bytes(m: int, n: int, num_terms: int, k: int) -> int:
        rows, acc = LowRankSum.layout(m, n, num_terms, k)
        return 4 * (rows * (m + n) + (m * n if acc else 0))

    def __init__(self, target: torch.Tensor, lam: float, num_terms: int, k: int):
        m, n = target.shape
        self.target, self.lam = target, lam
        rows, _ = self.layout(m, n, num_terms, k)
        self.lt = torch.empty(rows, m, dtype=torch.float32, device=target.device)
        self.r = torch.empty(rows, n, dtype=torch.float32, device=target.device)
        self.used = 0
        self.acc = None

    def slots(self, k: int):
        """(lt, r) views of the next k rows, flushing first if they do not fit."""
        if self.used + k > self.lt.shape[0]:
            self._flush()
        lo, self.used = self.used, self.used + k
        return self.lt[lo : self.used], self.r[lo : self.used]

    def whole_batch(self, num_terms: int, k: int) -> bool:
        """Whether num_terms rank-k terms fit in the buffers at once (no accumulator needed)."""
        return self.used == 0 and self.acc is None and num_terms * k <= self.lt.shape[0]

    def capacity(self, k: int) -> int:
        """How many rank-k terms the factor buffers hold at once."""
        return self.lt.shape[0] // k

    def block_slots(self, count: int, k: int):
        """(lt, r) views (count, k, m) and (count, k, n) of the next count * k rows, flushing first if they do not
        fit (count <= capacity(k)): the same flush points as `count` calls of slots(k)."""
        if self.used + count * k > self.lt.shape[0]:
            self._flush()
        lo, self.used = self.used, self.used + count * k
        return self.lt[lo : self.used].view(count, k, -1), self.r[lo : self.used].view(count, k, -1)

    def add(self, lt: torch.Tensor, r: torch.Tensor) -> None:
        """Add one term given as factors (lt: k x m, r: k x n)."""
        if lt.shape[0] > self.lt.shape[0]:  # wider than the buffers (energy mode's k varies): straight in
            self._flush()
            self._accumulator().addmm_(lt.mT, r)
            return
        dst_lt, dst_r = self.slots(lt.shape[0])
        dst_lt.copy_(lt)
        dst_r.copy_(r)

    def _accumulator(self) -> torch.Tensor:
        if self.acc is None:
            self.acc = torch.zeros_like(self.target)
        return self.acc

    def _flush(self) -> None:
        if self.used:
            self._accumulator().addmm_(self.lt[: self.used].mT, self.r[: self.used])
        self.used = 0

    def finish(self) -> torch.Tensor:
        """The target with lam * (sum of the terms) added in place."""
        if self.acc is None:
            return self.target.addmm_(self.lt[: self.used].mT, self.r[: self.used], alpha=self.lam)
        self._flush()
        return self.target.add_(self.acc, alpha=self.lam)
