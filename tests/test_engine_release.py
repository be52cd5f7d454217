"""The reader releases each tensor's input pages behind the merge (engine/reader.py, TensorSource.release): only
tensors the merge has finished and handed to the writer, each once per input, and the output is the same as with
nothing released."""
import pytest
import torch

import centered_merge as cm
from centered_merge.engine import reader as reader_mod
from centered_merge.io import SafetensorsFile
from centered_merge.io.writer import ShardedWriter

from _engine_util import make_state_dicts, save_models, tree_bytes


def _files_map(paths) -> bool:
    f = SafetensorsFile(paths[0])
    try:
        return f.mode == "map"
    finally:
        f.close()  # its lease must not outlive the probe


@pytest.mark.parametrize("method, read_ahead", [("weight_average", 1), ("weight_average", 2),
                                                ("task_arithmetic", 2), ("ties", 0)])
def test_released_only_behind_the_merge(tmp_path, monkeypatch, method, read_ahead):
    base, models = make_state_dicts(T=3)
    base_p, paths = save_models(tmp_path, base, models)
    if not _files_map(paths):
        pytest.skip("no file leases here: inputs are read with pread, nothing is mapped")
    handed, released, early = [], [], []
    real_write, real_release = ShardedWriter.write, SafetensorsFile.release

    def write(self, key, tensor):
        handed.append(key)
        return real_write(self, key, tensor)

    def release(self, key):
        if key not in handed:
            early.append(key)
        released.append((str(self.path), key))
        return real_release(self, key)

    monkeypatch.setattr(ShardedWriter, "write", write)
    monkeypatch.setattr(SafetensorsFile, "release", release)
    use_base = method != "weight_average"
    kw = {"base": base_p} if use_base else {}
    params = {"density": 0.5} if method == "ties" else {}
    cm.merge_checkpoints(paths, tmp_path / "out", method=method, progress=False, read_ahead=read_ahead,
                         **kw, **params)
    assert not early, f"released before the merge had finished them: {early}"
    files = len(paths) + (1 if use_base else 0)
    if read_ahead == 0:
        assert released == []  # no reader thread: everything goes at close
    else:
        keys = {k for _, k in released}
        assert len(keys) == len(handed) - read_ahead - 2, (len(keys), len(handed))
        assert len(released) == files * len(keys)  # once per input file
        assert keys == set(handed[: len(keys)])

    monkeypatch.setattr(reader_mod.Reader, "_release_behind", lambda self, i: None)
    cm.merge_checkpoints(paths, tmp_path / "out2", method=method, progress=False, read_ahead=read_ahead,
                         **kw, **params)
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "out2")
