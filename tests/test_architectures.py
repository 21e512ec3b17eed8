"""MTAN and Cross-stitch: each equation against plain ops, and the routed
batch against each task's own pass."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import backbones, data, methods
from tf_mtl.layers import CrossStitch, ProgressiveMask
from tf_mtl.layers.routes import Tiled
from tf_mtl.methods.mtan import AttentionNetwork
from tf_mtl.tasks import classification

TASKS = [classification(n, 3) for n in ("a", "b", "c")]


def test_cross_stitch_mixes_the_columns_by_alpha():
    unit = CrossStitch(3, same=0.8)
    unit.build((None, 2, 4))
    alpha = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]], "float32")
    np.testing.assert_allclose(unit.alpha.numpy(), alpha)
    alpha = np.random.RandomState(0).rand(3, 3).astype("float32")
    unit.alpha.assign(alpha)
    columns = np.random.RandomState(1).rand(3, 5, 2, 4).astype("float32")  # (T, B, ...)
    for order in [(0, 1, 2), (2, 0, 1)]:  # tiled blocks in any task order
        with Tiled(order).scope():
            x = np.concatenate([columns[t] for t in order])
            mixed = unit(x, np.repeat(order, 5)).numpy().reshape(3, 5, 2, 4)
        for k, t in enumerate(order):  # eq. 1: x~_t = sum_s alpha[t, s] x_s
            expected = sum(alpha[t, s] * columns[s] for s in range(3))
            np.testing.assert_allclose(mixed[k], expected, rtol=1e-5)


def test_cross_stitch_refuses_rows_not_tiled_over_every_task():
    unit = CrossStitch(2)
    x = np.zeros((4, 3), "float32")
    with pytest.raises(ValueError, match="tiled over all 2 tasks"):
        unit(x, np.array([0, 1, 1, 0]))
    with Tiled([1]).scope(), pytest.raises(ValueError, match=r"Received rows of tasks \(1,\)"):
        unit(x, np.ones(4, "int32"))
    with pytest.raises(ValueError, match="jointly labelled"):
        methods.cross_stitch(backbones.lenet, TASKS, (28, 28, 1), jointly_labelled=False)
    with pytest.raises(ValueError, match="routing must be 'tiled'"):
        methods.cross_stitch(backbones.lenet, TASKS, (28, 28, 1), routing="sequential")
    stitched = methods.cross_stitch(functools.partial(backbones.lenet, 0.25), TASKS,
                                    (28, 28, 1))
    with pytest.raises(ValueError, match="share no representation"):
        stitched.compile("sgd", aggregator="mgda", aggregate_on="representation")


@pytest.mark.parametrize("same", [1.0, 0.9])
def test_cross_stitch_columns_share_only_through_the_units(same):
    model = methods.cross_stitch(functools.partial(backbones.lenet, 0.25), TASKS,
                                 (28, 28, 1), same=same)
    units = [l for l in model.backbone if isinstance(l, CrossStitch)]
    assert len(units) == 3  # after each of LeNet's blocks
    x = np.random.RandomState(0).rand(4, 28, 28, 1).astype("float32")
    before = model(x, training=True)
    for layer in model.backbone:  # task c's column changed
        if isinstance(layer, backbones.Block):
            for w in layer.trainable_weights:
                w.assign(tf.tensor_scatter_nd_update(w, [[2]], [w[2] * 2.0 + 1.0]))
    after = model(x, training=True)
    # alpha_S = 1 passes nothing between columns: T single-task networks.
    assert np.allclose(after["a"], before["a"], rtol=1e-5) == (same == 1.0)
    assert not np.allclose(after["c"], before["c"])


def _bn(layer, x, t=None):
    """Inference batch normalisation with the layer's (task t's) statistics
    and scales (where the layer has one per task)."""
    pick = lambda v: v.numpy()[t] if t is not None and len(v.shape) == 2 else v.numpy()
    return pick(layer.gamma) * (x - pick(layer.moving_mean)) / np.sqrt(
        pick(layer.moving_variance) + layer.epsilon) + pick(layer.beta)


def test_mtan_attention_is_eq_1():
    dense = [keras.layers.Flatten(), backbones.DenseUnit(6), backbones.DenseUnit(5)]
    model = methods.attention_network(dense, TASKS[:2], (4, 3), attend_dense=True)
    net = model.backbone[0]
    rng = np.random.RandomState(0)
    for w in net.weights:  # statistics and scales away from their start
        w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
    x = rng.rand(3, 4, 3).astype("float32")
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    relu = lambda v: np.maximum(v, 0)
    (_, g1, h1), (f2, g2, h2) = net.modules
    _, unit1, unit2 = dense
    u1 = x.reshape(3, -1) @ unit1.dense.kernel.numpy() + unit1.dense.bias.numpy()
    p1 = relu(u1)
    u2 = p1 @ unit2.dense.kernel.numpy() + unit2.dense.bias.numpy()
    p2 = relu(u2)
    outputs = model(x)
    for t, name in enumerate(["a", "b"]):
        attend = lambda g, h, u, p: sigmoid(_bn(h[1], relu(_bn(g[1], u @ g[0].kernel.numpy()[t], t))
                                                @ h[0].kernel.numpy()[t], t)) * p
        a1 = attend(g1, h1, u1, p1)
        # Shared f: one kernel, each task's own moving statistics.
        f = relu(_bn(f2[1], a1 @ f2[0].kernel.numpy(), t))
        a2 = attend(g2, h2, np.concatenate([u2, f], axis=-1), p2)
        np.testing.assert_allclose(outputs[name], model.heads[name](a2), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backbone", ["lenet", "resnet"])
def test_mtan_routed_pass_equals_each_tasks_own_pass(backbone):
    model = methods.attention_network(backbones.BACKBONES[backbone](0.25), TASKS, (28, 28, 1))
    net = model.backbone[0]
    x = np.random.RandomState(0).rand(4, 28, 28, 1).astype("float32")
    tiled, task_ids = model.features(x, training=True)  # batch statistics per task
    np.testing.assert_array_equal(task_ids, np.repeat([0, 1, 2], 4))
    for t in range(3):
        own, _ = backbones.run_layers([net], x, Tiled([t]), True)
        np.testing.assert_allclose(tiled[4 * t:4 * (t + 1)], own, rtol=1e-4, atol=1e-5)


def test_mtan_evaluate_equals_each_tasks_own_inference_pass(own_inference_results):
    ds = data.load("synthetic", batch_size=16, limit=32)
    tasks = [classification(n, k) for n, k in ds.task_classes.items()]
    model = methods.attention_network(backbones.lenet(0.25), tasks, (28, 28, 1))
    model.compile(optimizer="adam")
    model.fit(ds.train, epochs=1, verbose=0)
    evaluated = model.evaluate(ds.test, return_dict=True, verbose=0)
    for key, value in own_inference_results(model, ds.test).items():
        assert evaluated[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_mpps_keeps_pooled_statistics_for_its_shared_inference():
    model = methods.progressive_sharing(backbones.lenet(0.25), TASKS, (28, 28, 1))
    assert all(len(w.shape) == 1 for w in model.non_trainable_weights
               if w.name == "moving_mean")


def test_mtan_attends_convolution_blocks_and_shares_the_dense_one():
    # The paper attends convolution blocks; LeNet's dense block then runs,
    # shared, on each task's attended features.
    model = methods.attention_network(backbones.lenet(0.5), TASKS, (28, 28, 1))
    net = model.backbone[0]
    assert len(net.modules) == 2
    hps = methods.hard_sharing(backbones.lenet(0.5), TASKS, (28, 28, 1))
    modules = sum(int(np.prod(w.shape)) for m in net.modules for part in m if part
                  for l in part for w in l.weights)
    assert model.count_params() == hps.count_params() + modules
    assert model.count_params() < 1.2 * hps.count_params()


def test_mtan_trains_on_non_jointly_labelled_data():
    ds = data.load("synthetic_groups", batch_size=32, limit=64)
    tasks = [classification(n, k) for n, k in ds.task_classes.items()]
    model = methods.attention_network(backbones.lenet(0.25), tasks, (28, 28, 1),
                                      jointly_labelled=False)
    model.compile("adam")
    logs = model.fit(ds.train, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])


def test_mtan_refuses_task_specific_layers_in_its_shared_network():
    with pytest.raises(ValueError, match="shared blocks without conditioned sites"):
        AttentionNetwork(backbones.lenet(num_tasks=2), 2)
    masked = backbones.lenet()
    masked[0].condition(0, ProgressiveMask(2))
    with pytest.raises(ValueError, match="shared blocks without conditioned sites"):
        AttentionNetwork(masked, 2)
    with pytest.raises(ValueError, match="needs a convolution block"):
        AttentionNetwork([keras.layers.Flatten(), backbones.DenseUnit(4)], 2)
    with pytest.raises(ValueError, match="routing must be 'tiled'"):
        methods.attention_network(backbones.lenet(), TASKS, (28, 28, 1), routing="sequential")



def test_mtan_attention_refuses_a_plain_call():
    model = methods.attention_network(backbones.lenet(0.25), TASKS, (28, 28, 1))
    with pytest.raises(ValueError, match="routes tasks in this mode"):
        model.backbone[0](np.zeros((1, 28, 28, 1), "float32"))
