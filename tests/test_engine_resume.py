"""Resume (issue 9, item 3): a merge killed with SIGKILL at several points (early, middle, late, while
finishing, right before the rename) and run again with the same command continues from its journal and ends
byte-identical to an uninterrupted run; a changed parameter or input starts over and says why; --no-resume
discards the partial output."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from centered_merge.cli import main

from _engine_util import leftovers, make_state_dicts, save_models

ROOT = Path(__file__).resolve().parents[1]

# runs the CLI with a SIGKILL planted: after N journal records ("tensors N"), in the middle of finishing the
# directory ("finishing"), or just before the final rename ("rename")
KILLER = r"""
import os, signal, sys
import centered_merge.io.writer as W
where, n = sys.argv[1], int(sys.argv[2])
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
W.SYNC_BYTES = 0  # journal every tensor as it is written: kill points are then exact tensor counts
if where == "tensors":
    real, seen = W.Journal.record, [0]
    def record(self, entries):
        real(self, entries)
        seen[0] += len(entries)
        if seen[0] >= n:
            die()
    W.Journal.record = record
elif where == "finishing":
    W.copy_model_files = die
elif where == "rename":
    W._publish = die
from centered_merge.cli import main
sys.exit(main(sys.argv[3:]))
"""


def tree(d):
    d = Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    base, models = save_models(tmp, *make_state_dicts(T=3, dtype=torch.float32), kind="dir")
    args = [*models, "--method", "cart", "--rank", "0.25", "--shard-size", "3000", "-q"]
    assert main(["merge", *args, "--out", str(tmp / "reference")]) == 0
    return tmp, args, tree(tmp / "reference")


def kill(tmp, args, out, where, n=0):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", KILLER, where, str(n), "merge", *args, "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and (tmp / f".{out.name}.partial").is_dir()


@pytest.mark.parametrize("where, n", [("tensors", 1), ("tensors", 4), ("tensors", 8), ("finishing", 0),
                                      ("rename", 0)], ids=["early", "middle", "late", "finishing", "rename"])
def test_killed_merge_resumes_to_the_same_bytes(setup, capsys, where, n):
    tmp, args, reference = setup
    out = tmp / f"out-{where}-{n}"
    kill(tmp, args, out, where, n)
    capsys.readouterr()
    assert main(["merge", *[a for a in args if a != "-q"], "--out", str(out)]) == 0
    err = capsys.readouterr().err
    if where == "rename":  # the bookkeeping is gone just before the rename: a fresh start, same bytes
        assert "starting over" in err
    else:
        done = 9 if where == "finishing" else n
        assert f"resuming an interrupted merge: {done} of 9 tensors already written" in err, err
    assert tree(out) == reference
    assert leftovers(tmp, out.name) == [out.name]


def test_changed_input_starts_over_and_says_why(setup, capsys):
    tmp, args, reference = setup
    out = tmp / "out-input"
    kill(tmp, args, out, "tensors", 3)
    capsys.readouterr()
    f = Path(args[0]) / "model.safetensors"
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new modification time
    assert main(["merge", *[a for a in args if a != "-q"], "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "starting over" in err and f"input {f.resolve()} changed (size, modification time or header)" in err, err
    assert tree(out) == reference


def test_parameter_change_is_named(setup, capsys):
    tmp, args, _ = setup
    out = tmp / "out-param"
    kill(tmp, args, out, "tensors", 2)
    capsys.readouterr()
    other = [("0.5" if a == "0.25" else a) for a in args if a != "-q"]
    assert main(["merge", *other, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "starting over" in err and "the method or its parameters changed" in err, err


def test_no_resume_discards(setup, capsys):
    tmp, args, reference = setup
    out = tmp / "out-noresume"
    kill(tmp, args, out, "tensors", 4)
    capsys.readouterr()
    assert main(["merge", *[a for a in args if a != "-q"], "--no-resume", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "starting over" in err and "--no-resume was given" in err and "resuming" not in err
    assert tree(out) == reference


def test_old_crc32_journal_lines_are_written_again(setup, capsys):
    """Journals of before 2026-12-01 recorded zlib CRC-32s ("crc32"); the checksum is now xxh3-64: such lines do
    not count, so those tensors are written again and the output is the same."""
    import json

    tmp, args, reference = setup
    out = tmp / "out-oldjournal"
    kill(tmp, args, out, "tensors", 4)
    part = tmp / f".{out.name}.partial"
    (journal,) = [p for p in part.iterdir() if p.name.startswith(".centered_merge-journal")]
    lines = [json.loads(ln) for ln in journal.read_text().splitlines() if ln]
    assert len(lines) == 4 and all("xxh3_64" in e for e in lines)
    old = [{k: v for k, v in e.items() if k != "xxh3_64"} | {"crc32": 0} for e in lines[:2]]
    journal.write_text("".join(json.dumps(e) + "\n" for e in old + lines[2:]))
    capsys.readouterr()
    assert main(["merge", *[a for a in args if a != "-q"], "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "resuming an interrupted merge: 2 of 9 tensors already written" in err, err
    assert tree(out) == reference


def test_changed_bytes_fail_the_checksum(setup, capsys):
    """A journaled tensor whose bytes on disk changed after the kill is written again."""
    import json

    tmp, args, reference = setup
    out = tmp / "out-flipped"
    kill(tmp, args, out, "tensors", 3)
    part = tmp / f".{out.name}.partial"
    (journal,) = [p for p in part.iterdir() if p.name.startswith(".centered_merge-journal")]
    e = json.loads(journal.read_text().splitlines()[0])
    shard = sorted(p for p in part.iterdir() if p.suffix == ".safetensors")[e["shard"]]
    with open(shard, "r+b") as f:
        f.seek(e["offset"])
        b = f.read(1)
        f.seek(e["offset"])
        f.write(bytes([b[0] ^ 0x40]))
    capsys.readouterr()
    assert main(["merge", *[a for a in args if a != "-q"], "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "resuming an interrupted merge: 2 of 9 tensors already written" in err, err
    assert tree(out) == reference
