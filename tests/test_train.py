"""Tests of `train.py`, run in-process through its absl flags."""

import json
import os

import keras
import numpy as np
import pytest
from absl import app, flags
from absl.testing import flagsaver
from tensorflow.python.framework import config as tf_config

import train
from tf_mtl import export, metrics
from tf_mtl.tasks import classification

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("task_0", "task_1")
# No export unless a test checks it ("--export"): it is a few seconds a run.
FAST = ("--backbone=lenet", "--width=0.25", "--epochs=1", "--limit=64",
        "--batch_size=32", "--verbose=0", "--noexport")


def run_train(output_dir, *args):
    """`python train.py --output_dir=... *args`, flags restored afterwards."""
    with flagsaver.flagsaver():
        FLAGS(["train.py", f"--output_dir={output_dir}", *FAST, *args])
        train.main([])
    return output_dir


def read_json(path):
    with open(path) as f:
        return json.load(f)


def assert_export(directory):
    assert os.path.isfile(os.path.join(directory, "saved_model", "saved_model.pb"))
    assert os.path.getsize(os.path.join(directory, "model.tflite")) > 0


def assert_task_accuracies(results):
    for task in TASKS:
        assert 0.0 <= results[f"{task}_accuracy"] <= 1.0
        assert results[f"{task}_loss"] > 0.0


def test_hps_on_synthetic_writes_every_output(tmp_path, capsys):
    export_dir = tmp_path / "deploy"  # --export_dir moves the export out of the run's folder
    out = run_train(tmp_path / "run", "--export", "--method=hps", "--dataset=synthetic",
                    f"--export_dir={export_dir}")

    history = read_json(out / "history.json")["history"]
    results = read_json(out / "results.json")
    assert set(history) >= {"loss", "val_loss", "task_0_accuracy",
                            "val_task_1_accuracy"}
    assert all(len(values) == 1 for values in history.values())
    assert_task_accuracies(results)
    assert results["loss"] > 0.0
    assert os.listdir(out / "logs")  # TensorBoard event folders.
    assert_export(export_dir)
    assert not (out / "export").exists()
    assert not (out / "ec.png").exists()
    printed = capsys.readouterr().out
    assert "accuracy   lowest" in printed
    assert "hps on synthetic" in printed


def test_stl_on_synthetic_groups_trains_and_exports_each_task(tmp_path):
    out = run_train(tmp_path, "--export", "--method=stl", "--dataset=synthetic_groups")

    history = read_json(out / "history.json")["history"]
    results = read_json(out / "results.json")
    assert set(history) == set(TASKS)
    for task in TASKS:
        assert set(history[task]) >= {"loss", f"{task}_loss", f"val_{task}_loss"}
        assert os.listdir(out / "logs" / task)
        assert_export(out / "export" / task)
    assert_task_accuracies(results)
    assert "loss" not in results  # Each run's total loss is its task's loss.


def test_mpps_on_synthetic_groups_writes_the_capacity_figure(tmp_path):
    out = run_train(tmp_path, "--export", "--method=mpps", "--dataset=synthetic_groups",
                    "--epochs=3", "--mpps_frozen_start=1", "--mpps_frozen_end=1")

    saved = read_json(out / "history.json")
    assert_task_accuracies(read_json(out / "results.json"))
    assert_export(out / "export")
    assert os.path.getsize(out / "ec.png") > 0
    assert not (out / "share_proportions.png").exists()  # Needs >= 3 tasks.
    records = saved["mpps"]
    assert [record["epoch"] for record in records] == [0, 1, 2]
    assert all(0.0 < record["ec"] < 1.0 for record in records)
    assert saved["history"]["ec"] == [record["ec"] for record in records]
    # The target in force moves from exclusive (EC = 1 - eps) in the frozen
    # first epoch to full sharing (EC = eps) in the frozen last one.
    targets = [record["ec_target"] for record in records]
    assert targets[0] == pytest.approx(0.99, abs=1e-4)
    assert targets[-1] == pytest.approx(0.01, abs=1e-4)
    assert targets == sorted(targets, reverse=True)


