"""The benchmark harness end to end on a tiny experiment (synthetic data, 2
seeds, 1 epoch), and its statistics against hand computations."""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import harness  # noqa: E402
import report  # noqa: E402
import stats  # noqa: E402

TINY = ("--epochs=1", "--width=0.25", "--selection=val_accuracy")


@pytest.mark.slow
def test_harness_runs_records_skips_and_reports(tmp_path):
    experiments = [harness.Experiment("main", "synthetic", label, (*TINY, flag), (0, 1))
                   for label, flag in (("STL", "--method=stl"), ("HPS", "--method=hps"))]
    results, scratch = tmp_path / "results", tmp_path / "scratch"
    said = []

    assert harness.run_all(experiments, results, scratch, jobs=2, report=said.append) == []

    keys = ["main/synthetic/HPS/seed0", "main/synthetic/HPS/seed1",
            "main/synthetic/STL/seed0", "main/synthetic/STL/seed1"]
    assert [line.split(" ")[0] for line in said] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert sorted(line.split(" ")[1] for line in said) == keys
    records = harness.load_records(results)
    assert sorted(records) == keys
    record = records["main/synthetic/HPS/seed1"]
    assert (record["label"], record["seed"], record["run_flags"]["seed"]) == ("HPS", 1, 1)
    assert record["run_flags"]["method"] == "hps" and record["run_flags"]["width"] == 0.25
    assert len(record["history"]["history"]["val_loss"]) == 1
    assert record["selected"]["epoch"] == record["last"]["epoch"] == 1
    assert record["selected"]["parameters"] > 0
    assert len(record["step_ms"]) == 1 and record["step_ms"][0] > 0
    assert record["commit"] and record["seconds"] > 0
    assert record["flags"] == [*TINY, "--method=hps", "--dataset=synthetic", "--seed=1",
                               "--export=false", "--verbose=2"]
    stl = records["main/synthetic/STL/seed0"]
    assert set(stl["selected"]["epoch"]) == {"task_0", "task_1"}
    assert len(stl["step_ms"]) == 2  # one fit per task

    # A finished run is never redone.
    mtimes = {p: os.path.getmtime(p) for p in results.rglob("*.json")}
    said.clear()
    assert harness.run_all(experiments, results, scratch, jobs=2, report=said.append) == []
    assert said == [] and harness.pending(experiments, results) == []
    assert {p: os.path.getmtime(p) for p in results.rglob("*.json")} == mtimes
    # ... unless its declaration changed since.
    changed = harness.Experiment("main", "synthetic", "HPS", (*TINY, "--method=hps",
                                                               "--learning_rate=0.01"), (0, 1))
    assert [r.key for r in harness.pending([changed], results)] == [
        "main/synthetic/HPS/seed0", "main/synthetic/HPS/seed1"]

    # The page comes from the records alone.
    page = tmp_path / "RESULTS.md"
    report.write(harness.load_records(results), experiments, page)
    text = page.read_text()
    assert "4 runs" in text and "## synthetic" in text
    hps_row = next(line for line in text.splitlines() if line.startswith("| HPS |"))
    delta = stats.paired(
        [records[f"main/synthetic/HPS/seed{s}"] for s in (0, 1)],
        [records[f"main/synthetic/STL/seed{s}"] for s in (0, 1)], stats.delta_m)
    assert delta.format() in hps_row
    assert (tmp_path / "figures" / "synthetic.png").stat().st_size > 0


def test_a_failed_run_is_named_with_its_log_and_leaves_no_record(tmp_path, monkeypatch):
    experiment = harness.Experiment("main", "synthetic", "HPS", ("--method=hps",), (0,))

    class Failed:
        returncode = 3

    monkeypatch.setattr(harness.subprocess, "run", lambda *a, **k: Failed())
    # An interrupted run of other flags left its checkpoint: it starts over.
    interrupted = tmp_path / "s" / "main/synthetic/HPS/seed0"
    (interrupted / "checkpoint").mkdir(parents=True)
    (interrupted / "harness_flags.json").write_text(json.dumps(["--method=mpps"]))
    said = []
    failed = harness.run_all([experiment], tmp_path / "r", tmp_path / "s", report=said.append)
    assert not (interrupted / "checkpoint").exists()
    assert json.loads((interrupted / "harness_flags.json").read_text()) == \
        experiment.runs()[0].flags()

    assert failed == ["main/synthetic/HPS/seed0"]
    assert "main/synthetic/HPS/seed0: train.py exited with 3" in said[0]
    assert str(tmp_path / "s" / "main/synthetic/HPS/seed0" / "train.log") in said[0]
    assert harness.load_records(tmp_path / "r") == {}


def test_an_experiment_may_not_set_what_the_harness_sets():
    with pytest.raises(ValueError, match="'--seed=3'"):
        harness.Experiment("main", "synthetic", "HPS", ("--method=hps", "--seed=3"))


