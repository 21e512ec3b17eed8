"""Tests of `tf_mtl.routing`: how a multi-task model routes a batch.

Exactness: the routed batch computes what one pass per task computes
(MPPS 4.4).

A small MPPS model with batch normalisation after its masked site; every
guest mask is enumerated, so the expected objective and its gradient with
respect to Phi are exact. The tiled pass (both data layouts) and the
sequential passes must give, mask by mask, the objective of T separate
per-task passes written with plain ops, and their REINFORCE gradients must
average (weighted by q(m)) to the exact gradient.

Tiling and routing of batches through a model: where a batch is tiled
once per task (at the first task-conditioned layer or a block's
conditioned site, only in training for a mask that is the identity at
inference), given task ids used untiled, and sequential routing (one
pass per task) training like tiled routing.
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mtl
from tf_mtl import backbones, methods, routing
from tf_mtl.layers import (
    ProgressiveMask,
    TaskBatchNormalization,
    TaskConditioned,
    objective_scope,
)
from tf_mtl.layers.routes import Tiled
from tf_mtl.tasks import classification

from helpers import INPUT_SHAPE, NAMES, dense_backbone, images, numpy_dataset, two_tasks

PHI = np.array([[0.9, 0.8, 0.3, 0.6], [0.2, 0.7, 0.95, 0.85]], "float32")
OWNER = PHI == PHI.max(0)
GUESTS = list(zip(*np.nonzero(~OWNER)))  # (task, channel) of every guest


class ForcedMask(ProgressiveMask):
    """The MPPS mask with its draw replaced by a given mask."""

    forced = None

    def _sample(self, dist):
        return tf.constant(self.forced)


def _model(jointly_labelled, routing="tiled"):
    unit = backbones.DenseUnit(4)
    mask = ForcedMask(2, beta=0.0, baseline_decay=None, mask_learning_rate=None,
                      name="mask")
    unit.condition(0, mask)
    norm = TaskBatchNormalization(momentum=0.9)
    model = tf_mtl.MultiTaskModel(
        [unit, norm], [classification("a", 3), classification("b", 3)], (5,),
        jointly_labelled=jointly_labelled, task_frequencies=[3, 3], routing=routing)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    mask.mask_probs.assign(PHI)
    # Non-trivial normalisation weights, so a wrong statistic shows.
    norm.gamma.assign([1.5, 0.5, 2.0, 1.0])
    norm.beta.assign([0.1, -0.2, 0.3, 0.0])
    return model, unit, mask, norm


def _masks():
    """Every guest mask with its probability q(m) as a function of Phi."""
    for bits in itertools.product([0.0, 1.0], repeat=len(GUESTS)):
        m = np.ones_like(PHI)
        for (t, c), bit in zip(GUESTS, bits):
            m[t, c] = bit
        yield m


def _prob(phi, m):
    return tf.reduce_prod(tf.where(OWNER, 1.0, tf.where(m > 0, phi, 1 - phi)))


def _task_pass(model, unit, norm, t, m_t, x, y):
    """Task t's own pass, in plain ops: its mask, its batch statistics."""
    h = tf.nn.relu(unit.dense(x) * m_t)
    mean, variance = tf.nn.moments(h, [0])
    h = (h - mean) / tf.sqrt(variance + norm.epsilon) * norm.gamma + norm.beta
    logits = model.heads[model.task_names[t]](h)
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        y, logits, from_logits=True))


def _data(jointly_labelled):
    x = tf.random.stateless_normal((6, 5), seed=(4, 2))
    y = tf.constant([0, 2, 1, 1, 0, 2])
    if jointly_labelled:
        return (x, {"a": y, "b": tf.constant([2, 2, 0, 1, 0, 1])})
    return (x, tf.constant([1, 0, 0, 1, 1, 0]), y)


