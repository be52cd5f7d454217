"""The per-tensor core, the one copy shared by the in-memory API and the on-disk engine.

For each tensor name: the group check (shapes, float-ness; equal values for tensors copied through) and the
non-finite check of the inputs (`check_inputs`, run by the reader), then the method's merge_tensor_to (the merge
in float32 and the conversion to the output dtype, counting NaN/Inf: one fused pass for the linear merges) and
the checks of the result (`merge_tensor`).

Methods whose count sees every non-finite input (MergeMethod.counts_nonfinite_inputs: the fused linear merges,
whose output holds every input's NaN/Inf, TIES, whose count adds its non-finite task-vector entries, and CART,
whose mean holds them and which then skips its SVDs) are not
scanned up front: only when the merged tensor's count is not 0 are its inputs scanned, to name the file and
tensor with the same words as the up-front scan, before anything of that tensor is written. That saves a read of
every input byte (a min/max pass over T + 1 tensors) per tensor. When that scan finds the inputs finite, the
output is counted again on its own: TIES's count also holds task vectors x_t - base that overflow float32 from
finite inputs, which TIES may have dropped, leaving a finite output that is written as usual.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..errors import MergeError, MergeInputError
from ..io import TensorInfo
from ..validation import FLOAT, check_group, count_nonfinite


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def scans_inputs_upfront(method) -> bool:
    """Whether the reader scans a float tensor's inputs for NaN/Inf before the merge (else merge_tensor does,
    only when the method's count says there is something to find)."""
    return not method.counts_nonfinite_inputs


def check_inputs(key: str, kind: str, tensors: Sequence[torch.Tensor], labels: Sequence[str],
                 allow_nonfinite: bool, scan: bool = True) -> List[str]:
    """Raise if the tensors called `key` cannot be merged; return the messages of inputs holding NaN/Inf (which
    raise unless allow_nonfinite). scan=False: float tensors are not scanned (see scans_inputs_upfront)."""
    if kind != FLOAT:
        check_group(key, tensors, labels)
        return []
    if not scan:
        return []
    return scan_inputs(key, tensors, labels, allow_nonfinite)


def scan_inputs(key: str, tensors: Sequence[torch.Tensor], labels: Sequence[str],
                allow_nonfinite: bool) -> List[str]:
    """The messages of the inputs holding NaN/Inf, in input order; raises at the first one unless allow_nonfinite."""
    found = []
    for t, where in zip(tensors, labels):
        bad = count_nonfinite(t)
        if bad:
            msg = f"tensor {key!r} in {where} holds {bad} NaN/Inf value(s) of {t.numel()}"
            if not allow_nonfinite:
                raise MergeInputError(msg + "; pass --allow-nonfinite (API: allow_nonfinite=True) to merge anyway")
            found.append(msg)
    return found


def merge_tensor(method, key: str, inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], want: TensorInfo,
                 allow_nonfinite: bool, nonfinite_inputs: Sequence[str] = (),
                 labels: Optional[Sequence[str]] = None,
                 out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[str]]:
    """The merged tensor in the output dtype (on the compute device) and the non-finite messages it adds.

    nonfinite_inputs: the messages of the up-front scan (check_inputs). labels: where the inputs and then the base
    come from, for the scan made here when the reader did not scan (scans_inputs_upfront) and the result holds
    NaN/Inf; its messages are returned (or raised) like the up-front scan's. out: a buffer of the output's shape
    and dtype to write the result into, for methods that take one (MergeMethod.writes_into)."""
    if nonfinite_inputs:
        _refuse_svd_of_nonfinite(method, key, want, inputs, nonfinite_inputs)
    out, bad = _merge(method, key, inputs, base, want, out)
    return out, _explain_nonfinite(method, key, inputs, base, want, out, bad, allow_nonfinite, nonfinite_inputs,
                                   labels)