def test_mpps_frozen_epochs_longer_than_training_are_a_flag_error(tmp_path):
    with pytest.raises(flags.IllegalFlagValueError, match="must fit in --epochs"):
        run_train(tmp_path, "--method=mpps", "--dataset=synthetic_groups",
                  "--epochs=2", "--mpps_frozen_start=2", "--mpps_frozen_end=1")
    assert not (tmp_path / "history.json").exists()
    run_train(tmp_path, "--method=hps", "--dataset=synthetic", "--epochs=2",
              "--mpps_frozen_start=2", "--mpps_frozen_end=1")  # not MPPS: unused


def test_mpps_default_frozen_epochs_fit_a_one_epoch_run(tmp_path):
    out = run_train(tmp_path, "--method=mpps", "--dataset=synthetic")  # --epochs=1
    assert read_json(out / "history.json")["mpps"][0]["ec_target"] == pytest.approx(0.01)


def test_reference_flag_prints_relative_improvement(tmp_path, capsys):
    reference = tmp_path / "stl.json"
    reference.write_text(json.dumps({"task_0_accuracy": 0.5,
                                     "task_1_accuracy": 0.25}))

    out = run_train(tmp_path / "run", "--method=hps", "--dataset=synthetic",
                    f"--reference={reference}")

    results = read_json(out / "results.json")
    delta = metrics.relative_improvement(
        results, read_json(reference),
        metrics.directions([classification(t, 3) for t in TASKS]),
    )
    expected = 50.0 * ((results["task_0_accuracy"] - 0.5) / 0.5
                       + (results["task_1_accuracy"] - 0.25) / 0.25)
    assert delta == pytest.approx(expected)
    compared = results["vs_reference"]
    assert compared["delta"] == pytest.approx(delta)
    # One metric per task: Delta_I is Delta; eta-hat counts the tasks no worse.
    assert compared["delta_i"] == pytest.approx(delta)
    no_worse = [results["task_0_accuracy"] >= 0.5, results["task_1_accuracy"] >= 0.25]
    assert compared["eta_hat"] == pytest.approx(50.0 * sum(no_worse))
    assert f"Delta {delta:+.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize("content, match", [
    (None, "No such file"),
    ("{not json", "Expecting property name"),
    ('{"task_0_accuracy": 0.5}', r"lacks the metrics \['task_1_accuracy'\]"),
])
def test_a_bad_reference_is_refused_before_training(tmp_path, content, match):
    reference = tmp_path / "stl.json"
    if content is not None:
        reference.write_text(content)
    with pytest.raises(app.UsageError, match=match):
        run_train(tmp_path / "run", "--method=hps", "--dataset=synthetic",
                  f"--reference={reference}")
    assert not (tmp_path / "run" / "checkpoint").exists()  # nothing trained


@pytest.mark.parametrize("method", [["--method=smtl"], ["--method=lsmtl_c"],
                                    ["--method=lsmtl", "--smtl_bilevel"]])
def test_safe_mtl_logs_its_gates_and_draws_them(tmp_path, method):
    out = run_train(tmp_path, *method, "--dataset=synthetic", "--epochs=2")
    saved = read_json(out / "history.json")
    assert [r["epoch"] for r in saved["smtl"]] == [0, 1]
    assert len(saved["history"]["alpha_task_0"]) == 2
    assert 0.0 < saved["history"]["alpha_task_1"][-1] < 1.0
    assert os.path.getsize(out / "gates.png") > 0
    assert_task_accuracies(read_json(out / "results.json"))


@pytest.mark.parametrize("method, updates", [("mr", 2), ("tr", 0)])
def test_roaming_logs_update_ratio_and_overlap(tmp_path, method, updates):
    out = run_train(tmp_path, "--export", f"--method={method}", "--dataset=synthetic", "--epochs=2",
                    "--roaming_interval=1", "--sharing_ratio=0.55")
    saved = read_json(out / "history.json")
    assert [r["epoch"] for r in saved["roaming"]] == [0, 1]
    assert all(layer["updates"] == updates for layer in saved["roaming"][-1]["layers"].values())
    assert len(saved["history"]["overlap"]) == 2
    assert (saved["history"]["update_ratio"][-1] > 0) == (method == "mr")
    assert os.path.getsize(out / "roaming.png") > 0
    assert_task_accuracies(read_json(out / "results.json"))
    assert_export(out / "export")


