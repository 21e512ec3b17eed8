"""A resumed run equals an uninterrupted one: data order, method state, train.py."""

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


def _mpps_run(backup_dir, callbacks=(), epochs=3):
    keras.utils.set_random_seed(0)
    ds = data.load("synthetic", batch_size=32, seed=1)
    tasks = [classification(n, k) for n, k in ds.task_classes.items()]
    model = methods.progressive_sharing(backbones.lenet(0.25), tasks, (28, 28, 1),
                                        num_masked=2, seed=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    scheduler = ExclusiveCapacityScheduler(epochs, "linear")
    model.fit(ds.train, epochs=epochs, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(backup_dir), scheduler, *callbacks])
    return model, scheduler


def test_backup_and_restore_in_the_middle_of_an_epoch_equals_uninterrupted(tmp_path):
    reference, ref_scheduler = _mpps_run(str(tmp_path / "a"))
    with pytest.raises(RuntimeError, match="interrupted"):
        _mpps_run(str(tmp_path / "b"), [_Interrupt(epoch=1, batch=3)])
    resumed, scheduler = _mpps_run(str(tmp_path / "b"))
    for a, b in zip(reference.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=a.path)
    for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables,
                    strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=a.path)
    mask = resumed.conditioned_layers[0]
    assert int(mask.draws.numpy()) == 3 * 8  # every step's draw, once
    assert scheduler.history[-1]["ec"] == pytest.approx(ref_scheduler.history[-1]["ec"])
