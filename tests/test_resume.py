"""A resumed run equals an uninterrupted one: data order, method state, train.py."""

import collections
import functools
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import backbones, data, methods, weighting
from tf_mtl.callbacks import ExclusiveCapacityScheduler, MaximumRoaming, ParameterPassing
from tf_mtl.layers.passing import passed_layers
from tf_mtl.tasks import classification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _epoch_batches(dataset, epoch):
    """The image batches `dataset` yields in `epoch`."""
    data.order_callbacks(dataset)[0].on_epoch_begin(epoch)
    return [tf.nest.flatten(batch)[0].numpy() for batch in dataset]


def _same(batches, others):
    return len(batches) == len(others) and all(
        np.array_equal(a, b) for a, b in zip(batches, others))


def _train_and_task_view(name, seed=3):
    """The training split and STL's view of its first task (a `map`, and a
    `filter` of unknown length on data not jointly labelled)."""
    ds = data.load(name, batch_size=16, seed=seed)
    return ds.train, methods.task_view(ds.train, 0, "task_0", ds.jointly_labelled)


@pytest.mark.parametrize("name", ["synthetic", "synthetic_groups"])
def test_training_order_is_a_function_of_seed_and_epoch(name):
    for dataset, fresh in zip(_train_and_task_view(name), _train_and_task_view(name)):
        epoch1 = _epoch_batches(dataset, 1)
        for _ in range(3):  # iterators made before change nothing
            next(iter(dataset))
        assert _same(_epoch_batches(dataset, 1), epoch1)
        # A fresh dataset object (a restarted process) sees the same order ...
        assert _same(_epoch_batches(fresh, 1), epoch1)
        # ... and other epochs see other orders of the same examples.
        epoch2 = _epoch_batches(dataset, 2)
        assert not _same(epoch2, epoch1)
        np.testing.assert_array_equal(np.sort(np.concatenate(epoch2), axis=None),
                                      np.sort(np.concatenate(epoch1), axis=None))