def test_ppnet_alternates_and_draws_the_task_affinity(tmp_path):
    out = run_train(tmp_path, "--export", "--method=ppnet", "--dataset=synthetic_groups", "--epochs=2",
                    "--ppnet_period=1", "--ppnet_passing=channel")
    saved = read_json(out / "history.json")
    assert saved["history"]["adjacent"] == [0.0, 1.0]
    assert [r["epoch"] for r in saved["passing"]] == [1]  # set back at the end
    assert os.path.getsize(out / "affinity.png") > 0
    assert_task_accuracies(read_json(out / "results.json"))
    assert_export(out / "export")


@pytest.mark.parametrize("method", ["self_learn", "adj_fixed", "trace_dynamic"])
def test_ppnet_baselines_train(tmp_path, method):
    out = run_train(tmp_path, f"--method={method}", "--dataset=synthetic")
    assert_task_accuracies(read_json(out / "results.json"))


@pytest.mark.parametrize("flags", [["--method=mtan"],
                                   ["--method=cross_stitch", "--weighting=auto_lambda"]])
def test_architectures_train_and_export(tmp_path, flags):
    out = run_train(tmp_path, "--export", *flags, "--dataset=synthetic")
    assert_task_accuracies(read_json(out / "results.json"))
    assert_export(out / "export")
    if "--weighting=auto_lambda" in flags:  # fitted on the validation split
        history = read_json(out / "history.json")["history"]
        assert history["task_0_weight"][-1] != pytest.approx(0.1, abs=1e-7)


def test_cross_stitch_refuses_data_that_is_not_jointly_labelled(tmp_path):
    with pytest.raises(ValueError, match="jointly labelled"):
        run_train(tmp_path, "--method=cross_stitch", "--dataset=synthetic_groups")


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--epochs=0", "--epochs=0: 0 is not a positive integer"),
        ("--batch_size=0", "--batch_size=0"),
        ("--width=0", "--width=0"),
        ("--mpps_eps=0.5", "--mpps_eps=0.5"),
        ("--mpps_schedule=step0", "--mpps_schedule must be separ"),
        ("--method=nddr", "--method"),
    ],
)
def test_flag_out_of_range_is_rejected(argument, message):
    with flagsaver.flagsaver():
        with pytest.raises(flags.IllegalFlagValueError, match=message):
            FLAGS(["train.py", argument])


def test_flag_set_out_of_range_is_rejected():
    with flagsaver.flagsaver():
        with pytest.raises(flags.IllegalFlagValueError, match="--epochs=0"):
            FLAGS.epochs = 0


def test_sequential_routing_flag_trains(tmp_path):
    out = run_train(tmp_path, "--export", "--method=mpps", "--dataset=synthetic",
                    "--routing=sequential", "--mpps_frozen_start=0",
                    "--mpps_frozen_end=0")
    assert_task_accuracies(read_json(out / "results.json"))
    assert_export(out / "export")


def test_weighting_and_aggregator_flags_train_and_log_the_task_weights(tmp_path):
    out = run_train(tmp_path, "--method=mpps", "--dataset=synthetic", "--weighting=dwa",
                    "--dwa_temperature=3", "--aggregator=cagrad", "--cagrad_c=0.4",
                    "--aggregate_on=representation", "--mpps_frozen_start=0",
                    "--mpps_frozen_end=0")
    history = read_json(out / "history.json")["history"]
    assert history["task_0_weight"] == [1.0] and history["task_1_weight"] == [1.0]
    assert_task_accuracies(read_json(out / "results.json"))
    model = keras.saving.load_model(out / "model.keras")
    assert model.weighting.temperature == 3 and model.aggregator.c == 0.4


def test_bilevel_safe_mtl_with_a_weighting_is_a_flag_error():
    with flagsaver.flagsaver(), pytest.raises(flags.IllegalFlagValueError, match="Bi-level"):
        FLAGS(["train.py", "--method=smtl", "--smtl_bilevel", "--weighting=uw"])


