"""Tests of `tf_mtl.model.MultiTaskModel`: its objective and task losses,
task frequencies N_t/N, fit/evaluate logs, tf.distribute, duplicate task names
and a regression task. How it routes a batch: test_routing.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mtl
from tf_mtl import backbones, data, methods
from tf_mtl.data import synthetic
from tf_mtl.tasks import Task, classification

from helpers import INPUT_SHAPE, NAMES, dense_backbone, images, numpy_dataset, two_tasks


# --- construction ------------------------------------------------------------


def test_rejects_duplicate_task_names():
    with pytest.raises(ValueError, match=r"distinct tasks.*\['a', 'a'\]"):
        tf_mtl.MultiTaskModel(
            dense_backbone(), [classification("a", 2)] * 2, INPUT_SHAPE
        )


# --- jointly labelled data -------------------------------------------------


def test_joint_fit_logs_every_task_and_validation():
    splits = data.load("synthetic", batch_size=32, limit=64)
    model = methods.hard_sharing(backbones.lenet(0.25), two_tasks(), INPUT_SHAPE)
    model.compile(optimizer="adam")

    history = model.fit(
        splits.train, validation_data=splits.validation, epochs=1, verbose=0
    ).history

    keys = {"loss", "task_0_loss", "task_0_accuracy", "task_1_loss",
            "task_1_accuracy"}
    assert set(history) == keys | {f"val_{key}" for key in keys}
    assert all(len(values) == 1 and np.isfinite(values[0])
               for values in history.values())


def test_joint_fit_decreases_the_loss():
    splits = data.load("synthetic", batch_size=64)
    model = methods.hard_sharing(backbones.lenet(0.25), two_tasks(), INPUT_SHAPE)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))

    losses = model.fit(splits.train, epochs=4, verbose=0).history["loss"]

    assert losses == sorted(losses, reverse=True), losses
    assert losses[-1] < 0.5 * losses[0], losses


def test_joint_evaluate_loss_is_the_sum_of_task_losses():
    splits = data.load("synthetic", batch_size=24, limit=64)
    model = methods.hard_sharing(backbones.lenet(0.25), two_tasks(), INPUT_SHAPE)
    model.compile(optimizer="adam")

    logs = model.evaluate(splits.test, return_dict=True, verbose=0)

    assert logs["task_0_loss"] > 0 and logs["task_1_loss"] > 0
    np.testing.assert_allclose(
        logs["loss"], logs["task_0_loss"] + logs["task_1_loss"], rtol=1e-5
    )


def test_task_loss_is_the_mean_cross_entropy_of_its_head():
    x, labels = synthetic.make_synthetic(16)
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16)
    model = methods.hard_sharing(dense_backbone(), two_tasks(), INPUT_SHAPE)
    model.compile(optimizer="sgd")

    logs = model.evaluate(dataset, return_dict=True, verbose=0)

    outputs = model(x)
    for name in NAMES:
        expected = keras.losses.sparse_categorical_crossentropy(
            labels[name], outputs[name], from_logits=True
        ).numpy().mean()
        np.testing.assert_allclose(logs[f"{name}_loss"], expected, rtol=1e-5)


def test_loss_weight_scales_its_task_term():
    splits = data.load("synthetic", batch_size=64, limit=64)
    tasks = [classification("task_0", 3, loss_weight=3.0),
             classification("task_1", 3)]
    model = methods.hard_sharing(backbones.lenet(0.25), tasks, INPUT_SHAPE)
    model.compile(optimizer="adam")

    logs = model.evaluate(splits.test, return_dict=True, verbose=0)

    np.testing.assert_allclose(
        logs["loss"], 3.0 * logs["task_0_loss"] + logs["task_1_loss"],
        rtol=1e-5,
    )


# --- non-jointly labelled data ---------------------------------------------


def test_non_joint_fit_counts_task_frequencies_exactly():
    splits = data.load("synthetic_groups", batch_size=64)
    model = methods.hard_sharing(
        backbones.lenet(0.25), two_tasks(), INPUT_SHAPE, jointly_labelled=False
    )
    model.compile(optimizer="adam")
    counts = data.task_counts(splits.train, 2)

    model.fit(splits.train, epochs=1, verbose=0)

    assert counts.sum() == data.SYNTHETIC_SPLIT_SIZES["train"]
    assert counts[0] != counts[1]  # Equal counts would hide a swap.
    np.testing.assert_allclose(
        model.task_frequencies.numpy(), counts / counts.sum(), rtol=1e-6
    )


def test_non_joint_fit_keeps_given_task_frequencies():
    splits = data.load("synthetic_groups", batch_size=64, limit=64)
    model = tf_mtl.MultiTaskModel(
        backbones.lenet(0.25), two_tasks(), INPUT_SHAPE,
        jointly_labelled=False, task_frequencies=[1, 3],
    )
    model.compile(optimizer="adam")

    model.fit(splits.train, epochs=1, verbose=0)

    np.testing.assert_allclose(model.task_frequencies.numpy(), [0.25, 0.75])


def test_non_joint_evaluate_loss_weights_task_losses_by_frequency():
    splits = data.load("synthetic_groups", batch_size=512)
    model = methods.hard_sharing(
        backbones.lenet(0.25), two_tasks(), INPUT_SHAPE, jointly_labelled=False
    )
    model.compile(optimizer="adam")
    model.fit(splits.train, epochs=1, verbose=0)
    frequencies = data.task_counts(splits.train, 2) / 256

    logs = model.evaluate(splits.test, return_dict=True, verbose=0)

    expected = (frequencies[0] * logs["task_0_loss"]
                + frequencies[1] * logs["task_1_loss"])
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)
    # Not the plain mean over examples: the weights are the training shares.
    test_counts = data.task_counts(splits.test, 2)
    assert not np.allclose(frequencies, test_counts / test_counts.sum())


def test_non_joint_task_loss_covers_only_its_examples():
    x, task_ids, y = synthetic.make_synthetic_groups(32)
    dataset = tf.data.Dataset.from_tensor_slices((x, task_ids, y)).batch(32)
    model = methods.hard_sharing(
        dense_backbone(), two_tasks(), INPUT_SHAPE, jointly_labelled=False
    )
    model.compile(optimizer="sgd")

    model.fit(dataset, epochs=1, verbose=0)
    logs = model.evaluate(dataset, return_dict=True, verbose=0)

    outputs = model(x)
    for task, name in enumerate(NAMES):
        rows = task_ids == task
        losses = keras.losses.sparse_categorical_crossentropy(
            y[rows], outputs[name][rows], from_logits=True
        )
        accuracy = np.mean(np.argmax(outputs[name][rows], -1) == y[rows])
        np.testing.assert_allclose(logs[f"{name}_loss"], np.mean(losses), rtol=1e-5)
        np.testing.assert_allclose(logs[f"{name}_accuracy"], accuracy, rtol=1e-6)


def test_non_joint_evaluate_before_fit_needs_task_frequencies():
    splits = data.load("synthetic_groups", batch_size=512)
    model = methods.hard_sharing(
        backbones.lenet(0.25), two_tasks(), INPUT_SHAPE, jointly_labelled=False
    )
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="task_frequencies"):
        model.evaluate(splits.test, verbose=0)
    counts = data.task_counts(splits.test, 2)
    model.set_task_frequencies(counts)
    logs = model.evaluate(splits.test, return_dict=True, verbose=0)
    expected = sum(counts[t] / counts.sum() * logs[f"{name}_loss"]
                   for t, name in enumerate(NAMES))
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)


# --- tf.distribute -----------------------------------------------------------


def fit_single_and_mirrored(strategy, jointly_labelled, dataset, epochs=2):
    """Fits one model on one device and a copy under MirroredStrategy on the
    two logical CPUs of conftest, from the same weights, with plain SGD."""
    assert strategy.num_replicas_in_sync == 2
    # Dense backbone, no BatchNormalization: under MirroredStrategy each
    # replica normalises with the statistics of its half batch, which differ
    # from those of the whole batch on one device.
    single = methods.hard_sharing(
        dense_backbone(), two_tasks(), INPUT_SHAPE, jointly_labelled
    )
    with strategy.scope():
        distributed = methods.hard_sharing(
            dense_backbone(), two_tasks(), INPUT_SHAPE, jointly_labelled
        )
        distributed.set_weights(single.get_weights())
        distributed.compile(optimizer=keras.optimizers.SGD(0.1))
    single.compile(optimizer=keras.optimizers.SGD(0.1))
    single_history = single.fit(dataset, epochs=epochs, verbose=0).history
    distributed_history = distributed.fit(dataset, epochs=epochs, verbose=0).history
    return single, distributed, single_history, distributed_history


@pytest.mark.parametrize("jointly_labelled", [True, False])
def test_mirrored_strategy_matches_one_device(mirrored, jointly_labelled):
    dataset = numpy_dataset(jointly_labelled, 128, 32)

    single, distributed, single_history, mirrored_history = fit_single_and_mirrored(
        mirrored, jointly_labelled, dataset
    )

    assert set(mirrored_history) == set(single_history)
    for key, values in single_history.items():
        np.testing.assert_allclose(mirrored_history[key], values, rtol=1e-4,
                                   err_msg=key)
    assert single_history["loss"][1] != single_history["loss"][0]  # It trained.
    for mirrored_weight, weight in zip(distributed.get_weights(), single.get_weights()):
        np.testing.assert_allclose(mirrored_weight, weight, rtol=1e-4, atol=1e-6)
    if not jointly_labelled:
        np.testing.assert_allclose(
            distributed.task_frequencies.numpy(), single.task_frequencies.numpy()
        )


@pytest.mark.parametrize("jointly_labelled", [True, False])
@pytest.mark.parametrize("examples, batch", [
    (65, 64),  # the last batch: 1 example
    (14, 7),  # every batch odd: 4 rows on one replica, 3 on the other
])
def test_mirrored_matches_one_device_with_uneven_replica_batches(
        mirrored, jointly_labelled, examples, batch):
    dataset = numpy_dataset(jointly_labelled, examples, batch)

    single, distributed, single_history, mirrored_history = fit_single_and_mirrored(
        mirrored, jointly_labelled, dataset, epochs=1
    )

    for mirrored_weight, weight in zip(distributed.get_weights(), single.get_weights()):
        np.testing.assert_allclose(mirrored_weight, weight, rtol=1e-4, atol=1e-6)
    for name in NAMES:
        np.testing.assert_allclose(mirrored_history[f"{name}_loss"],
                                   single_history[f"{name}_loss"], rtol=1e-4)
    np.testing.assert_allclose(mirrored_history["loss"], single_history["loss"],
                               rtol=1e-4)


# --- a regression task ------------------------------------------------------


def test_regression_task_with_custom_loss_trains():
    x = images(32)
    y = x.mean(axis=(1, 2, 3))
    dataset = tf.data.Dataset.from_tensor_slices((x, {"level": y})).batch(32)
    task = Task(
        "level", head=lambda: keras.layers.Dense(1),
        loss=lambda y_true, y_pred: tf.square(y_true - y_pred[:, 0]),
    )
    model = tf_mtl.MultiTaskModel(dense_backbone(), [task], INPUT_SHAPE)
    model.compile(optimizer=keras.optimizers.SGD(0.01))

    losses = model.fit(dataset, epochs=3, verbose=0).history["level_loss"]

    expected = np.mean((y - model(x)["level"].numpy()[:, 0]) ** 2)
    np.testing.assert_allclose(
        model.evaluate(dataset, return_dict=True, verbose=0)["level_loss"],
        expected, rtol=1e-5,
    )
    assert losses[-1] < losses[0]

