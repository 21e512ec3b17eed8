"""Per-task layers equal T separate Keras layers with the same weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl.layers import PerTaskBatchNormalization, PerTaskConv2D, PerTaskDense

LAYOUTS = {
    "tiled": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "non_joint": [2, 0, 2, 2, 0, 0, 2, 0, 2],  # task 1 absent
}


def _separate(per_task_layer, make, x_shape):
    """T plain layers holding the per-task layer's copies."""
    per_task_layer.build(x_shape)
    layers = []
    for t in range(per_task_layer.num_tasks):
        layer = make()
        layer.build(x_shape)
        layer.set_weights([w[t] for w in per_task_layer.get_weights()])
        layers.append(layer)
    return layers


def _compare(per_task_layer, layers, x, task_ids, training=False):
    # Only the tasks present: Keras's own Conv2D mis-shapes an empty batch
    # on oneDNN CPUs (the per-task layers work around it).
    present = sorted(set(task_ids))
    task_ids = tf.constant(task_ids)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = per_task_layer(x, task_ids, training=training)
        theirs = tf.dynamic_stitch(
            [tf.cast(tf.where(task_ids == t)[:, 0], tf.int32) for t in present],
            [layers[t](tf.boolean_mask(x, task_ids == t), training=training)
             for t in present])
        weights = tf.range(1.0, 1.0 + ours.shape[-1])
        loss_ours, loss_theirs = (tf.reduce_sum(o * weights) for o in (ours, theirs))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(loss_ours, x), tape.gradient(loss_theirs, x),
                               rtol=1e-4, atol=1e-5)
    for t, layer in enumerate(layers):
        for ours_w, theirs_w in zip(per_task_layer.trainable_weights, layer.trainable_weights):
            g = tape.gradient(loss_ours, ours_w)
            expected = tape.gradient(loss_theirs, theirs_w)
            if t not in task_ids.numpy():  # task absent: its copy gets no gradient
                assert not np.any(tf.convert_to_tensor(g)[t])
            else:
                # Batch norm's gamma gradients sum to ~0: float noise of 1e-5.
                np.testing.assert_allclose(tf.convert_to_tensor(g)[t], expected,
                                           rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dense(layout):
    layer = PerTaskDense(3, 5, activation="relu")
    layers = _separate(layer, lambda: keras.layers.Dense(5, activation="relu"), (None, 4))
    layer.bias.assign(tf.random.normal((3, 5)))
    for t, plain in enumerate(layers):
        plain.set_weights([w[t] for w in layer.get_weights()])
    _compare(layer, layers, tf.random.stateless_normal((9, 4), seed=(1, 1)),
             LAYOUTS[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding, strides", [("same", 1), ("valid", 2)])
def test_conv(layout, padding, strides):
    layer = PerTaskConv2D(3, 4, 3, strides=strides, padding=padding)
    layers = _separate(layer, lambda: keras.layers.Conv2D(4, 3, strides=strides,
                                                          padding=padding),
                       (None, 7, 7, 2))
    x = tf.random.stateless_normal((9, 7, 7, 2), seed=(2, 2))
    _compare(layer, layers, x, LAYOUTS[layout])
    # Traced too: graph optimisations must not bring back oneDNN's shape of
    # an empty batch (task 1 has no row in the non-joint layout).
    task_ids = tf.constant(LAYOUTS[layout])
    np.testing.assert_allclose(tf.function(layer)(x, task_ids), layer(x, task_ids),
                               rtol=1e-5, atol=1e-6)
    assert layer.compute_output_shape((None, 7, 7, 2)) == tuple(
        layers[0].compute_output_shape((None, 7, 7, 2)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(layout, training):
    layer = PerTaskBatchNormalization(3, momentum=0.8)
    layers = _separate(layer, lambda: keras.layers.BatchNormalization(momentum=0.8),
                       (None, 3, 3, 4))
    rng = np.random.RandomState(0)
    layer.set_weights([rng.uniform(0.5, 1.5, (3, 4)).astype("float32") for _ in range(4)])
    for t, plain in enumerate(layers):
        plain.set_weights([w[t] for w in layer.get_weights()])
    before = layer.moving_mean.numpy()
    x = tf.random.stateless_normal((9, 3, 3, 4), seed=(3, 3)) * 2 + 1
    _compare(layer, layers, x, LAYOUTS[layout], training)
    for t, plain in enumerate(layers):  # each task's own moving statistics
        if t not in LAYOUTS[layout]:  # no rows: its statistics stay
            np.testing.assert_array_equal(layer.moving_mean[t], before[t])
            continue
        np.testing.assert_allclose(layer.moving_mean[t], plain.moving_mean, rtol=1e-5)
        np.testing.assert_allclose(layer.moving_variance[t], plain.moving_variance,
                                   rtol=1e-5)


def test_each_copy_is_initialised_like_a_layer_of_its_own():
    layer = PerTaskDense(4, 64)
    layer.build((None, 64))
    kernel = layer.kernel.numpy()
    limit = np.sqrt(6 / (64 + 64))  # Glorot uniform of one 64 x 64 copy
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit
    assert not np.allclose(kernel[0], kernel[1])


def test_saves_and_reloads_in_a_functional_model(tmp_path):
    x = keras.Input((6, 6, 2))
    task_ids = keras.Input((), dtype="int32")
    h = PerTaskConv2D(2, 3, 3, padding="same", name="conv")(x, task_ids)
    h = PerTaskBatchNormalization(2, name="norm")(h, task_ids)
    h = keras.layers.Flatten()(h)
    y = PerTaskDense(2, 4, name="dense")(h, task_ids)
    model = keras.Model([x, task_ids], y)
    inputs = (np.random.rand(4, 6, 6, 2).astype("float32"), np.array([0, 1, 1, 0]))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(inputs), model(inputs), rtol=1e-6)
    assert loaded.get_layer("conv").get_config() == model.get_layer("conv").get_config()


@pytest.mark.parametrize("backbone", ["lenet", "resnet"])
def test_per_task_twin_keeps_each_task_apart(backbone):
    import tf_mtl
    from tf_mtl import backbones
    from tf_mtl.tasks import classification

    twin = backbones.BACKBONES[backbone](0.25, num_tasks=2)
    model = tf_mtl.MultiTaskModel(
        twin, [classification("a", 3), classification("b", 3)], (28, 28, 1))
    shared = backbones.BACKBONES[backbone](0.25)
    tf_mtl.MultiTaskModel(shared, [classification("a", 3)], (28, 28, 1))
    # The same architecture, with two copies of every backbone weight.
    assert [tuple(w.shape) for l in twin for w in l.weights] == [
        (2,) + tuple(w.shape) for l in shared for w in l.weights]
    x = np.random.RandomState(0).rand(4, 28, 28, 1).astype("float32")
    before = model(x)
    for layer in twin:  # task b's copies changed: task a's outputs are not
        for w in layer.weights:
            w.assign(tf.tensor_scatter_nd_update(w, [[1]], [w[1] * 2.0 + 1.0]))
    after = model(x)
    np.testing.assert_allclose(after["a"], before["a"], rtol=1e-6)
    assert not np.allclose(after["b"], before["b"])


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_on_tiled_rows_equals_the_routed_computation(training):
    from tf_mtl.layers.routes import Tiled

    layers = [PerTaskBatchNormalization(3, momentum=0.8) for _ in range(2)]
    rng = np.random.RandomState(1)
    weights = [rng.uniform(0.5, 1.5, (3, 4)).astype("float32") for _ in range(4)]
    for layer in layers:
        layer.build((None, 3, 3, 4))
        layer.set_weights(weights)
    x = tf.random.stateless_normal((9, 3, 3, 4), seed=(4, 4)) * 2 + 1
    ids = tf.constant(LAYOUTS["tiled"])
    routed = layers[0](x, ids, training=training)
    with Tiled(3).scope():
        tiled = layers[1](x, ids, training=training)
    np.testing.assert_allclose(tiled, routed, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers[1].moving_variance, layers[0].moving_variance,
                               rtol=1e-5)


@pytest.mark.parametrize("backbone", ["lenet", "resnet"])
def test_twin_run_one_pass_per_task_equals_one_tiled_pass(backbone):
    from tf_mtl import backbones
    from tf_mtl.layers.routes import Tiled

    twin = backbones.BACKBONES[backbone](0.25, num_tasks=3)
    assert backbones.is_per_task(twin)
    x = tf.random.stateless_uniform((4, 28, 28, 1), seed=(1, 2))
    backbones.run_routed(twin, x, Tiled(3), training=False)  # builds
    initial = [w.numpy() for l in twin for w in l.weights]

    def run(one_pass_per_task):
        for w, value in zip([w for l in twin for w in l.weights], initial, strict=True):
            w.assign(value)
        with tf.GradientTape() as tape:
            if one_pass_per_task:
                y, ids = backbones.run_routed(twin, x, Tiled(3), training=True)
            else:
                y, ids = backbones.run_layers(twin, x, Tiled(3), True)
            loss = tf.reduce_sum(y * tf.range(1.0, 1.0 + y.shape[-1]))
        variables = [v for l in twin for v in l.trainable_variables]
        return (y, ids, tape.gradient(loss, variables),
                [v.numpy() for l in twin for v in l.non_trainable_variables])

    ours, tiled = run(True), run(False)
    np.testing.assert_allclose(ours[0], tiled[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours[1], tiled[1])
    for name, i in (("gradients", 2), ("moving statistics", 3)):
        for a, b in zip(ours[i], tiled[i], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_is_per_task_tells_a_twin_from_shared_layers():
    from tf_mtl import backbones

    assert backbones.is_per_task(backbones.lenet(0.25, num_tasks=2))
    assert backbones.is_per_task([PerTaskDense(2, 4), keras.layers.Flatten()])
    assert not backbones.is_per_task(backbones.lenet(0.25))
    assert not backbones.is_per_task([PerTaskDense(2, 4), keras.layers.Dense(3)])
    assert not backbones.is_per_task([keras.layers.Flatten()])


@pytest.mark.parametrize("size", [28, 7])
def test_subsampled_shortcut_equals_a_strided_1x1_convolution(size):
    # The ResNet shortcut subsamples, then convolves (oneDNN corrupts its
    # heap in a strided 1x1 convolution's filter gradient at odd batches).
    from tf_mtl import backbones

    unit = backbones.ResidualUnit(8, strides=2)
    x = tf.random.stateless_normal((4, size, size, 4), seed=(5, 6))
    unit(x)
    subsample, conv, _ = unit.shortcut
    strided = keras.layers.Conv2D(8, 1, strides=2, padding="same", use_bias=False)
    strided.build(x.shape)
    strided.set_weights(conv.get_weights())
    np.testing.assert_allclose(conv(subsample(x)), strided(x), rtol=1e-6, atol=1e-6)
