"""Each loss weighting against a hand computation of its paper's formula."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import weighting


def _built(w, num_tasks):
    w.build(num_tasks)
    return w


def test_equal_weighting_is_one_per_task():
    np.testing.assert_array_equal(_built(weighting.EqualWeighting(), 3).task_weights(), 1.0)


def test_dwa_weights_are_the_softmax_of_the_loss_ratios_of_the_last_two_epochs():
    dwa = _built(weighting.DynamicWeightAverage(temperature=2.0), 3)
    epochs = [[[2.0, 1.0, 4.0], [4.0, 1.0, 2.0]],  # epoch 0: means 3, 1, 3
              [[1.5, 0.9, 3.0]]]                     # epoch 1: 1.5, 0.9, 3
    for epoch, steps in enumerate(epochs):
        dwa.on_epoch_begin(epoch)
        np.testing.assert_array_equal(dwa.task_weights(), 1.0)  # the first two epochs
        for losses in steps:
            dwa.update(tf.constant(losses), None)
    dwa.on_epoch_begin(2)
    ratio = np.array([1.5 / 3, 0.9 / 1, 3 / 3])
    expected = 3 * np.exp(ratio / 2) / np.exp(ratio / 2).sum()
    np.testing.assert_allclose(dwa.task_weights(), expected, rtol=1e-6)
    dwa.on_epoch_begin(2)  # an epoch resumed in its middle: nothing folds in
    np.testing.assert_allclose(dwa.task_weights(), expected, rtol=1e-6)


def test_dwa_refuses_a_temperature_that_is_not_positive():
    with pytest.raises(ValueError, match="temperature=0"):
        weighting.DynamicWeightAverage(temperature=0)


def test_uncertainty_weighting_objective_and_its_gradient():
    uw = _built(weighting.UncertaintyWeighting(), 2)
    s = np.array([0.3, -0.5], "float32")
    uw.log_variances.assign(s)
    losses = np.array([2.0, 0.5], "float32")
    with tf.GradientTape() as tape:
        w = uw.task_weights()
        objective = tf.reduce_sum(w * losses) + uw.update(losses, w)
    # Kendall et al. eq. (5): L / (2 sigma^2) + log sigma, s = log sigma^2.
    np.testing.assert_allclose(objective, np.sum(np.exp(-s) * losses / 2 + s / 2), rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(objective, uw.log_variances),
                               -np.exp(-s) * losses / 2 + 0.5, rtol=1e-6)


def test_rlw_draws_softmax_normal_weights_reproducibly():
    def draws(rlw, n):
        return np.array([rlw.task_weights().numpy() for _ in range(n)])

    first = draws(_built(weighting.RandomLossWeighting(seed=4), 3), 5)
    np.testing.assert_allclose(first.sum(1), 1.0, rtol=1e-6)
    assert (first > 0).all() and len({tuple(w) for w in first}) == 5
    np.testing.assert_array_equal(draws(_built(weighting.RandomLossWeighting(seed=4), 3), 5),
                                  first)
    resumed = _built(weighting.RandomLossWeighting(seed=4), 3)
    resumed.draws.assign(3)  # a checkpoint after 3 steps draws step 4's weights
    np.testing.assert_array_equal(draws(resumed, 2), first[3:])


def test_gradnorm_loss_its_gradient_and_renormalisation():
    gn = _built(weighting.GradNorm(alpha=1.5), 2)
    w = np.array([0.5, 1.5], "float32")
    gn.loss_weights.assign(w)
    first = np.array([2.0, 1.0], "float32")
    gn.update(first, gn.task_weights(), tf.eye(2))  # the first step sets L(0)
    np.testing.assert_array_equal(gn.initial_losses, first)
    losses = np.array([1.0, 0.8], "float32")
    norms = np.array([3.0, 1.0], "float32")  # ||grad L_t||
    weighted = np.diag((w * norms) ** 2)  # Gram matrix of grad (w_t L_t)
    gn.gradnorm_loss.reset_state()
    with tf.GradientTape() as tape:
        term = gn.update(losses, gn.task_weights(), tf.constant(weighted))
    g = w * norms
    rate = (losses / first) / (losses / first).mean()
    target = g.mean() * rate ** 1.5
    np.testing.assert_allclose(gn.gradnorm_loss.result(), np.abs(g - target).sum(), rtol=1e-5)
    # Its term adds nothing to the objective, and L_grad's gradient to w:
    # the target is a constant, d/dw_t = sign(G_t - target_t) ||grad L_t||.
    assert float(term) == 0.0
    np.testing.assert_allclose(tape.gradient(term, gn.loss_weights),
                               np.sign(g - target) * norms, rtol=1e-5)
    # The task losses do not move the weights.
    with tf.GradientTape() as tape:
        plain = tf.reduce_sum(gn.task_weights() * losses)
    assert tape.gradient(plain, gn.loss_weights) is None
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.apply_gradients([(tf.constant([1.0, -2.0]), gn.loss_weights)])
    np.testing.assert_allclose(gn.loss_weights.numpy().sum(), 2.0, rtol=1e-6)
    np.testing.assert_allclose(gn.loss_weights.numpy(), np.array([0.4, 1.7]) * 2 / 2.1,
                               rtol=1e-6)


def test_gradnorm_logs_the_network_objective_as_loss():
    from tf_mtl import backbones, data, methods
    from tf_mtl.tasks import classification

    tasks = [classification("task_0", 3), classification("task_1", 3)]
    model = methods.hard_sharing([keras.layers.Flatten(), backbones.DenseUnit(8)], tasks,
                                 (28, 28, 1))
    model.compile(optimizer=keras.optimizers.SGD(0.1), weighting="gradnorm")
    w = np.array([0.5, 1.5])
    model.weighting.loss_weights.assign(w)
    dataset = data.load("synthetic", batch_size=32, limit=32).train  # one step
    x, labels = next(iter(dataset))
    with tf.GradientTape(persistent=True) as tape:
        features, _ = model.features(x, training=True)
        losses = [tf.reduce_mean(t.loss(labels[t.name], model.heads[t.name](features)))
                  for t in tasks]
    shared = [v for layer in model.backbone for v in layer.trainable_variables]
    norms = w * [np.sqrt(sum(np.sum(g ** 2) for g in tape.gradient(loss, shared)))
                 for loss in losses]
    logs = model.fit(dataset, verbose=0).history
    objective = sum(logs[f"{t.name}_weight"][0] * logs[f"{t.name}_loss"][0] for t in tasks)
    np.testing.assert_allclose(logs["loss"][0], objective, rtol=1e-6)
    # L_grad of the first step (every rate 1): sum_t |G_t - mean G|.
    np.testing.assert_allclose(logs["gradnorm_loss"][0], np.abs(norms - norms.mean()).sum(),
                               rtol=1e-4)


def test_weightings_by_name_and_unknown_names():
    assert isinstance(weighting.get("dwa"), weighting.DynamicWeightAverage)
    with pytest.raises(ValueError, match="'dwaa'.*dwa"):
        weighting.get("dwaa")
