"""The papers' backbones: shapes, sites, max-unpooling, routing through
SegNet's carried pooling positions, per-task twins and reloading."""


import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import backbones, tasks
from tf_mtl.backbones.papers import _unpool
from tf_mtl.layers import ChannelPartition
from tf_mtl.layers.routes import DataRouted, Tiled
from tf_mtl.methods import hard_sharing


def test_unpool_puts_each_value_where_its_maximum_was():
    x = np.random.RandomState(0).rand(2, 4, 6, 3).astype("float32")
    pooled, argmax = tf.nn.max_pool_with_argmax(x, 2, 2, "VALID")
    values = np.arange(1, 1 + pooled.numpy().size, dtype="float32").reshape(pooled.shape)
    expected = np.zeros_like(x)
    for b, i, j, c in np.ndindex(*pooled.shape):
        window = x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
        di, dj = np.unravel_index(window.argmax(), (2, 2))
        expected[b, 2 * i + di, 2 * j + dj, c] = values[b, i, j, c]
    np.testing.assert_array_equal(_unpool(values, argmax), expected)


@pytest.mark.parametrize("name, options, input_shape, output_shape, num_sites", [
    ("resnet18", {"output_stride": 8}, (64, 64, 3), (8, 8, 64), 17),
    ("resnet34", {}, (32, 32, 3), (64,), 33),
    ("resnet50", {"output_stride": 16}, (64, 64, 3), (4, 4, 256), 49),
    ("vgg16", {}, (32, 32, 3), (64,), 13),
    ("segnet", {}, (32, 32, 3), (32, 32, 8), 26),
])
def test_paper_backbones_shapes_and_sites(name, options, input_shape, output_shape,
                                          num_sites):
    layers = backbones.BACKBONES[name](0.125, **options)
    x = np.zeros((1, *input_shape), "float32")
    assert tuple(backbones.run_layers(layers, x, None, False)[0].shape[1:]) == output_shape
    assert len(backbones.sites(layers)) == num_sites


def test_dilated_resnet_dilates_the_stages_past_its_output_stride():
    layers = backbones.resnet18(0.125, output_stride=8)
    blocks = [l for l in layers if isinstance(l, backbones.ResidualUnit)]
    assert [b.strides for b in blocks] == [1, 1, 2, 1, 1, 1, 1, 1]
    assert [b.dilation_rate for b in blocks] == [1, 1, 1, 1, 2, 2, 4, 4]
    with pytest.raises(ValueError, match="output_stride"):
        backbones.resnet18(output_stride=4)


def test_segnet_routed_rows_carry_their_own_pooling_positions():
    """Rows enter the routed part mid-encoder (a partition at site 3), after
    a pooling: each task's rows of the tiled pass equal its own pass."""
    (net,) = backbones.segnet(0.125)
    net.condition(3, ChannelPartition(2, sharing_ratio=0.5, seed=1))
    x = np.random.RandomState(0).rand(3, 32, 32, 3).astype("float32")
    tiled, task_ids = backbones.run_layers([net], x, Tiled([0, 1]), True)
    np.testing.assert_array_equal(task_ids, [0, 0, 0, 1, 1, 1])
    for t in range(2):
        own, _ = backbones.run_layers([net], x, Tiled([t]), True)
        np.testing.assert_allclose(tiled[3 * t:3 * (t + 1)], own, rtol=1e-5, atol=1e-6)
    assert not np.allclose(tiled[:3], tiled[3:])


def test_per_task_twin_of_a_dilated_resnet_runs_each_tasks_weights():
    twin = backbones.resnet18(0.0625, output_stride=8, num_tasks=2)
    x = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    task_ids = tf.constant([0, 1])
    y, _ = backbones.run_layers(twin, x, DataRouted(task_ids), False)
    assert y.shape == (2, 4, 4, 32)
    same_image = np.stack([x[0], x[0]])
    y, _ = backbones.run_layers(twin, same_image, DataRouted(task_ids), False)
    assert not np.allclose(y[0], y[1])  # two tasks, two sets of weights


@pytest.mark.parametrize("backbone", [
    lambda: backbones.segnet(0.0625),
    lambda: [backbones.ConvUnit(8, 3), backbones.BottleneckUnit(4, strides=2),
             backbones.BottleneckUnit(4, dilation_rate=2)],  # ResNet-50's blocks
], ids=["segnet", "bottleneck"])
def test_dense_models_on_paper_backbones_reload(backbone, tmp_path):
    task_list = [tasks.segmentation("semantic", 3, (32, 32)),
                 tasks.depth("depth", (32, 32), aspp_rates=(1, 2))]
    model = hard_sharing(backbone(), task_list, (32, 32, 3))
    x = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    before = model(x)
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    after = reloaded(x)
    for name in before:
        np.testing.assert_allclose(before[name], after[name], rtol=1e-5, atol=1e-6)


def test_a_block_that_routes_nothing_is_a_plain_keras_layer(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 2)), backbones.ConvUnit(4, pool_size=2),
        backbones.ResidualUnit(6, strides=2), keras.layers.Flatten(), backbones.DenseUnit(5),
        keras.layers.Dense(3)])
    x = np.random.RandomState(0).rand(16, 8, 8, 2).astype("float32")
    y = np.arange(16) % 3
    model.compile("adam", "sparse_categorical_crossentropy")
    before = model.predict(x, verbose=0)
    model.fit(x, y, epochs=2, verbose=0)
    after = model.predict(x, verbose=0)
    assert not np.allclose(before, after)
    model.save(tmp_path / "plain.keras")
    reloaded = keras.saving.load_model(tmp_path / "plain.keras", safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), after, rtol=1e-6)


def test_a_block_that_routes_refuses_a_plain_call():
    x = np.zeros((2, 6), "float32")
    with pytest.raises(ValueError, match="'twin' routes tasks in this mode"):
        backbones.DenseUnit(4, num_tasks=2, name="twin")(x)
    unit = backbones.DenseUnit(4, name="partitioned")
    unit.condition(0, ChannelPartition(2, sharing_ratio=0.5))
    with pytest.raises(ValueError, match="'partitioned' routes tasks"):
        unit(x, training=False)


def test_shared_stages_say_where_rows_enter_a_block():
    assert backbones.DenseUnit(4, num_tasks=2).shared_stages(True) == 0  # before its layers
    unit = backbones.ResidualUnit(4)
    assert unit.shared_stages(True) == 3  # routes nothing: all of its stages
    unit.condition(1, ChannelPartition(2, sharing_ratio=0.5))
    assert unit.shared_stages(True) == 2  # its first two stages, then site 1
    x = tf.random.stateless_uniform((2, 4, 4, 4), seed=(1, 1))
    unit(x, None, route=Tiled(2), training=True)  # builds
    state = unit.run_until(2, x, True)
    split, ids = unit.run_from(2, state, None, True, Tiled(2))
    whole, _ = unit(x, None, route=Tiled(2), training=True)
    np.testing.assert_array_equal(ids, [0, 0, 1, 1])
    np.testing.assert_allclose(split, whole, rtol=1e-6)
