"""Every bound function of centered_merge._C rejects every wrong argument with a ValueError or TypeError that
names the function and the argument; nothing reaches a kernel with a bad pointer (the sanitizer job,
`make sanitize`, runs this file too).

Table-driven: each binding has one valid call (SPECS); each argument is then replaced, one at a time, by every
wrong value of its kind (None, a non-capsule, a wrong dtype, a wrong shape, a non-contiguous or 0-stride view,
an output that overlaps an input, a wrong scalar type, a non-finite number).
"""
import math

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from centered_merge import _native

C = _native.get(warn=False)
pytestmark = pytest.mark.skipif(C is None, reason=f"native extension not built: {_native.error()}")

N = (4, 6)


def _t(dtype=torch.float32, shape=N):
    return torch.randn(shape).to(dtype)


# name -> (positional argument names, builder of a valid {arg: value}, output tensor args, input tensor args,
#          scalar args {name: kind} with kind in "finite", "number", "int", "u64", "bool")
def _mean():
    return {"inputs": [_t(torch.bfloat16), _t()], "weights": None, "out": _t(), "accumulate": False, "scale": 0.5,
            "apply_scale": True, "stream": 0, "index_base": 0}


def _center():
    return {"w": _t(torch.float16), "mean": _t(), "out": _t(), "stream": 0}


def _finalize():
    return {"x": _t(), "add": _t(), "out": _t(torch.bfloat16), "stream": 0, "counter": None}


def _ties():
    return {"inputs": [_t(), _t(torch.bfloat16)], "base": _t(), "out": _t(), "k": 5, "lam": 0.7, "stream": 0,
            "workspace": None, "weights": [0.7, -0.3], "normalize": True, "counter": None}


def _dare():
    return {"tau": _t(), "out": _t(), "p": 0.3, "scale": 1 / 0.7, "seed": 7, "stream": 0}


def _linear():
    return {"inputs": [_t(), _t(torch.float16)], "weights": [0.25, 0.75], "base": _t(torch.bfloat16), "lam": 0.5,
            "out": _t(torch.bfloat16), "stream": 0, "counter": None}


SPECS = {
    "mean_fp32": (_mean, ["out"], ["inputs"],
                  {"accumulate": "bool", "scale": "finite", "apply_scale": "bool", "stream": "u64", "index_base": "int"}),
    "center_into": (_center, ["out"], ["w", "mean"], {"stream": "u64"}),
    "finalize": (_finalize, ["out"], ["x", "add"], {"stream": "u64"}),
    "ties_merge": (_ties, ["out"], ["inputs", "base"],
                   {"k": "int_or_list", "lam": "finite", "stream": "u64", "normalize": "bool"}),
    "dare": (_dare, ["out"], ["tau"], {"p": "number", "scale": "finite", "seed": "u64", "stream": "u64"}),
    "linear_merge": (_linear, ["out"], ["inputs", "base"], {"lam": "finite", "stream": "u64"}),
}


def _call(name, args):
    def conv(v):
        if isinstance(v, torch.Tensor):
            return to_dlpack(v)
        if isinstance(v, list) and v and isinstance(v[0], (torch.Tensor, type(None), str)):
            return [conv(x) for x in v]
        return v

    return getattr(C, name)(**{k: conv(v) for k, v in args.items()})


def test_every_binding_is_in_the_table():
    bound = {n for n in dir(C) if callable(getattr(C, n)) and not n.startswith("_")}
    helpers = {"build_info", "cuda_device_count", "ties_workspace_bytes", "select_cpu_isa"}
    assert bound - helpers == set(SPECS), "add the new binding to SPECS"


@pytest.mark.parametrize("name", SPECS)
def test_the_valid_call_works(name):
    _call(name, SPECS[name][0]())


def _tensor_cases(name):
    build, outs, ins, _ = SPECS[name]
    cases = []
    for arg in outs + ins:
        is_list = isinstance(build()[arg], list)
        label = f"{arg}[1]" if is_list else arg
        for bad, exc, why in [
            (None, (TypeError, ValueError), "None"),
            ("not a capsule", TypeError, "object"),
            (lambda: torch.ones(N, dtype=torch.int64), ValueError, "int64"),
            (lambda: torch.ones(N, dtype=torch.float64), ValueError, "float64"),
            (lambda: _t(shape=(N[1], N[0])), ValueError, "shape"),
            (lambda: _t(shape=(N[1], N[0])).t(), ValueError, "strides"),
            (lambda: _t(shape=(1, N[1])).expand(*N), ValueError, "stride0"),
            (lambda: _t(shape=(2 * N[0], N[1]))[::2], ValueError, "step"),
        ]:
            if bad is None and (arg == "add" or (name, arg) == ("linear_merge", "base")):
                continue  # valid: finalize without an addend, a linear merge without a base
            cases.append(pytest.param(name, arg, is_list, label, bad, exc, id=f"{name}-{label}-{why}"))
    return cases


@pytest.mark.parametrize("name, arg, is_list, label, bad, exc",
                         [c for n in SPECS for c in _tensor_cases(n)])
