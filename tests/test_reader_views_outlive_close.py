"""A tensor viewed from a mapped safetensors file stays readable after the file is closed (SafetensorsFile.close
leaves the map to the live views), so the inputs an engine error's frames still hold can be printed: before, the
map was unmapped under them and reading one was a segfault. Run in a child process, where a crash is a failed
assertion instead of the end of the test run."""
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CHILD = r"""
import sys, traceback
import torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[2])
from _engine_util import make_state_dicts
import centered_merge as cm
from centered_merge.io.safetensors_reader import SafetensorsFile

d = sys.argv[1]
save_file({"w": torch.arange(12.0).reshape(3, 4)}, d + "/one.safetensors")
f = SafetensorsFile(d + "/one.safetensors", mode="map")
v = f.get("w")
f.close()
assert v.sum().item() == 66.0, v

base, models = make_state_dicts(T=2, dtype=torch.float32)
models[1]["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
paths = []
for i, m in enumerate([base] + models):
    paths.append(f"{d}/m{i}.safetensors")
    save_file(m, paths[-1])
try:
    cm.merge_checkpoints(paths[1:], d + "/out", method="weight_average", progress=False)
    raise SystemExit("the NaN input was not refused")
except cm.MergeInputError as e:
    text = "".join(traceback.TracebackException.from_exception(e, capture_locals=True).format())
print("ok", len(text))
"""


def test_views_outlive_close_and_error_frames_can_be_printed(tmp_path):
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(TESTS)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
