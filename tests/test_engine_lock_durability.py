"""Two merges, one output (a lock naming its holder; a dead holder's lock taken over) and durability (fsync of
every file, the partial and parent directories, the journal; umask permissions on the published output)."""
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path


import centered_merge.io.writer as writer_mod
from centered_merge.cli import main
from centered_merge.engine import merge_checkpoints
from centered_merge.engine.lock import lock_path

from _engine_util import leftovers, make_state_dicts, save_models

ROOT = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from centered_merge.engine.lock import OutputLock
lock = OutputLock(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_second_merge_into_the_same_output_fails_at_once_naming_the_holder(tmp_path, capsys):
    _, models = save_models(tmp_path, *make_state_dicts(T=2), kind="file")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        rc = main(["merge", *models, "--method", "weight_average", "--out", str(out), "-q"])
        err = capsys.readouterr().err
        assert time.monotonic() - t0 < 10  # at once, not after waiting
        assert rc == 1 and "Traceback" not in err
        assert f"another merge into this output is running (pid {holder.pid} on host {socket.gethostname()}" in err
        assert not out.exists() and not any(n.startswith(".out.partial") for n in os.listdir(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed): its lock file is left, and the next merge takes it over
    assert lock_path(out).exists()
    rep = merge_checkpoints(models, out, method="weight_average", progress=False)
    assert any(f"took over the lock of a merge that is gone (pid {holder.pid}" in n for n in rep.notes), rep.notes
    assert leftovers(tmp_path, "out") == ["out"]  # lock file removed at the end


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    _, models = save_models(tmp_path, *make_state_dicts(T=2), kind="file")
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": 0}))
    rep = merge_checkpoints(models, out, method="weight_average", progress=False)
    assert any("pid 999999 on host elsewhere" in n for n in rep.notes)
    assert (out / "model.safetensors").exists() and leftovers(tmp_path, "out") == ["out"]


def test_published_output_has_umask_permissions(tmp_path):
    _, models = save_models(tmp_path, *make_state_dicts(T=2), kind="dir")
    old = os.umask(0o022)
    try:
        merge_checkpoints(models, tmp_path / "out", method="weight_average", shard_size=3000, progress=False)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_every_file_and_directory_is_fsynced(tmp_path, monkeypatch):
    _, models = save_models(tmp_path, *make_state_dicts(T=2), kind="dir")
    synced = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def where(fd):
        return os.readlink(f"/proc/self/fd/{fd}")

    def fsync(fd):
        synced.append(where(fd))
        return real_fsync(fd)

    def fdatasync(fd):
        synced.append(where(fd))
        return real_fdatasync(fd)

    monkeypatch.setattr(writer_mod.os, "fsync", fsync)
    monkeypatch.setattr(writer_mod.os, "fdatasync", fdatasync)
    merge_checkpoints(models, tmp_path / "out", method="weight_average", shard_size=3000, progress=False)
    partial = str(tmp_path / ".out.partial")
    names = {Path(p).name for p in synced if p.startswith(partial + "/")}
    published = set(os.listdir(tmp_path / "out"))
    assert published <= names, published - names  # shards, index, config, card
    assert {"model.safetensors.index.json", "config.json", "README.md"} <= published
    journal = [i for i, p in enumerate(synced) if "centered_merge-journal" in p]
    assert journal  # the journal is fsynced, and only after the shard bytes it records
    assert all(any(synced[j].endswith(".safetensors") for j in range(i)) for i in journal)
    assert partial in synced and str(tmp_path) == synced[-1]  # the parent directory, after the rename