class _Recorder(keras.Model):
    """Keeps the images of every batch `fit` trains on."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def train_step(self, batch):
        images = tf.nest.flatten(batch)[0]
        self.seen.append(images.numpy())
        return {"rows": tf.shape(images)[0]}


@pytest.mark.parametrize("name", ["synthetic", "synthetic_groups"])
def test_fit_trains_epoch_e_on_the_order_of_epoch_e(name):
    # Keras makes the iterator of an epoch before it begins when it knows
    # the number of steps, when the epoch begins when it does not (filter).
    for dataset, fresh in zip(_train_and_task_view(name), _train_and_task_view(name)):
        recorder = _Recorder()
        recorder.compile(run_eagerly=True)
        recorder.fit(dataset, epochs=3, verbose=0, callbacks=data.order_callbacks(dataset))
        expected = [b for epoch in range(3) for b in _epoch_batches(fresh, epoch)]
        assert _same(recorder.seen, expected)


def test_epoch_order_moves_on_after_the_last_batch_of_an_epoch():
    order = data.order_callbacks(data.load("synthetic", batch_size=32).train)[0]
    order.set_params({"steps": 8})
    order.on_epoch_begin(1)
    order.on_train_batch_end(6)
    assert int(order.epoch_variable.numpy()) == 1
    order.on_train_batch_end(7)  # the iterator of epoch 2 may be made now
    assert int(order.epoch_variable.numpy()) == 2


def test_derived_datasets_follow_their_source_epoch():
    train = data.load("synthetic", batch_size=16, seed=3).train
    view = methods.task_view(train, 0, "task_0", True)
    assert data.order_callbacks(view)[0].epoch_variable is \
        data.order_callbacks(train)[0].epoch_variable
    assert data.order_callbacks(data.load("synthetic").validation) == []
    assert data.order_callbacks([1, 2]) == []


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def _run(method, backup_dir, callbacks=(), epochs=2):
    keras.utils.set_random_seed(0)
    ds = data.load("synthetic", batch_size=32, seed=1)
    tasks = [classification(n, k) for n, k in ds.task_classes.items()]
    method_callbacks, objective = [], {}
    if method == "mpps_dwa_pcgrad":  # DWA's loss history, PCGrad's draws
        method, objective = "mpps", {"weighting": "dwa", "aggregator": "pcgrad"}
    if method == "mpps":
        model = methods.progressive_sharing(backbones.lenet(0.25), tasks, (28, 28, 1),
                                            num_masked=2, seed=2)
        method_callbacks.append(ExclusiveCapacityScheduler(epochs, "linear"))
    elif method == "mr":  # the partitions, visited sets and update counts
        model = methods.maximum_roaming(backbones.lenet(0.25), tasks, (28, 28, 1), seed=2)
        method_callbacks.append(MaximumRoaming(interval=0.25))
    elif method == "ppnet":  # 6-step phases: the kill and the resume fall in adjacent learning
        model = methods.parameter_passing(functools.partial(backbones.lenet, 0.25), tasks,
                                          (28, 28, 1), passing="channel")
        method_callbacks.append(ParameterPassing(period=6, unit="steps"))
    elif method == "hps_auto_lambda":  # lambda and its Adam
        model = methods.hard_sharing(backbones.lenet(0.25), tasks, (28, 28, 1))
        objective = {"weighting": weighting.AutoLambda(learning_rate=1e-2)}
    else:  # L-SMTL: the gates' Gumbel draws; bi-level: the gates' own Adam
        bilevel = method == "lsmtl_bilevel"
        model = methods.safe_sharing(functools.partial(backbones.lenet, 0.25), tasks,
                                     (28, 28, 1), lite=True, seed=2, bilevel=bilevel)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), **objective)
    heldout = {"heldout_data": ds.validation} if model.takes_heldout_data() else {}
    model.fit(ds.train, epochs=epochs, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch"),
        *method_callbacks, *callbacks], **heldout)
    return model, method_callbacks


# The kill falls in epoch 1, after the first checkpoint; a third epoch where
# the state checked needs one after the resumed epoch (DWA's weights, PPNet's
# second adjacent phase).
EPOCHS = {"mpps_dwa_pcgrad": 3, "ppnet": 3}


@pytest.mark.parametrize("method", ["mpps", "mpps_dwa_pcgrad", "lsmtl", "lsmtl_bilevel",
                                    "mr", "ppnet", "hps_auto_lambda"])
def test_backup_and_restore_in_the_middle_of_an_epoch_equals_uninterrupted(method,
                                                                          tmp_path):
    epochs = EPOCHS.get(method, 2)
    reference, ref_callbacks = _run(method, str(tmp_path / "a"), epochs=epochs)
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(method, str(tmp_path / "b"), [_Interrupt(epoch=1, batch=3)], epochs=epochs)
    resumed, callbacks = _run(method, str(tmp_path / "b"), epochs=epochs)  # a fresh model
    # Bit for bit (CPU): weights, Phi, targets, draw counts, baselines, gates.
    for a, b in zip(reference.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables,
                    strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    if method == "lsmtl_bilevel":
        for a, b in zip(reference.gate_optimizer.variables,
                        resumed.gate_optimizer.variables, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    if method == "hps_auto_lambda":  # no draw
        for a, b in zip(reference.weighting.meta_optimizer.variables,
                        resumed.weighting.meta_optimizer.variables, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
        return
    if method == "mr":  # an update every 2 of the 8 steps of each epoch
        assert [int(p.updates.numpy()) for p in resumed.conditioned_layers] == [
            min(4 * epochs, p.plan_length()) for p in resumed.conditioned_layers]
        return
    if method == "ppnet":  # the phase resumed in was trained: its affinity is recorded
        assert [h["epoch"] for h in callbacks[0].history] == [1, 2]
        for a, b in zip(passed_layers(reference), passed_layers(resumed), strict=True):
            assert int(a._passing_optimizer.iterations) == int(b._passing_optimizer.iterations)
        return
    if method == "mpps_dwa_pcgrad":  # epoch 2 weighted by the losses of epochs 0 and 1
        assert int(resumed.aggregator.draws.numpy()) == 3 * 8
        assert int(resumed.weighting.epochs.numpy()) == 2
        assert not np.allclose(resumed.weighting.task_weights().numpy(), 1.0)
        return
    random_layer = next(l for l in resumed.conditioned_layers if hasattr(l, "draws"))
    # Every step's draws, once: MPPS's sequential routing draws in each of
    # the 2 tasks' passes.
    per_step = 2 if method == "mpps" else 1
    assert int(random_layer.draws.numpy()) == epochs * 8 * per_step
    if method == "mpps":
        assert callbacks[0].history[-1]["ec"] == pytest.approx(
            ref_callbacks[0].history[-1]["ec"])


TRAIN = [sys.executable, os.path.join(ROOT, "train.py"), "--method=mpps",
         "--dataset=synthetic", "--width=0.5", "--epochs=2", "--batch_size=4",
         "--mpps_layers=2", "--mpps_frozen_start=0", "--mpps_frozen_end=0",
         "--verbose=0", "--noexport"]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def _epochs_saved(output_dir):
    """The epochs of the checkpoint train.py has written so far."""
    folder = os.path.join(output_dir, "checkpoint")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return max((int(n[6:]) for n in names if re.fullmatch(r"epoch_\d+", n)), default=0)


def _scalars(log_dir):
    """`{(split, tag): [(step, value), ...]}` of TensorBoard logs, in the
    order TensorBoard reads them."""
    found = collections.defaultdict(list)
    for split in ("train", "validation"):
        for path in sorted(glob.glob(os.path.join(log_dir, split, "events.*"))):
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    found[split, value.tag].append(
                        (event.step, float(tf.make_ndarray(value.tensor))))
    return dict(found)


@pytest.mark.slow
def test_train_py_killed_in_an_epoch_and_rerun_equals_an_uninterrupted_run(tmp_path):
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    subprocess.run(TRAIN + [f"--output_dir={reference}"], check=True, env=ENV, cwd=ROOT,
                   capture_output=True)
    process = subprocess.Popen(TRAIN + [f"--output_dir={killed}"], env=ENV, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _epochs_saved(killed) < 1:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # into the second epoch (64 steps)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(killed, "results.json"))  # killed in training
    rerun = subprocess.run(TRAIN + [f"--output_dir={killed}"], check=True, env=ENV,
                           cwd=ROOT, capture_output=True, text=True)
    assert "Resuming at epoch" in rerun.stdout

    # Weights, Phi, targets, draw counts, baselines and optimizer state: bit for bit.
    done = [keras.saving.load_model(os.path.join(d, "model.keras"))
            for d in (reference, killed)]
    for a, b in zip(done[0].weights, done[1].weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(done[0].optimizer.variables, done[1].optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    read = lambda d, name: json.load(open(os.path.join(d, name)))
    history = [read(d, "history.json") for d in (reference, killed)]
    assert len(history[1]["history"]["loss"]) == 2 and len(history[1]["mpps"]) == 2
    assert history[1] == history[0]  # every epoch's logs, the MPPS schedule and Phi
    assert read(killed, "results.json") == read(reference, "results.json")
    # TensorBoard: each epoch once, as in the uninterrupted run.
    logs = [_scalars(os.path.join(d, "logs")) for d in (reference, killed)]
    assert [step for step, _ in logs[0]["train", "epoch_loss"]] == [0, 1]
    assert logs[1] == logs[0]