def test_step_times_are_read_from_the_keras_log_in_milliseconds():
    log = ("Epoch 1/3\n157/157 - 5s - 29ms/step - loss: 1.0\nEpoch 2/3\n"
           "10/10 - 12s - 1s/step - loss: 0.9\n3/3 - 0s - 870us/step - loss: 0.8\n")
    assert harness.step_ms(log) == [29.0, 1000.0, 0.87]


def test_interval_is_the_t_interval_of_the_mean():
    interval = stats.Interval([1.0, 2.0, 6.0])
    assert interval.mean == 3.0
    # t_{0.975, 2} * s / sqrt(3), s = sqrt(7)
    assert math.isclose(interval.half, 4.303 * math.sqrt(7) / math.sqrt(3))
    assert interval.sign() == 0 and stats.Interval([1.0, 1.2, 0.9]).sign() == 1
    assert stats.Interval([-1.0, -1.1]).sign() == -1
    assert math.isnan(stats.Interval([2.0]).half) and stats.Interval([2.0]).sign() == 0


def _record(seed, **accuracy):
    return {"seed": seed, "selected": {f"{t}_accuracy": a for t, a in accuracy.items()}}


def test_paired_measures_pair_seeds_and_eta_hat_reads_intervals():
    stl = [_record(0, a=0.80, b=0.70), _record(1, a=0.82, b=0.72), _record(2, a=0.81, b=0.71)]
    # a: better on every seed; b: 0.5 points worse on every seed.
    mtl = [_record(2, a=0.83, b=0.705), _record(0, a=0.82, b=0.695), _record(1, a=0.84, b=0.715)]

    seed0 = 100 * np.mean([(0.82 - 0.80) / 0.80, (0.695 - 0.70) / 0.70])
    assert math.isclose(stats.delta_m(mtl[1], stl[0]), seed0)
    delta = stats.paired(mtl, stl, stats.delta_m)
    assert delta.n == 3 and math.isclose(delta.mean, np.mean(
        [stats.delta_m(m, s) for m, s in zip(mtl, stl[2:] + stl[:2])]))
    assert stats.paired(mtl, [_record(5, a=0.8, b=0.7)], stats.delta_m) is None
    difference = stats.paired(mtl, stl, stats.improvement("b_accuracy", True))
    assert math.isclose(difference.mean, -0.5) and difference.sign() == -1
    assert stats.eta_hat(mtl, stl) == 50.0
    assert stats.paired_eta_hat(mtl, stl) == 50.0
    noisy = [_record(0, a=0.85, b=0.69), _record(1, a=0.83, b=0.73), _record(2, a=0.82, b=0.70)]
    assert stats.eta_hat(noisy, stl) == 50.0  # b's mean is lower ...
    assert stats.paired_eta_hat(noisy, stl) == 100.0  # ... within its interval


def test_a_paired_gap_differences_two_comparisons_seed_by_seed():
    gain = stats.improvement("a_accuracy", True)
    small = ([_record(s, a=0.80 + 0.01 * s) for s in range(3)],
             [_record(s, a=0.78 + 0.01 * s) for s in range(3)])   # +2 points each seed
    large = ([_record(s, a=0.70 + 0.02 * s) for s in range(1, 4)],
             [_record(s, a=0.695 + 0.02 * s) for s in range(1, 4)])  # +0.5, seeds 1-3
    gap = stats.paired_gap(small, large, gain)
    assert gap.n == 2 and math.isclose(gap.mean, 1.5) and gap.sign() == 1  # seeds 1, 2
    assert stats.paired_gap(small, ([_record(9, a=0.7)], [_record(9, a=0.7)]), gain) is None


def test_metrics_lower_is_better_and_several_per_task_follow_train_py():
    grouped = {"seg": {"seg_miou": True, "seg_pixel_accuracy": True},
               "depth": {"depth_error": False}}
    record = lambda seed, miou, pixel, error: {"seed": seed, "selected": {
        "seg_miou": miou, "seg_pixel_accuracy": pixel, "depth_error": error,
        "task_metrics": grouped}}
    stl = [record(0, 0.5, 0.8, 0.20), record(1, 0.5, 0.8, 0.22)]
    mtl = [record(0, 0.55, 0.8, 0.21), record(1, 0.56, 0.79, 0.23)]  # depth worse

    expected = 100 * np.mean([0.05 / 0.5, 0.0, -0.01 / 0.20])
    assert math.isclose(stats.delta_m(mtl[0], stl[0]), expected)
    worse = stats.paired(mtl, stl, stats.improvement("depth_error", False))
    assert math.isclose(worse.mean, -0.01) and math.isclose(worse.half, 0.0, abs_tol=1e-12)
    # seg: mIoU better, pixel accuracy 0.8 vs 0.8 then 0.79: its mean is lower.
    assert stats.eta_hat(mtl, stl) == 25.0
    # Paired: pixel accuracy's interval (0, -1 points) reaches 0; depth's lies below.
    assert stats.paired_eta_hat(mtl, stl) == 50.0
