"""Tests of `tf_mtl.model.MultiTaskModel`: routing, losses, logs, tf.distribute."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mtl
from tf_mtl import backbones, data, methods
from tf_mtl.data import synthetic
from tf_mtl.layers import ProgressiveMask, TaskConditioned, objective_scope
from tf_mtl.layers.base import tile_tasks
from tf_mtl.tasks import Task, classification

INPUT_SHAPE = (28, 28, 1)
NAMES = ("task_0", "task_1")


def two_tasks(**kwargs):
    return [classification(name, 3, **kwargs) for name in NAMES]


class TaskBias(TaskConditioned):
    """Adds a learned bias per task, gathered by task id, in every mode."""

    def __init__(self, num_tasks, **kwargs):
        super().__init__(**kwargs)
        self.num_tasks = num_tasks

    def build(self, x_shape, task_ids_shape=None):
        self.bias = self.add_weight(
            shape=(self.num_tasks, x_shape[-1]), initializer="random_normal",
            name="bias",
        )

    def call(self, x, task_ids, training=None):
        bias = tf.gather(self.bias, task_ids)
        return x + tf.reshape(bias, [-1] + [1] * (len(x.shape) - 2) + [x.shape[-1]])


class RowCounter(keras.layers.Layer):
    """The identity; records the number of rows of every eager call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = []

    def call(self, x):
        self.rows.append(x.shape[0])
        return x


def images(batch, seed=0):
    return np.random.default_rng(seed).random((batch,) + INPUT_SHAPE, "float32")


def dense_backbone():
    # No BatchNormalization: results do not depend on how a batch is split.
    return [keras.layers.Flatten(), backbones.DenseUnit(16)]


def numpy_dataset(jointly_labelled, num_examples, batch_size):
    """Synthetic data in a fixed order (no shuffle), batched."""
    if jointly_labelled:
        arrays = synthetic.make_synthetic(num_examples)
    else:
        arrays = synthetic.make_synthetic_groups(num_examples)
    return tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size)


# --- routing ---------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_hard_sharing_never_tiles(training):
    counter = RowCounter()
    model = methods.hard_sharing(
        [keras.layers.Flatten(), counter, backbones.DenseUnit(4)],
        two_tasks(), INPUT_SHAPE,
    )
    counter.rows.clear()

    features, task_ids = model.features(images(3), training=training)

    assert task_ids is None
    assert tuple(features.shape) == (3, 4)
    assert counter.rows == [3]
    outputs = model(images(3))
    for name in NAMES:
        np.testing.assert_allclose(
            outputs[name], model.heads[name](model.features(images(3))[0]),
            atol=1e-6,
        )


@pytest.mark.parametrize("training", [False, True])
def test_conditioned_layer_tiles_features_once_per_task(training):
    before, after = RowCounter(), RowCounter()
    dense, bias = keras.layers.Dense(4), TaskBias(2)
    model = tf_mtl.MultiTaskModel(
        [keras.layers.Flatten(), before, dense, bias, after],
        two_tasks(), INPUT_SHAPE,
    )
    before.rows.clear()
    after.rows.clear()

    features, task_ids = model.features(images(3), training=training)

    assert tuple(features.shape) == (6, 4)
    np.testing.assert_array_equal(task_ids, [0, 0, 0, 1, 1, 1])
    assert before.rows == [3]  # The stem ran once, on the untiled batch.
    assert after.rows == [6]
    stem = dense(images(3).reshape(3, -1)).numpy()
    bias_values = bias.bias.numpy()
    for task in range(2):
        np.testing.assert_allclose(
            features[3 * task:3 * (task + 1)], stem + bias_values[task],
            atol=1e-6,
        )


def test_conditioned_outputs_are_each_heads_on_its_tasks_rows():
    dense, bias = keras.layers.Dense(4), TaskBias(2)
    model = tf_mtl.MultiTaskModel(
        [keras.layers.Flatten(), dense, bias], two_tasks(), INPUT_SHAPE
    )
    x = images(5)

    outputs = model(x)

    stem = x.reshape(5, -1) @ dense.kernel.numpy() + dense.bias.numpy()
    for task, name in enumerate(NAMES):
        kernel, head_bias = (w.numpy() for w in model.heads[name].weights)
        expected = (stem + bias.bias.numpy()[task]) @ kernel + head_bias
        assert outputs[name].shape == (5, 3)
        np.testing.assert_allclose(outputs[name], expected, atol=1e-5)


