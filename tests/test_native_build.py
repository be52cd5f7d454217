"""The native build: the extension loads, reports what it was built with, validates its arguments at the
boundary, borrows DLPack capsules without consuming them, and a missing extension falls back with one warning."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from centered_merge import _native, backend, ops
from centered_merge.build import build_info
from centered_merge.ops import reference

C = _native.get(warn=False)
needs_ext = pytest.mark.skipif(C is None, reason=f"native extension not built: {_native.error()}")


def test_extension_is_built_and_loads():
    # `make build` / `pip install -e .` always builds it; a failure here means the build rotted.
    assert C is not None, _native.error()


@needs_ext
def test_build_info_reports_the_build():
    info = build_info()
    for key in ("version", "torch", "native_loaded", "cpu_kernels", "cpu_isa", "openmp", "openmp_runtime",
                "omp_max_threads", "cuda_compiled", "cuda_kernels", "cuda_archs", "cuda_version", "gpu_available",
                "backend", "ops"):
        assert key in info, key
    assert info["native_loaded"] is True
    assert set(info["cpu_kernels"]) == {"mean_fp32", "center_into", "finalize", "ties_merge", "dare", "linear_merge"}
    assert info["ops"] == list(ops.OPS)
    assert info["cpu_isa"] in info["cpu_isas_supported"] and info["cpu_isa"] in info["cpu_isas_compiled"]
    if info["cuda_compiled"] and not backend.CUDA_VALIDATED:
        assert info["cuda_kernels"] == "compiled, not yet validated"
    assert info["omp_max_threads"] >= 1
    assert info["gpu_available"] == torch.cuda.is_available()


@needs_ext
@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("CENTERED_MERGE_CUDA", "auto") == "off",
                    reason="no nvcc on PATH, or CUDA build switched off")
@needs_ext
@pytest.mark.parametrize("value, on", [(None, False), ("0", False), ("1", True), ("on", True), ("false", False)])
def test_hugepage_hint_is_opt_in(value, on):
    # off unless CENTERED_MERGE_HUGEPAGES asks for it (docs/kernels.md: it cost the CLI merges time on this VM);
    # read once at load, so each case runs in a fresh interpreter
    env = {k: v for k, v in os.environ.items() if k != "CENTERED_MERGE_HUGEPAGES"}
    if value is not None:
        env["CENTERED_MERGE_HUGEPAGES"] = value
    code = "import centered_merge; print(centered_merge.build_info()['hugepage_hint'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(on)


def test_cuda_part_is_compiled_whenever_nvcc_is_present():
    # With CENTERED_MERGE_CUDA=auto the CUDA kernels are compiled on every build where nvcc exists, so they
    # cannot rot even on machines without a GPU.
    info = build_info()
    assert info["cuda_compiled"] is True
    assert set(info["cuda_archs"].split(",")) >= {"80", "90"} or os.environ.get("CMAKE_CUDA_ARCHITECTURES")


@needs_ext
def test_importing_needs_no_gpu_driver():
    n, why = C.cuda_device_count()
    if not torch.cuda.is_available():
        assert n == 0 and why  # says why, does not crash


def test_backend_env_switch(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setenv("CENTERED_MERGE_BACKEND", "torch")
    assert ops.choose("mean_fp32", [x]) == "torch"
    assert not backend.native_allowed("cpu")
    monkeypatch.setenv("CENTERED_MERGE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CENTERED_MERGE_BACKEND"):
        ops.choose("mean_fp32", [x])
    for m in ("auto", "native"):
        monkeypatch.setenv("CENTERED_MERGE_BACKEND", m)
        expect = "native-cpu" if C is not None else "torch"
        assert ops.choose("ties_merge", [x], x, 0.5, 1.0) == expect
        assert ops.choose("ties_merge", [x], x.double(), 0.5, 1.0) == "torch"  # no float64 kernel
        assert ops.choose("dare", x.bfloat16(), 0.5, 0) == expect
        assert ops.choose("dare", x.bfloat16(), 0.0, 0) == "torch"  # p = 0: nothing to drop, the twin copies
    with pytest.raises(ValueError, match="unknown op"):
        ops.choose("nope", x)


def test_ops_and_backend_import_no_cycle():
    # backend decides per device and never imports ops; ops imports backend (one direction only)
    import ast

    for mod in (backend, _native):
        tree = ast.parse(open(mod.__file__).read())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in names if "ops" in m.split(".")], (mod.__name__, names)


@needs_ext
def test_cuda_gate(monkeypatch):
    # until backend.CUDA_VALIDATED, `auto` never runs the CUDA kernels; `native` opts in where a GPU is seen
    monkeypatch.setattr(_native, "cuda_usable", lambda: True)
    monkeypatch.setattr(backend, "_said", {"cuda_gate": False})
    monkeypatch.setenv("CENTERED_MERGE_BACKEND", "auto")
    if not backend.CUDA_VALIDATED:
        with pytest.warns(backend.CudaNotValidatedWarning, match="not yet validated"):
            assert backend.native_allowed("cuda") is False
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once only
            assert backend.native_allowed("cuda") is False
        assert backend.describe()["cuda"] == "torch"
    monkeypatch.setenv("CENTERED_MERGE_BACKEND", "native")
    assert backend.native_allowed("cuda") is True
    assert backend.describe()["cuda"] == "native"


@needs_ext
def test_backend_describe(monkeypatch):
    monkeypatch.delenv("CENTERED_MERGE_BACKEND", raising=False)
    d = backend.describe()
    assert d["backend"] == "auto" and d["native"] is True and d["cpu"] == "native"
    if not torch.cuda.is_available():
        assert d["cuda"] == "torch"


def test_missing_extension_falls_back_with_one_warning():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["centered_merge._C"] = None          # makes `from . import _C` raise ImportError
        import torch
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            from centered_merge import ops, backend
            from centered_merge.build import build_info
            xs = [torch.randn(5, 3) for _ in range(3)]
            m = ops.mean_fp32(xs)
            ops.center_into(xs[0], m, torch.empty(5, 3))
            ops.finalize(m, torch.bfloat16)
            assert ops.choose("mean_fp32", xs) == "torch"
            info = build_info()
            assert info["native_loaded"] is False and "Error" in info["native_error"], info
        msgs = [str(r.message) for r in rec if r.category.__name__ == "NativeFallbackWarning"]
        assert len(msgs) == 1, msgs
        print("OK", msgs[0])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout and "native extension is not available" in r.stdout


# --- argument checks at the binding boundary: the message names the argument, what was expected, what came --
def _cap(t):
    return to_dlpack(t)


@needs_ext
@pytest.mark.parametrize("case, pattern", [
    ("shape", r"mean_fp32: argument 'inputs\[1\]': expected shape \(4, 3\).*got shape \(3, 4\)"),
    ("dtype", r"mean_fp32: argument 'inputs\[0\]': expected a float32, float16 or bfloat16 tensor, got int64 tensor"),
    ("strides", r"mean_fp32: argument 'inputs\[0\]': expected a contiguous tensor, got strides \(1, 4\) for shape \(4, 3\)"),
    ("object", r"mean_fp32: argument 'inputs\[0\]': expected a DLPack capsule.*got an object of type list"),
    ("none", r"mean_fp32: argument 'inputs\[0\]': expected a DLPack capsule.*got None"),
    ("out_dtype", r"mean_fp32: argument 'out': expected a float32 tensor, got bfloat16 tensor"),
    ("weights", r"mean_fp32: argument 'weights': expected 2 weights \(one per input\), got 3"),
    ("empty", r"mean_fp32: argument 'inputs': expected at least one tensor"),
])
def test_mean_argument_errors(case, pattern):
    out = torch.empty(4, 3)
    good = torch.randn(4, 3)
    inputs, weights = [_cap(good), _cap(good)], None
    if case == "shape":
        inputs[1] = _cap(torch.randn(3, 4))
    elif case == "dtype":
        inputs[0] = _cap(torch.ones(4, 3, dtype=torch.int64))
    elif case == "strides":
        inputs[0] = _cap(torch.randn(3, 4).t())
    elif case == "object":
        inputs[0] = [1, 2]
    elif case == "none":
        inputs[0] = None
    elif case == "out_dtype":
        out = torch.empty(4, 3, dtype=torch.bfloat16)
    elif case == "weights":
        weights = [1.0, 2.0, 3.0]
    elif case == "empty":
        inputs = []
    with pytest.raises(TypeError if case in ("object", "none") else ValueError, match=pattern):
        C.mean_fp32(inputs, weights, _cap(out))


@needs_ext
def test_other_argument_errors():
    x = torch.randn(6)
    with pytest.raises(ValueError, match=r"center_into: argument 'mean': expected a float32 tensor, got float16"):
        C.center_into(_cap(x), _cap(x.half()), _cap(torch.empty(6)))
    with pytest.raises(ValueError, match=r"finalize: argument 'add': expected shape \(6,\).*got shape \(5,\)"):
        C.finalize(_cap(x), _cap(torch.randn(5)), _cap(torch.empty(6)))
    with pytest.raises(TypeError, match=r"finalize: argument 'out': expected a tensor to write x \+ add into"):
        C.finalize(_cap(x), _cap(x.clone()), None)  # used to write through a null pointer (SIGSEGV)
    with pytest.raises(ValueError, match=r"ties_merge: argument 'base': expected a float32, float16 or bfloat16 tensor, got float64"):
        C.ties_merge([_cap(x)], _cap(x.double()), _cap(torch.empty(6)), 1, 1.0)
    with pytest.raises(ValueError, match=r"dare: argument 'p': expected 0 <= p <= 1, got"):
        C.dare(_cap(x), _cap(torch.empty(6)), 1.5, 1.0, 0)
    cap = _cap(x)
    torch.from_dlpack(cap)  # consumes it
    with pytest.raises(ValueError, match=r"argument 'tau': expected an unconsumed DLPack capsule"):
        C.dare(cap, _cap(torch.empty(6)), 0.5, 2.0, 0)


@needs_ext
def test_capsules_are_borrowed_not_consumed():
    x = torch.randn(10)
    cap = _cap(x)
    out = torch.empty(10)
    C.mean_fp32([cap], None, _cap(out), apply_scale=True, scale=1.0)
    assert torch.equal(out, x)
    y = torch.from_dlpack(cap)  # still a live, unconsumed capsule
    assert y.data_ptr() == x.data_ptr()


@needs_ext
def test_versioned_capsules_accepted():
    x = torch.randn(7)
    try:
        cap = x.__dlpack__(max_version=(1, 0))
    except TypeError:
        pytest.skip("this torch cannot produce DLPack 1.x capsules")
    out = torch.empty(7)
    C.center_into(cap, _cap(torch.zeros(7)), out.__dlpack__(max_version=(1, 0)))
    assert torch.equal(out, x)


@needs_ext
def test_table_falls_back_for_what_kernels_do_not_cover():
    a, m = torch.randn(4, 3), torch.randn(3)
    out = torch.empty(4, 3)
    assert ops.choose("center_into", a, m, out) == "torch"  # broadcasting: torch rules
    ops.center_into(a, m, out)
    assert torch.equal(out, a - m)
    xs = [torch.randn(5, dtype=torch.float64), torch.randn(5)]
    assert ops.choose("mean_fp32", xs) == "torch"
    assert torch.allclose(ops.mean_fp32(xs), reference.mean_fp32(xs))
    # an out that aliases an input is the twin's job (the kernels refuse overlapping memory)
    w, mean = torch.randn(6), torch.randn(6)
    assert ops.choose("center_into", w, mean, mean) == "torch"
    expect = w - mean
    assert torch.equal(ops.center_into(w, mean, mean), expect)
    assert ops.choose("center_into", w, mean, torch.empty(6)) == "native-cpu"


@needs_ext
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
def test_one_openmp_runtime_per_process():
    # the extension links the OpenMP runtime torch bundles, so torch and the kernels share one thread pool
    code = ("import torch, centered_merge\nfrom centered_merge import ops\n"
            "ops.mean_fp32([torch.randn(1 << 16)] * 2); torch.randn(1 << 16).sum()\n"
            "libs = sorted({l.split()[-1] for l in open('/proc/self/maps') if 'gomp' in l or 'iomp' in l or 'libomp' in l})\n"
            "print(libs); assert len(libs) == 1, libs")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "openmp_runtime" in build_info()
