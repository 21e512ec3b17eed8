"""A resumed run equals an uninterrupted one: data order, method state, train.py."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import backbones, data, methods
from tf_mtl.callbacks import ExclusiveCapacityScheduler
from tf_mtl.tasks import classification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_labels(dataset):
    batch = next(iter(dataset))
    return tf.nest.flatten(batch[1:])[0].numpy()


def _epoch_batches(dataset, epoch):
    order = data.order_callbacks(dataset)[0]
    order.on_epoch_begin(epoch)
    return [tf.nest.flatten(b)[0].numpy() for b in dataset]


def test_training_order_is_a_function_of_seed_and_epoch():
    train = data.load("synthetic", batch_size=16, seed=3).train
    epoch1 = _epoch_batches(train, 1)
    for _ in range(3):  # iterators made before change nothing
        next(iter(train))
    np.testing.assert_array_equal(_epoch_batches(train, 1), epoch1)
    # A fresh dataset object (a restarted process) sees the same order ...
    again = data.load("synthetic", batch_size=16, seed=3).train
    np.testing.assert_array_equal(_epoch_batches(again, 1), epoch1)
    # ... and other epochs see other orders of the same examples.
    epoch2 = _epoch_batches(train, 2)
    assert not np.array_equal(epoch2, epoch1)
    np.testing.assert_allclose(np.sort(np.concatenate(epoch2).ravel()),
                               np.sort(np.concatenate(epoch1).ravel()))


def test_derived_datasets_follow_their_source_epoch():
    train = data.load("synthetic", batch_size=16, seed=3).train
    view = methods.task_view(train, 0, "task_0", True)
    assert len(data.order_callbacks(view)) == 1
    assert data.order_callbacks(train.map(lambda x, y: (x, y)))[0].epoch_variable is \
        data.order_callbacks(train)[0].epoch_variable
    assert data.order_callbacks(data.load("synthetic").validation) == []


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


def _run(method, backup_dir, callbacks=(), epochs=3):
    keras.utils.set_random_seed(0)
    ds = data.load("synthetic", batch_size=32, seed=1)
    tasks = [classification(n, k) for n, k in ds.task_classes.items()]
    method_callbacks = []
    if method == "mpps":
        model = methods.progressive_sharing(backbones.lenet(0.25), tasks, (28, 28, 1),
                                            num_masked=2, seed=2)
        method_callbacks.append(ExclusiveCapacityScheduler(epochs, "linear"))
    else:  # L-SMTL: the gates' Gumbel draws
        model = methods.safe_sharing(functools.partial(backbones.lenet, 0.25), tasks,
                                     (28, 28, 1), lite=True, seed=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(ds.train, epochs=epochs, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(backup_dir), *method_callbacks, *callbacks])
    return model, method_callbacks


@pytest.mark.parametrize("method", ["mpps", "lsmtl"])
def test_backup_and_restore_in_the_middle_of_an_epoch_equals_uninterrupted(method,
                                                                          tmp_path):
    reference, ref_callbacks = _run(method, str(tmp_path / "a"))
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(method, str(tmp_path / "b"), [_Interrupt(epoch=1, batch=3)])
    resumed, callbacks = _run(method, str(tmp_path / "b"))
    for a, b in zip(reference.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=a.path)
    for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables,
                    strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=a.path)
    random_layer = next(l for l in resumed.conditioned_layers if hasattr(l, "draws"))
    assert int(random_layer.draws.numpy()) == 3 * 8  # every step's draw, once
    if method == "mpps":
        assert callbacks[0].history[-1]["ec"] == pytest.approx(
            ref_callbacks[0].history[-1]["ec"])


TRAIN = [sys.executable, os.path.join(ROOT, "train.py"), "--method=mpps",
         "--dataset=synthetic", "--width=0.5", "--epochs=3", "--batch_size=4",
         "--mpps_layers=2", "--mpps_frozen_start=0", "--mpps_frozen_end=0",
         "--verbose=0"]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def _epochs_saved(output_dir):
    try:
        with open(os.path.join(output_dir, "checkpoint", "training_metadata.json")) as f:
            return json.load(f)["epoch"]
    except (OSError, ValueError):  # not there yet, or being written
        return 0


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

    done = [keras.saving.load_model(os.path.join(d, "model.keras"))
            for d in (reference, killed)]
    for a, b in zip(done[0].weights, done[1].weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=a.path)
    for a, b in zip(done[0].optimizer.variables, done[1].optimizer.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    read = lambda d, name: json.load(open(os.path.join(d, name)))
    history = [read(d, "history.json") for d in (reference, killed)]
    assert len(history[1]["history"]["loss"]) == 3 and len(history[1]["mpps"]) == 3
    np.testing.assert_allclose(history[1]["history"]["loss"], history[0]["history"]["loss"],
                               rtol=1e-5)
    assert history[1]["mpps"][-1]["ec"] == pytest.approx(history[0]["mpps"][-1]["ec"])
    results = [read(d, "results.json") for d in (reference, killed)]
    assert results[1] == pytest.approx(results[0], rel=1e-5)

    # A finished run rerun trains nothing.
    again = subprocess.run(TRAIN + [f"--output_dir={killed}"], check=True, env=ENV,
                           cwd=ROOT, capture_output=True, text=True)
    assert "Resuming at epoch" not in again.stdout
    assert read(killed, "results.json") == pytest.approx(results[0], rel=1e-5)
