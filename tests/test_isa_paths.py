"""Every CPU ISA path this machine can run passes the kernel tests, forced one at a time with
CENTERED_MERGE_CPU_ISA (the main run covers the path chosen by default, so the others run here, each in a
child pytest process: the choice is made when the extension loads). A path the CPU lacks or the build did not
compile makes the import fail with the reason, which turns into the usual one-warning fallback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from centered_merge import _native

C = _native.get(warn=False)
pytestmark = pytest.mark.skipif(C is None, reason=f"native extension not built: {_native.error()}")
TESTS = Path(__file__).resolve().parent
INFO = C.build_info() if C is not None else {}
SUPPORTED = [s for s in INFO.get("cpu_isas_supported", "").split(",") if s]
OTHERS = [s for s in SUPPORTED if s != INFO.get("cpu_isa")]


def test_default_is_the_best_supported_path():
    assert INFO["cpu_isa"] == SUPPORTED[0], INFO
    if not INFO["cpu_isas_compiled"].startswith("native"):
        assert "baseline" in INFO["cpu_isas_compiled"].split(",")  # a portable build always has the fallback


@pytest.mark.parametrize("isa", OTHERS or ["(none)"])
def test_kernels_pass_with_the_path_forced(isa):
    if isa == "(none)":
        pytest.skip("this CPU supports only one compiled path (covered by the main run)")
    env = dict(os.environ, CENTERED_MERGE_CPU_ISA=isa)
    check = ("import centered_merge, sys; i = centered_merge.build_info(); "
             f"sys.exit(0 if i['cpu_isa'] == {isa!r} else 'cpu_isa is ' + str(i['cpu_isa']))")
    r = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W",
                        "error::centered_merge._native.NativeFallbackWarning",
                        str(TESTS / "test_kernels.py"), "-k", "not cuda"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_forcing_an_unavailable_path_fails_the_import_with_the_reason():
    missing = [s for s in ("avx512", "avx2", "baseline", "native") if s not in SUPPORTED]
    name = missing[0] if missing else "sse9"
    code = ("import warnings, centered_merge\n"
            "from centered_merge import _native\n"
            "assert _native.get(warn=False) is None\n"
            "print(_native.error())")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, CENTERED_MERGE_CPU_ISA=name),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"CENTERED_MERGE_CPU_ISA={name}" in r.stdout, r.stdout


def test_select_cpu_isa_switches_paths():
    before = C.build_info()["cpu_isa"]
    try:
        for isa in SUPPORTED:
            C.select_cpu_isa(isa)
            assert C.build_info()["cpu_isa"] == isa
    finally:
        C.select_cpu_isa(before)