def test_given_task_ids_are_used_without_tiling():
    dense, bias = keras.layers.Dense(4), TaskBias(2)
    model = tf_mtl.MultiTaskModel(
        [keras.layers.Flatten(), dense, bias], two_tasks(), INPUT_SHAPE,
        jointly_labelled=False,
    )
    x, ids = images(3), tf.constant([1, 0, 1])

    features, task_ids = model.features(x, ids)

    np.testing.assert_array_equal(task_ids, [1, 0, 1])
    stem = dense(x.reshape(3, -1)).numpy()
    np.testing.assert_allclose(
        features, stem + bias.bias.numpy()[[1, 0, 1]], atol=1e-6
    )


def test_conditioned_site_of_a_block_tiles_before_the_block():
    counter, unit = RowCounter(), backbones.DenseUnit(4)
    unit.condition(0, TaskBias(2))
    model = tf_mtl.MultiTaskModel(
        [keras.layers.Flatten(), counter, unit], two_tasks(), INPUT_SHAPE
    )
    counter.rows.clear()

    features, task_ids = model.features(images(2))

    assert counter.rows == [2]
    assert tuple(features.shape) == (4, 4)
    np.testing.assert_array_equal(task_ids, [0, 0, 1, 1])
    assert model.conditioned_layers == [unit.conditioned["0"]]


def test_mask_identity_at_inference_routes_only_in_training():
    model = methods.progressive_sharing(
        [keras.layers.Flatten(), backbones.DenseUnit(8)], two_tasks(),
        INPUT_SHAPE,
    )

    _, inference_ids = model.features(images(3), training=False)
    with objective_scope():
        features, training_ids = model.features(images(3), training=True)

    assert inference_ids is None
    assert isinstance(model.conditioned_layers[0], ProgressiveMask)
    assert tuple(features.shape) == (6, 8)
    np.testing.assert_array_equal(training_ids, [0, 0, 0, 1, 1, 1])


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


# --- single-task learning --------------------------------------------------


def test_task_view_of_jointly_labelled_data_keeps_one_task():
    x, labels = synthetic.make_synthetic(40)
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16)

    view = methods.task_view(dataset, 1, "task_1", jointly_labelled=True)

    batches = list(view)
    assert set(view.element_spec[1]) == {"task_1"}
    np.testing.assert_array_equal(
        np.concatenate([b[1]["task_1"] for b in batches]), labels["task_1"]
    )
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)


@pytest.mark.parametrize("task", [0, 1])
def test_task_view_of_non_joint_data_keeps_that_tasks_examples(task):
    x, task_ids, y = synthetic.make_synthetic_groups(40)
    dataset = tf.data.Dataset.from_tensor_slices((x, task_ids, y)).batch(8)
    name = NAMES[task]

    view = methods.task_view(dataset, task, name, jointly_labelled=False)

    batches = list(view)
    assert all(len(b[0]) > 0 for b in batches)
    labels = np.concatenate([b[1][name] for b in batches])
    assert len(labels) == data.task_counts(dataset, 2)[task]
    np.testing.assert_array_equal(labels, y[task_ids == task])
    np.testing.assert_array_equal(
        np.concatenate([b[0] for b in batches]), x[task_ids == task]
    )


@pytest.mark.parametrize("dataset", ["synthetic", "synthetic_groups"])
def test_single_task_model_fits_a_task_view(dataset):
    splits = data.load(dataset, batch_size=32, limit=64)
    task = classification("task_1", 3)
    model = methods.single_task(backbones.lenet(0.25), task, INPUT_SHAPE)
    model.compile(optimizer="adam")
    view = methods.task_view(splits.train, 1, "task_1", splits.jointly_labelled)

    history = model.fit(view, epochs=1, verbose=0).history

    assert model.task_names == ("task_1",)
    assert set(history) == {"loss", "task_1_loss", "task_1_accuracy"}
    np.testing.assert_allclose(history["loss"], history["task_1_loss"], rtol=1e-5)
    assert np.isfinite(history["loss"][0])


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


