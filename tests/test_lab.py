"""A scaled-down lab run: two tasks, tiny models, few steps (the "quick" profile)."""
import csv
import importlib.util
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("safetensors")
if importlib.util.find_spec("sklearn") is None:  # the digits ship with scikit-learn
    pytest.skip("scikit-learn is not installed", allow_module_level=True)

from centered_merge.lab import data, main, run_lab  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    lines = []
    summary = run_lab(str(out), profile="quick", seed=0, log=lines.append)
    return out, summary, "\n".join(lines)


def test_runs_and_prints_tables(quick_run):
    out, summary, text = quick_run
    assert summary["tasks"] == ["rot90", "flip_lr"]
    for arch in ("mlp", "cnn"):
        assert f"Merge table, {arch} encoder, 2 tasks" in text
        methods = [r["method"] for r in summary["tables"][arch]["rows"]]
        assert methods == ["pretrained", "individual", "weight_average", "task_arithmetic", "ties", "cart",
                           "cart_randomized", "tsv", "iso_c", "iso_cts"]


def test_each_finetuned_model_beats_pretrained_on_its_own_task(quick_run):
    _, summary, _ = quick_run
    for arch in ("mlp", "cnn"):
        rows = {r["method"]: r for r in summary["tables"][arch]["rows"]}
        for task, pre, ind in zip(summary["tasks"], rows["pretrained"]["test"], rows["individual"]["test"]):
            assert ind > pre, f"{arch}/{task}: fine-tuned {ind:.3f} <= pretrained {pre:.3f}"


def test_plots_csvs_and_checkpoints_written(quick_run):
    out, summary, _ = quick_run
    pngs = ["cart_rank_sweep.png", "cart_spectrum.png", "rethinking_templates.png",
            "rethinking_merge_vs_ensemble.png", "rethinking_scaling.png"]
    csvs = ["table_mlp.csv", "table_cnn.csv", "search_mlp.csv", "rank_sweep_mlp.csv", "cart_spectrum.csv",
            "rethinking_templates.csv", "rethinking_merge_vs_ensemble.csv", "rethinking_scaling.csv"]
    for name in pngs:
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    for name in csvs:
        with open(out / name) as f:
            rows = list(csv.reader(f))
        assert len(rows) >= 2, name
    with open(out / "table_mlp.csv") as f:
        methods = [r["method"] for r in csv.DictReader(f)]
    assert "cart" in methods and "ties" in methods
    with open(out / "cart_spectrum.csv") as f:
        kinds = {r["vector"] for r in csv.DictReader(f)}
    assert kinds == {"centered", "uncentered"}
    from safetensors.torch import load_file
    for arch in ("mlp", "cnn"):
        for method in ("weight_average", "task_arithmetic", "ties", "cart"):
            sd = load_file(str(out / "merged" / arch / f"{method}.safetensors"))
            assert sd and all(torch.isfinite(v).all() for v in sd.values())
    with open(out / "results.json") as f:
        assert json.load(f)["profile"]["name"] == "quick"


def test_rerun_uses_the_checkpoint_cache(quick_run, tmp_path):
    out, _, _ = quick_run
    lines = []
    run_lab(str(tmp_path), profile="quick", seed=0, cache_dir=str(out / "cache"), archs=["mlp"],
            log=lines.append)
    assert any("(cached)" in l for l in lines)


def test_splits_are_disjoint_and_tasks_distinct():
    base = data.load_digits_split(0)
    sizes = {k: len(v[1]) for k, v in base.items()}
    assert sum(sizes.values()) == 1797 and abs(sizes["train"] - 1200) <= 5 and abs(sizes["val"] - 250) <= 5
    flat = {k: {v[0][i].tobytes() for i in range(len(v[1]))} for k, v in base.items()}
    # digits has a few duplicate images; the split itself is by index, so overlaps are at most those
    assert len(flat["train"] & flat["test"]) <= 5
    tasks = data.make_tasks(data.task_names(8), seed=0)
    xs = [t.test.x for t in tasks]
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            assert not torch.equal(xs[i], xs[j]), (tasks[i].name, tasks[j].name)


def test_cli_rejects_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--profile", "nope"])
    assert main(["--tasks", "99", "--out", str(tmp_path / "x")]) == 2
    assert "number of tasks" in capsys.readouterr().err


def test_rank_sweep_full_rank_is_weight_averaging(quick_run):
    # r = 1 keeps every centered direction; they sum to zero, so CART at full rank is the weight average
    _, summary, _ = quick_run
    for arch in ("mlp", "cnn"):
        wa = next(r for r in summary["tables"][arch]["rows"] if r["method"] == "weight_average")
        full = next(r for r in summary["rank_sweep"][arch] if r["rank"] == 1.0)
        assert full["test"] == pytest.approx(wa["abs"], abs=1e-6)
        assert summary["interior_optimum"][arch]["by_val"]["where"] in (
            "interior", "lowest rank tried", "largest rank tried")