def test_rerun_continues_and_noresume_starts_over(tmp_path):
    run_train(tmp_path, "--method=hps", "--dataset=synthetic")
    run_train(tmp_path, "--method=hps", "--dataset=synthetic", "--epochs=2")
    history = read_json(tmp_path / "history.json")["history"]
    assert len(history["loss"]) == 2  # epoch 1 kept, epoch 2 trained
    first_loss = history["loss"][0]
    with pytest.raises(app.UsageError, match="holds 2 epochs, more than the 1 to train"):
        run_train(tmp_path, "--method=hps", "--dataset=synthetic")
    run_train(tmp_path, "--method=hps", "--dataset=synthetic", "--noresume")
    history = read_json(tmp_path / "history.json")["history"]
    assert len(history["loss"]) == 1 and history["loss"][0] == pytest.approx(first_loss)
    assert len(os.listdir(tmp_path / "logs")) == 2  # train/ and validation/: one run's


class _Killed(Exception):
    pass


def test_stl_rerun_trains_only_the_unfinished_task(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "export", lambda model, directory: None)  # 2 s a task
    args = ("--method=stl", "--dataset=synthetic_groups", "--epochs=2")
    reference = run_train(tmp_path / "reference", *args)
    save = train.Checkpoint.on_epoch_end

    def killed_in_the_second_epoch_of_task_1(self, epoch, logs=None):
        if self.folder.endswith("task_1") and epoch == 1:
            raise _Killed  # before that epoch's checkpoint
        save(self, epoch, logs)

    with monkeypatch.context() as patch:
        patch.setattr(train.Checkpoint, "on_epoch_end", killed_in_the_second_epoch_of_task_1)
        with pytest.raises(_Killed):
            run_train(tmp_path / "killed", *args)
    capsys.readouterr()
    killed = run_train(tmp_path / "killed", *args)
    printed = capsys.readouterr().out
    assert f"{os.path.join('checkpoint', 'task_0')}: all 2 epochs trained already" in printed
    assert f"Resuming at epoch 2 from {os.path.join(killed, 'checkpoint', 'task_1')}" in printed
    for task in TASKS:
        models = [keras.saving.load_model(d / f"model_{task}.keras") for d in (reference, killed)]
        for a, b in zip(models[0].weights, models[1].weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert read_json(killed / "history.json") == read_json(reference / "history.json")
    assert read_json(killed / "results.json") == read_json(reference / "results.json")


def test_deterministic_flag_trains(tmp_path):
    try:
        out = run_train(tmp_path, "--method=hps", "--dataset=synthetic", "--deterministic")
        assert tf_config.is_op_determinism_enabled()
    finally:  # a process-wide setting: the next tests run without it
        tf_config.disable_op_determinism()
    assert_task_accuracies(read_json(out / "results.json"))


@pytest.mark.parametrize("config", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_every_config_parses(config):
    with flagsaver.flagsaver():
        FLAGS(["train.py", f"--flagfile={os.path.join(ROOT, 'configs', config)}"])
        assert config.startswith(FLAGS.method + "_")
        assert FLAGS.output_dir == f"runs/{config[:-len('.cfg')]}"


def test_a_missing_flagfile_is_a_flag_error(tmp_path):
    with pytest.raises(flags.Error, match="Unable to open flagfile"):
        run_train(tmp_path, f"--flagfile={tmp_path / 'missing.cfg'}")


def test_a_missing_data_dir_fails_at_once_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # where tfds would leave its folder
    with pytest.raises(app.UsageError, match="nowhere does not exist.*--download"):
        run_train(tmp_path / "run", "--method=hps", f"--data_dir={tmp_path / 'nowhere'}")
    assert not (tmp_path / "tensorflow_datasets").exists()
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_multi_worker_strategy_needs_tf_config(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(app.UsageError, match="TF_CONFIG"):
        run_train(tmp_path, "--method=hps", "--dataset=synthetic",
                  "--strategy=multi_worker")


# XLA compiles MPPS's sequential step for 40 s: hard sharing shows the flag
# works (test_mixed_precision.py runs every method's step under each policy).
@pytest.mark.parametrize("flags", [("--method=mpps", "--mixed_precision=mixed_bfloat16"),
                                   ("--method=hps", "--jit_compile")])
def test_precision_and_compilation_flags_train(tmp_path, flags):
    try:
        out = run_train(tmp_path, "--export", *flags, "--dataset=synthetic")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert_task_accuracies(read_json(out / "results.json"))
    assert_export(out / "export")  # in float32: TFLite has no bfloat16 kernels


@pytest.mark.parametrize("arguments, message", [
    (["--dataset=synthetic", "--aspp_rates=1,2"], "--aspp_rates is for dense tasks"),
    (["--dataset=synthetic", "--backbone=segnet"], "--backbone=segnet outputs"),
    (["--dataset=fashion_scenes", "--backbone=lenet"], "--backbone=lenet flattens"),
    (["--dataset=fashion_scenes", "--backbone=resnet", "--aspp_rates=0"],
     "--aspp_rates must be positive"),
    (["--dataset=nyuv2"], "--dataset=nyuv2: 'nyuv2' is read from `data_dir`"),
])
def test_dense_flags_that_do_not_fit_the_data_are_refused_before_training(
        tmp_path, arguments, message):
    with pytest.raises(app.UsageError, match=message):
        run_train(tmp_path, "--method=hps", "--limit=8", *arguments)
    assert not (tmp_path / "checkpoint").exists()


def test_hps_trains_dense_tasks_through_train_py(tmp_path):
    out = run_train(tmp_path, "--method=hps", "--dataset=fashion_scenes",
                    "--backbone=resnet", "--aspp_rates=1,2", "--head_channels=8")
    results = read_json(out / "results.json")
    assert {"semantic_miou", "depth_absolute_error", "normal_median_angle"} <= set(results)
    reloaded = keras.saving.load_model(out / "model.keras")
    assert reloaded.heads["semantic"].aspp_rates == (1, 2)


def test_results_are_at_the_selected_epoch_with_the_last_beside_them(tmp_path, monkeypatch):
    args = ("--method=hps", "--dataset=synthetic")
    one = read_json(run_train(tmp_path / "one", *args) / "results.json")
    monkeypatch.setattr(train.Selection, "best", lambda self, epochs: 1)
    two = read_json(run_train(tmp_path / "two", *args, "--epochs=2") / "results.json")
    assert two["epoch"] == 1 and two["last"]["epoch"] == 2
    assert two["selection"] == "val_loss"
    # CPU runs are bit for bit: the selected epoch is what a 1-epoch run ends at.
    for key in ("loss", "task_0_accuracy", "task_1_loss"):
        assert two[key] == one[key] == one["last"][key]
        assert two["last"][key] != two[key]
    reloaded = keras.saving.load_model(tmp_path / "two" / "model.keras")
    first = keras.saving.load_model(tmp_path / "one" / "model.keras")
    for a, b in zip(reloaded.weights, first.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_checkpoint_of_other_flags_is_refused_naming_them(tmp_path):
    run_train(tmp_path, "--method=hps", "--dataset=synthetic")
    with pytest.raises(app.UsageError, match=r"--method: 'hps' there, 'tr' here.*--noresume"):
        run_train(tmp_path, "--method=tr", "--dataset=synthetic")
    run_train(tmp_path, "--method=tr", "--dataset=synthetic", "--noresume")


def test_a_second_run_on_an_output_dir_in_use_is_refused(tmp_path):
    from tf_mtl.checkpoint import exclusive_folder

    with exclusive_folder(str(tmp_path)):
        with pytest.raises(app.UsageError, match="in use by another run"):
            run_train(tmp_path, "--method=hps", "--dataset=synthetic")


def test_bilevel_parts_fit_on_data_held_out_of_the_training_split(tmp_path, monkeypatch):
    from tf_mtl.model import MultiTaskModel

    seen = {}
    fit = MultiTaskModel.fit

    def record(model, x=None, **kwargs):
        seen["train"] = sum(int(b[0].shape[0]) for b in x)
        seen["heldout"] = sum(int(b[0].shape[0]) for b in kwargs["heldout_data"])
        return fit(model, x, **kwargs)

    monkeypatch.setattr(MultiTaskModel, "fit", record)
    run_train(tmp_path, "--method=smtl", "--smtl_bilevel", "--dataset=synthetic",
              "--heldout_fraction=0.25")
    assert seen == {"train": 48, "heldout": 16}  # of the 64 training examples


def test_an_unknown_selection_criterion_is_refused_before_training(tmp_path, monkeypatch):
    from tf_mtl.model import MultiTaskModel

    monkeypatch.setattr(MultiTaskModel, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(app.UsageError, match="--selection: Unknown selection criterion "
                                             "'val_f_score'.*val_accuracy"):
        run_train(tmp_path, "--method=hps", "--dataset=synthetic", "--selection=val_f_score")