def test_wrong_tensor_argument_is_named(name, arg, is_list, label, bad, exc):
    args = SPECS[name][0]()
    value = bad() if callable(bad) else bad
    if is_list:
        args[arg][1] = value
    else:
        args[arg] = value
    pattern = rf"{name}: argument '{label}'".replace("[", r"\[").replace("]", r"\]")
    if arg == ("x" if name == "finalize" else "out") and callable(bad) and bad().shape != N:
        # the shape of the reference argument (out; x for finalize) is what the others are checked against, so
        # the message names the first other argument and says whose shape it expected
        pattern = rf"{name}: argument '.*': expected shape .*\(the shape of '{label}'\)"
    with pytest.raises(exc, match=pattern):
        _call(name, args)


def _alias_cases():
    cases = []
    for name, (build, outs, ins, _) in SPECS.items():
        for o in outs:
            for i in ins:
                cases.append(pytest.param(name, o, i, id=f"{name}-{o}-aliases-{i}"))
    return cases


@pytest.mark.parametrize("name, out_arg, in_arg", _alias_cases())
def test_out_overlapping_an_input_is_refused(name, out_arg, in_arg):
    args = SPECS[name][0]()
    out = args[out_arg]
    src = args[in_arg]
    target = src[0] if isinstance(src, list) else src
    # the input becomes a view of the output's memory (same dtype as the output, so every other check passes)
    alias = out.view(-1)[: out.numel()].view(out.shape)
    if target.dtype != out.dtype and in_arg in ("mean", "x", "add"):
        return  # those inputs must be float32 and the output here is not: nothing to alias legally
    if isinstance(src, list):
        src[0] = alias
    else:
        args[in_arg] = alias
    with pytest.raises(ValueError, match=rf"{name}: argument '{out_arg}'.*overlaps"):
        _call(name, args)


def _scalar_cases():
    cases = []
    for name, (_, _, _, scalars) in SPECS.items():
        for arg, kind in scalars.items():
            bads = [(None, TypeError), ("1", TypeError)]
            bads += [([1], ValueError), ([1, 1.5], TypeError)] if kind == "int_or_list" else [([1], TypeError)]
            if kind == "finite":
                bads += [(math.nan, ValueError), (math.inf, ValueError)]
            if kind in ("int", "u64", "int_or_list"):
                bads += [(1.5, TypeError), (-1, ValueError)]
            if kind == "bool":
                bads += [(1, TypeError)]
            if kind == "number":
                bads += [(math.nan, ValueError), (2.0, ValueError)]
            for bad, exc in bads:
                cases.append(pytest.param(name, arg, bad, exc, id=f"{name}-{arg}-{bad!r}"))
    return cases


@pytest.mark.parametrize("name, arg, bad, exc", _scalar_cases())
def test_wrong_scalar_argument_is_named(name, arg, bad, exc):
    args = SPECS[name][0]()
    args[arg] = bad
    with pytest.raises(exc, match=rf"{name}: argument '{arg}'"):
        _call(name, args)


def test_inputs_and_weights_containers():
    for bad, exc, what in [(None, TypeError, "inputs"), ("ab", TypeError, "inputs"), ([], ValueError, "inputs"),
                           ([_t()] * (C.MAX_INPUTS + 1), ValueError, "inputs")]:
        args = _mean()
        args["inputs"] = bad
        with pytest.raises(exc, match=rf"mean_fp32: argument '{what}'"):
            _call("mean_fp32", args)
    for bad, exc in [("ab", TypeError), ([1.0], ValueError), ([1.0, "x"], TypeError), ([1.0, math.nan], ValueError)]:
        args = _mean()
        args["weights"] = bad
        with pytest.raises(exc, match=r"mean_fp32: argument 'weights'"):
            _call("mean_fp32", args)
    args = _linear()
    args["weights"] = None
    with pytest.raises(TypeError, match=r"linear_merge: argument 'weights'"):
        _call("linear_merge", args)


def test_k_beyond_numel_and_helpers():
    for k in (math.prod(N) + 1, [1, math.prod(N) + 1], [1, 2, 3]):
        args = _ties()
        args["k"] = k
        with pytest.raises(ValueError, match=r"ties_merge: argument 'k'"):
            _call("ties_merge", args)
    for weights, exc in [([1.0], ValueError), ([1.0, math.inf], ValueError), ("ab", TypeError)]:
        args = _ties()
        args["weights"] = weights
        with pytest.raises(exc, match=r"ties_merge: argument 'weights'"):
            _call("ties_merge", args)
    with pytest.raises(ValueError, match=r"argument 'num_inputs'"):
        C.ties_workspace_bytes(0, 10)
    with pytest.raises(TypeError, match=r"argument 'numel'"):
        C.ties_workspace_bytes(1, None)
    with pytest.raises(ValueError, match=r"select_cpu_isa: argument 'name': unknown CPU ISA"):
        C.select_cpu_isa("sse9")


@pytest.mark.parametrize("name", SPECS)
def test_empty_tensors_are_a_valid_no_op(name):
    # empty tensors of matching shapes are valid (the ops support them); nothing is read or written
    args = SPECS[name][0]()
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            args[k] = torch.empty((0, 3), dtype=v.dtype)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            args[k] = [torch.empty((0, 3), dtype=x.dtype) for x in v]
    if name == "ties_merge":
        args["k"] = 0
    _call(name, args)