def merge_tensor_in_pieces(method, key: str, inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor],
                           want: TensorInfo, allow_nonfinite: bool, nonfinite_inputs: Sequence[str],
                           labels: Optional[Sequence[str]], bounds: Sequence[int],
                           take: Callable[[int, int], torch.Tensor],
                           emit: Callable[[torch.Tensor, int, bool], None]) -> List[str]:
    """merge_tensor for an elementwise method (MergeMethod.elementwise), piece by piece: the flat elements
    [bounds[i], bounds[i + 1]) at a time, each merged into take(first byte, elements) (a contiguous 1-D buffer of
    the output dtype) and handed to emit(piece, first byte, last) at once, so the writer can write it while the
    next one is computed. The bytes are those of merge_tensor: each element is computed alone, whatever the
    pieces. Returns the non-finite messages, the whole tensor's: when a piece counts NaN/Inf, the tensor is merged
    again whole (merge_tensor, only then) to name the input or the cause, before the last piece is handed over, so
    a tensor that raises is never complete at the writer (the merge then stops and removes its partial output)."""
    if nonfinite_inputs:
        _refuse_svd_of_nonfinite(method, key, want, inputs, nonfinite_inputs)
    flat_in = [t.reshape(-1) for t in inputs]
    flat_base = base.reshape(-1) if base is not None else None
    size = want.dtype.itemsize
    bad, found, last = 0, [], len(bounds) - 2
    for i in range(last + 1):
        lo, hi = bounds[i], bounds[i + 1]
        piece = take(lo * size, hi - lo)
        _, n = _merge(method, key, [t[lo:hi] for t in flat_in],
                      flat_base[lo:hi] if flat_base is not None else None, want, piece)
        bad += n
        if i == last and bad:
            _, found = merge_tensor(method, key, inputs, base, want, allow_nonfinite, nonfinite_inputs, labels)
        emit(piece, lo * size, i == last)
    return found


def _merge(method, key: str, inputs, base, want: TensorInfo, out: Optional[torch.Tensor]):
    """(the merged tensor, its non-finite count): the method's merge_tensor_to, its failures as MergeErrors."""
    try:
        if out is not None:
            return method.merge_tensor_to(key, inputs, base, want.dtype, out=out)
        return method.merge_tensor_to(key, inputs, base, want.dtype)
    except torch.cuda.OutOfMemoryError as e:
        raise MergeError(f"tensor {key!r} {want.shape}: out of GPU memory ({str(e).splitlines()[0]}); "
                         "try --device cpu") from None
    except torch.linalg.LinAlgError as e:
        raise MergeInputError(f"tensor {key!r}: {method.name}'s linear algebra failed on it "
                              f"({str(e).splitlines()[0]})") from None


def _explain_nonfinite(method, key: str, inputs, base, want: TensorInfo, out: torch.Tensor, bad: int,
                       allow_nonfinite: bool, nonfinite_inputs: Sequence[str],
                       labels: Optional[Sequence[str]]) -> List[str]:
    """What a non-finite count `bad` of the merged `out` means: the messages to report (raised unless
    allow_nonfinite), naming the input that holds NaN/Inf, or the overflow, or the conversion."""
    found: List[str] = []
    if not bad:
        return found
    if nonfinite_inputs:  # carried over from inputs already reported (allow_nonfinite)
        return found
    if labels is not None and not scans_inputs_upfront(method):  # the lazy scan: name the input
        group = list(inputs) + ([base] if base is not None else [])
        found = scan_inputs(key, group, labels, allow_nonfinite)
        if found:
            _refuse_svd_of_nonfinite(method, key, want, inputs, found)
            return found
    if method.counts_nonfinite_inputs:  # the count may be more than the output's (TIES: see the docstring)
        bad = count_nonfinite(out)
        if not bad:
            return found
    if _overflowed_in_float32(method, key, inputs, base, out):  # the computation, not the conversion
        msg = (f"merged tensor {key!r} has {bad} NaN/Inf value(s): its inputs are finite, but the float32 "
               "computation overflowed (values beyond float32's range, about 3.4e38)")
        hint = "; pass --allow-nonfinite to write it anyway"
    else:
        msg = (f"merged tensor {key!r} has {bad} NaN/Inf value(s) after conversion to {_dtype_name(want.dtype)} "
               "(values out of range for the output dtype?)")
        hint = "; pass --allow-nonfinite to write it anyway, or pick --out-dtype"
    if not allow_nonfinite:
        raise MergeInputError(msg + hint)
    found.append(msg)
    return found


def _refuse_svd_of_nonfinite(method, key: str, want: TensorInfo, inputs, messages: Sequence[str]) -> None:
    """Raise where the method takes an SVD of this tensor and its inputs hold NaN/Inf (messages: the scan's),
    --allow-nonfinite or not: an SVD of such a matrix is undefined (LAPACK fails or returns NaN)."""
    plan = method.plan_tensor(key, tuple(want.shape), inputs[0].dtype, len(inputs))
    if plan.get("lowrank"):
        raise MergeInputError(f"{messages[0]}; {method.name} takes an SVD of this tensor, which is "
                              "undefined for NaN/Inf values, so --allow-nonfinite cannot merge it with "
                              f"{method.name}: repair the input or use a method without an SVD")


def _overflowed_in_float32(method, key, inputs, base, out: torch.Tensor) -> bool:
    """Whether the float32 result already holds the NaN/Inf that `out` holds (only asked once some are found, so
    the fused methods, which convert on the way, merge the tensor again in float32 to tell)."""
    merged = out if out.dtype == torch.float32 else method.merge_tensor(key, inputs, base)
    return count_nonfinite(merged) > 0