def _exact(model, unit, norm, data, jointly_labelled):
    """Per mask, the objective of T separate passes (sum_t w_t mean_t)."""
    values = []
    for m in _masks():
        if jointly_labelled:
            x, labels = data
            values.append(sum(float(_task_pass(model, unit, norm, t, m[t], x, labels[n]))
                              for t, n in enumerate(model.task_names)))
        else:
            x, ids, y = data
            values.append(sum(
                0.5 * float(_task_pass(model, unit, norm, t, m[t],
                                       tf.boolean_mask(x, ids == t),
                                       tf.boolean_mask(y, ids == t)))
                for t in range(2)))
    return np.array(values)


def _routed(model, mask, data, sequential=False):
    """Per mask, the routed objective and its gradient with respect to Phi."""
    values, grads = [], []
    index = [id(v) for v in model.trainable_variables].index(id(mask.mask_probs))
    for m in _masks():
        mask.forced = m
        if sequential:
            first = next(i for i, l in enumerate(model.backbone) if l.routes_tasks(True))
            x, _, labels = model._unpack(data)
            step = routing.sequential_gradients(model, x, labels, first, tf.ones([2]), False)
            grad = step.gradients[index]
            values.append(float(step.objective))
        else:
            with tf.GradientTape() as tape:
                loss = model.batch_objective(data, training=True)
            grad = tape.gradient(loss, mask.mask_probs)
            values.append(float(loss))
        grads.append(tf.convert_to_tensor(grad).numpy())
    return np.array(values), np.array(grads)


def _exact_gradient(values):
    phi = tf.Variable(PHI)
    with tf.GradientTape() as tape:
        expected = sum(_prob(phi, m) * v for m, v in zip(_masks(), values))
    return tape.gradient(expected, phi).numpy()


@pytest.mark.parametrize("jointly_labelled, sequential", [
    (True, False), (True, True), (False, False)])
def test_routed_objective_and_phi_gradient_are_exact(jointly_labelled, sequential):
    model, unit, mask, norm = _model(jointly_labelled,
                                     "sequential" if sequential else "tiled")
    data = _data(jointly_labelled)
    exact_values = _exact(model, unit, norm, data, jointly_labelled)
    values, grads = _routed(model, mask, data, sequential)
    np.testing.assert_allclose(values, exact_values, rtol=1e-5)

    probs = np.array([float(_prob(PHI, m)) for m in _masks()])
    estimated = np.tensordot(probs, grads, axes=1)  # E_q[REINFORCE gradient]
    exact = _exact_gradient(exact_values)
    np.testing.assert_allclose(estimated, exact, rtol=1e-4, atol=1e-6)
    assert np.abs(exact[~OWNER]).min() > 1e-3  # every guest has a signal
    np.testing.assert_array_equal(estimated[OWNER], 0.0)


def test_tiled_and_sequential_leave_the_same_moving_statistics():
    moving = []
    for routing in ("tiled", "sequential"):
        keras.utils.set_random_seed(1)  # the same weights for both
        model, _, mask, norm = _model(True, routing)
        mask.forced = next(_masks())
        model.train_step(_data(True))
        moving.append([norm.moving_mean.numpy(), norm.moving_variance.numpy()])
    np.testing.assert_allclose(moving[0], moving[1], rtol=1e-6)
    assert not np.allclose(moving[0][0], 0.0)


def test_plain_batch_norm_after_a_masked_site_is_refused():
    unit = backbones.DenseUnit(4)
    unit.condition(0, ProgressiveMask(2))
    with pytest.raises(ValueError, match="TaskBatchNormalization"):
        tf_mtl.MultiTaskModel([unit, keras.layers.BatchNormalization(name="bn")],
                              [classification("a", 3), classification("b", 3)], (5,))


# === tiling and routing of batches through a model ==========================


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
    assert sequential.backbone[2].shared_stages(True) == 2  # enters at site 1
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
    inside, ids = unit(x, None, training=False, route=Tiled(2))
    before, _ = unit(tf.concat([x, x], 0), tf.constant([0, 0, 0, 1, 1, 1]),
                     training=False)
    np.testing.assert_array_equal(ids, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(inside, before, rtol=1e-6, atol=1e-6)