# --- sequential routing ------------------------------------------------------


def test_sequential_routing_trains_like_tiled_routing():
    def build(routing):
        backbone = [keras.layers.Flatten(), backbones.DenseUnit(16), TaskBias(2),
                    backbones.DenseUnit(8)]
        return tf_mtl.MultiTaskModel(backbone, two_tasks(), INPUT_SHAPE, routing=routing)

    tiled, sequential = build("tiled"), build("sequential")
    # TaskBias builds lazily at its first training call: build both first.
    dataset = numpy_dataset(True, 64, 32)
    for model in (tiled, sequential):
        model.features(images(2), training=True)
    initial = tiled.get_weights()
    sequential.set_weights(initial)
    histories = []
    for model in (tiled, sequential):
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        histories.append(model.fit(dataset, epochs=2, verbose=0).history)
    for key, values in histories[0].items():
        np.testing.assert_allclose(histories[1][key], values, rtol=1e-5, err_msg=key)
    for a, b in zip(tiled.get_weights(), sequential.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    trained = [not np.array_equal(a, b) for a, b in zip(tiled.get_weights(), initial)]
    assert sum(trained) == len(tiled.trainable_variables)


def test_sequential_routing_splits_a_block_at_its_site():
    # The site after a residual unit's second convolution: sequential routing
    # runs the unit's first convolution, its shortcut and their normalisation
    # once (their moving statistics move once, as tiled), and carries the
    # shortcut into each task's pass with the site's features.
    def build(routing):
        keras.utils.set_random_seed(0)
        backbone = backbones.resnet(0.25)
        backbone[2].condition(1, TaskBias(2))
        return tf_mtl.MultiTaskModel(backbone, two_tasks(), INPUT_SHAPE, routing=routing)

    tiled, sequential = build("tiled"), build("sequential")
    assert sequential.backbone[2].entry_site(True) == 1
    sequential.set_weights(tiled.get_weights())
    initial = tiled.get_weights()
    batch = next(iter(numpy_dataset(True, 8, 8)))
    for model in (tiled, sequential):
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        model.train_step(batch)
    for a, b in zip(tiled.get_weights(), sequential.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    moved = [not np.array_equal(a, b) for a, b in zip(tiled.get_weights(), initial)]
    assert sum(moved) >= len(tiled.trainable_variables)  # and the moving statistics


def test_unknown_routing():
    with pytest.raises(ValueError, match="routing"):
        tf_mtl.MultiTaskModel(dense_backbone(), two_tasks(), INPUT_SHAPE, routing="looped")


class CountingDense(keras.layers.Dense):
    """A Dense layer that records the rows of every eager call."""

    def __init__(self, units, **kwargs):
        super().__init__(units, **kwargs)
        self.rows = []

    def call(self, x):
        self.rows.append(x.shape[0])
        return super().call(x)


def test_block_tiles_at_its_site_after_the_task_independent_layer():
    unit = backbones.DenseUnit(4)
    unit.dense = CountingDense(4)
    unit.condition(0, TaskBias(2))
    model = tf_mtl.MultiTaskModel([keras.layers.Flatten(), unit], two_tasks(),
                                  INPUT_SHAPE)
    unit.dense.rows.clear()
    features, task_ids = model.features(images(3), training=True)
    assert unit.dense.rows == [3]  # the dense layer ran once, before tiling
    assert tuple(features.shape) == (6, 4)
    np.testing.assert_array_equal(task_ids, [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("site", [0, 1])
def test_residual_block_tiled_inside_equals_tiled_before(site):
    unit = backbones.ResidualUnit(4, strides=2)
    unit.condition(site, TaskBias(2))
    x = tf.constant(images(3)[..., :1].repeat(4, -1))
    inside, ids = unit(x, None, training=False, route=lambda r: tile_tasks(r, 2))
    before, _ = unit(tf.concat([x, x], 0), tf.constant([0, 0, 0, 1, 1, 1]),
                     training=False)
    np.testing.assert_array_equal(ids, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(inside, before, rtol=1e-6, atol=1e-6)
