"""The routed batch computes what one pass per task computes (MPPS 4.4).

A small MPPS model with batch normalisation after its masked site; every
guest mask is enumerated, so the expected objective and its gradient with
respect to Phi are exact. The tiled pass (both data layouts) and the
sequential passes must give, mask by mask, the objective of T separate
per-task passes written with plain ops, and their REINFORCE gradients must
average (weighted by q(m)) to the exact gradient.
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mtl
from tf_mtl import backbones, routing
from tf_mtl.layers import ProgressiveMask, TaskBatchNormalization
from tf_mtl.tasks import classification

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
