"""TaskBatchNormalization: each task's rows normalised as in its own pass."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl.layers import TaskBatchNormalization


def _pair(momentum=0.9):
    """A task-routed layer and a plain one with the same weights."""
    ours, plain = TaskBatchNormalization(momentum=momentum), keras.layers.BatchNormalization(momentum=momentum)
    for layer in (ours, plain):
        layer.build((None, 3, 3, 4))
    weights = [np.random.RandomState(i).uniform(0.5, 1.5, 4).astype("float32") for i in range(4)]
    ours.set_weights(weights)
    plain.set_weights(weights)
    return ours, plain


@pytest.mark.parametrize("task_ids", [
    [0, 0, 0, 1, 1, 1, 2, 2, 2],  # tiled: a jointly labelled batch
    [2, 0, 2, 2, 0, 0, 2, 0, 2],  # non-jointly labelled, task 1 absent
])
def test_equals_one_plain_pass_per_task(task_ids):
    ours, plain = _pair()
    x = tf.random.stateless_normal((9, 3, 3, 4), seed=(1, 2)) * 3 + 1
    task_ids = tf.constant(task_ids)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        routed = ours(x, task_ids, training=True)
        # One pass per task, in task order, as the papers run them.
        parts = {t: plain(tf.boolean_mask(x, task_ids == t), training=True)
                 for t in sorted(set(task_ids.numpy().tolist()))}
        separate = tf.dynamic_stitch(
            [tf.cast(tf.where(task_ids == t)[:, 0], tf.int32) for t in parts], list(parts.values()))
        routed_loss = tf.reduce_sum(routed * tf.range(1.0, 5.0))
        separate_loss = tf.reduce_sum(separate * tf.range(1.0, 5.0))
    np.testing.assert_allclose(routed, separate, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.moving_mean, plain.moving_mean, rtol=1e-6)
    np.testing.assert_allclose(ours.moving_variance, plain.moving_variance, rtol=1e-6)
    for a, b in [(x, x), (ours.gamma, plain.gamma), (ours.beta, plain.beta)]:
        np.testing.assert_allclose(tape.gradient(routed_loss, a),
                                   tape.gradient(separate_loss, b), rtol=1e-4, atol=1e-4)


def test_without_task_ids_or_at_inference_it_is_keras_batch_norm():
    ours, plain = _pair()
    x = tf.random.stateless_normal((6, 3, 3, 4), seed=(3, 4))
    np.testing.assert_allclose(ours(x, training=True), plain(x, training=True), rtol=1e-6)
    ids = tf.constant([0, 1] * 3)
    np.testing.assert_allclose(ours(x, ids, training=False), plain(x, training=False),
                               rtol=1e-6)


def test_dense_features_and_mixed_precision():
    layer = TaskBatchNormalization(dtype="mixed_float16")
    x = tf.cast(tf.random.stateless_normal((8, 5), seed=(5, 6)), "float16")
    y = layer(x, tf.constant([0, 1] * 4), training=True)
    assert y.dtype == tf.float16
    for t in range(2):  # each task's rows have mean 0 and variance ~1
        rows = tf.cast(y[t::2], "float32").numpy()
        np.testing.assert_allclose(rows.mean(0), 0, atol=1e-2)
        np.testing.assert_allclose(rows.var(0), 1, atol=1e-2)


def test_saves_and_reloads_in_a_functional_model(tmp_path):
    x = keras.Input((4,))
    task_ids = keras.Input((), dtype="int32")
    model = keras.Model([x, task_ids],
                        TaskBatchNormalization(momentum=0.8, name="tbn")(x, task_ids))
    model.get_layer("tbn").moving_mean.assign([1.0, 2.0, 3.0, 4.0])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.get_layer("tbn").moving_mean, [1, 2, 3, 4])
    assert loaded.get_layer("tbn").momentum == pytest.approx(0.8)


def test_rejects_what_it_cannot_keep_apart():
    layer = TaskBatchNormalization(axis=1)
    with pytest.raises(ValueError, match="channels last"):
        layer(tf.ones((4, 3, 2)), tf.constant([0, 0, 1, 1]), training=True)


@pytest.mark.parametrize("blocks", [3, [2], [0, 2]])
def test_tiled_rows_equal_the_routed_computation(blocks):
    from tf_mtl.layers.routes import Tiled

    layers = [TaskBatchNormalization(momentum=0.7) for _ in range(2)]
    tasks = Tiled(blocks).tasks
    x = tf.random.stateless_normal((3 * len(tasks), 4, 4, 5), seed=(2, 3)) * 2 + 1
    task_ids = tf.repeat(tf.constant(tasks), 3)
    for layer in layers:
        layer.build(x.shape)
        layer.moving_mean.assign(tf.fill([5], 0.3))
    routed = layers[0](x, task_ids, training=True)
    with Tiled(blocks).scope():
        tiled = layers[1](x, task_ids, training=True)
    np.testing.assert_allclose(tiled, routed, rtol=1e-5, atol=1e-5)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(getattr(layers[1], name), getattr(layers[0], name),
                                   rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("tiled", [False, True])
def test_per_task_statistics_are_each_tasks_own_pass_in_training_and_inference(tiled):
    from tf_mtl.layers.routes import Tiled

    ours = TaskBatchNormalization(num_tasks=3, momentum=0.7)
    plains = [keras.layers.BatchNormalization(momentum=0.7) for _ in range(3)]
    task_ids = tf.repeat(tf.range(3), 4) if tiled else tf.constant([2, 0, 2, 1, 0, 2] * 2)
    scope = lambda: Tiled(3).scope() if tiled else contextlib.nullcontext()
    for step in range(3):  # each task's statistics move with its rows alone
        x = tf.random.stateless_normal((12, 2, 2, 5), seed=(step, 7)) * (step + 1) + step
        with scope():
            ours(x, task_ids, training=True)
        for t, plain in enumerate(plains):
            plain(tf.boolean_mask(x, task_ids == t), training=True)
    assert ours.moving_mean.shape == (3, 5)
    for t, plain in enumerate(plains):
        np.testing.assert_allclose(ours.moving_mean[t], plain.moving_mean, rtol=1e-5)
        np.testing.assert_allclose(ours.moving_variance[t], plain.moving_variance, rtol=1e-5)
    with scope():  # inference: row i with the statistics of its task
        y = ours(x, task_ids, training=False)
    for t, plain in enumerate(plains):
        np.testing.assert_allclose(tf.boolean_mask(y, task_ids == t),
                                   plain(tf.boolean_mask(x, task_ids == t), training=False),
                                   rtol=1e-5, atol=1e-5)


def test_per_task_statistics_of_rows_without_a_task_move_alike():
    # A shared stem's rows serve every task: each task's statistics are Keras'.
    ours, plain = TaskBatchNormalization(num_tasks=2), keras.layers.BatchNormalization()
    x = tf.random.stateless_normal((6, 3, 3, 4), seed=(3, 4)) * 2 + 1
    np.testing.assert_allclose(ours(x, training=True), plain(x, training=True), rtol=1e-5)
    for t in range(2):
        np.testing.assert_allclose(ours.moving_mean[t], plain.moving_mean, rtol=1e-6)
    np.testing.assert_allclose(ours(x, training=False), plain(x, training=False), rtol=1e-5)


def test_per_task_statistics_save_and_reload(tmp_path):
    x = keras.Input((4,))
    task_ids = keras.Input((), dtype="int32")
    layer = TaskBatchNormalization(name="tbn")
    layer.keep_task_statistics(2)
    model = keras.Model([x, task_ids], layer(x, task_ids))
    layer.moving_mean.assign([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras").get_layer("tbn")
    assert loaded.num_tasks == 2
    np.testing.assert_array_equal(loaded.moving_mean, layer.moving_mean)
    with pytest.raises(ValueError, match="before the layer is built"):
        loaded.keep_task_statistics(3)
