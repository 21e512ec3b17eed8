"""ProgressiveMask: the MPPS mask layer, its KL, EC and gradients."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tf_mtl.layers import ProgressiveMask, objective_scope
from tf_mtl.layers.progressive_mask import (
    exclusive_capacity,
    exclusive_init,
    gaussian_scale,
    kl_divergence,
    rescale_capacity,
)

tfd = tfp.distributions
PHI = np.array([[0.9, 0.3, 0.6], [0.4, 0.8, 0.2]], "float32")
PI = np.array([[0.7, 0.1, 0.5], [0.2, 0.95, 0.4]], "float32")


def _mask(phi, **kwargs):
    layer = ProgressiveMask(phi.shape[0], **kwargs)
    layer.build((None, phi.shape[1]))
    layer.mask_probs.assign(phi)
    return layer


def _train(layer, x, task_ids):
    """A training call of the layer; returns its output and objective scope."""
    with objective_scope() as scope:
        return layer(x, task_ids, training=True), scope


def test_exclusive_init_splits_channels_into_owned_parts():
    np.testing.assert_allclose(exclusive_init(3, 5, 0.01), [
        [0.99, 0.99, 0.01, 0.01, 0.01],
        [0.01, 0.01, 0.99, 0.99, 0.01],
        [0.01, 0.01, 0.01, 0.01, 0.99],
    ], rtol=1e-6)
    layer = ProgressiveMask(3)
    layer.build((None, 5))
    np.testing.assert_array_equal(layer.mask_probs.numpy(), layer.target_probs.numpy())


@pytest.mark.parametrize("distribution", ["bernoulli", "gaussian", "gaussian_matched"])
def test_kl_matches_tfp(distribution):
    ours = kl_divergence(distribution, PHI, PI).numpy()
    if distribution == "bernoulli":
        q, p = tfd.Bernoulli(probs=PHI), tfd.Bernoulli(probs=PI)
    elif distribution == "gaussian":
        q = tfd.Normal(1.0, gaussian_scale(PHI))
        p = tfd.Normal(1.0, gaussian_scale(PI))
    else:  # the Bernoulli's mean and variance
        q = tfd.Normal(PHI, np.sqrt(PHI * (1 - PHI)))
        p = tfd.Normal(PI, np.sqrt(PI * (1 - PI)))
    expected = tf.reduce_sum(tfd.kl_divergence(q, p), -1).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_kl_hand_values():
    # Bernoulli(0.5) || Bernoulli(0.25): 0.5 ln 2 + 0.5 ln(2/3).
    bern = kl_divergence("bernoulli", [[0.5]], [[0.25]]).numpy()
    np.testing.assert_allclose(bern, [0.5 * np.log(2) + 0.5 * np.log(2 / 3)], rtol=1e-6)
    # r(0.5) = 1, r(0.2) = 2: ln 2 + 1/8 - 1/2.
    gauss = kl_divergence("gaussian", [[0.5]], [[0.2]]).numpy()
    np.testing.assert_allclose(gauss, [np.log(2) + 1 / 8 - 0.5], rtol=1e-6)
    assert kl_divergence("bernoulli", PHI, PHI).numpy() == pytest.approx([0, 0], abs=1e-6)


def test_exclusive_capacity_hand_values():
    # Per channel: 1 - (sum - max) / (T - 1).
    np.testing.assert_allclose(exclusive_capacity(PHI), [0.6, 0.7, 0.8], rtol=1e-6)
    phi3 = np.array([[0.9, 0.2], [0.6, 0.5], [0.5, 0.99]], "float32")
    np.testing.assert_allclose(exclusive_capacity(phi3), [0.45, 0.65], rtol=1e-6)


def test_target_update_hand_values_two_tasks():
    # C = EC(Phi) = [0.6, 0.7, 0.8]; Pi = 1 - (0.3 / C)(1 - Phi).
    pi = rescale_capacity(PHI, 0.3, 0.01).numpy()
    expected = 1 - (0.3 / np.array([0.6, 0.7, 0.8])) * (1 - PHI)
    np.testing.assert_allclose(pi, expected, rtol=1e-6)
    np.testing.assert_allclose(exclusive_capacity(pi), [0.3] * 3, rtol=1e-5)


def test_target_update_three_tasks_normalised_reading():
    # Two guests at 0.6: Algorithm 1's unnormalised C = 1 - 1.2 < 0 would
    # flip the sign of the update; the normalised EC is 0.4 and the target
    # reaches the scheduled EC exactly.
    phi = np.array([[0.99], [0.6], [0.6]], "float32")
    pi = rescale_capacity(phi, 0.2, 0.01).numpy()
    # The owner's 1 - 0.5 * 0.01 is clipped to 1 - eps.
    np.testing.assert_allclose(pi[:, 0], [0.99, 0.8, 0.8], rtol=1e-6)
    assert exclusive_capacity(pi).numpy() == pytest.approx([0.2], rel=1e-5)
    # A target more exclusive than Phi can hold is clipped at eps, not negative.
    clipped = rescale_capacity(phi, 0.99, 0.01).numpy()
    assert clipped.min() >= 0.01 and np.isfinite(clipped).all()


def test_target_update_reaches_every_capacity_where_clipping_binds():
    # C_i / C alone misses C_i where Pi clips (here by up to 0.1): every
    # channel's factor is found so that EC(Pi) = C_i exactly.
    rng = np.random.default_rng(0)
    phi = np.clip(rng.uniform(0, 1, (3, 300)), 0.01, 0.99).astype("float32")
    worst_closed_form = 0.0
    for capacity in (0.01, 0.05, 0.3, 0.7, 0.95, 0.99):
        pi = rescale_capacity(phi, capacity, 0.01).numpy()
        assert pi.min() >= 0.01 - 1e-7 and pi.max() <= 0.99 + 1e-7
        np.testing.assert_allclose(exclusive_capacity(pi), capacity, atol=1e-5)
        closed = np.clip(1 - capacity / exclusive_capacity(phi).numpy() * (1 - phi), 0.01, 0.99)
        worst_closed_form = max(worst_closed_form,
                                np.abs(exclusive_capacity(closed).numpy() - capacity).max())
        inside = ((closed > 0.01) & (closed < 0.99)).all(axis=0)  # nothing clipped
        np.testing.assert_allclose(pi[:, inside], closed[:, inside], rtol=1e-5, atol=1e-6)
    assert worst_closed_form > 0.05


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_target_update_at_the_exclusive_capacity_keeps_the_init(num_tasks, dtype):
    # Every schedule starts at C_i = 1 - eps. In float32 that is above the
    # 1 - eps any target reaches; the update once drove every probability
    # to eps, and task 0 became the owner of every channel.
    init = exclusive_init(num_tasks, 12, 0.01)
    capacity = tf.constant(0.99, dtype)
    pi = rescale_capacity(init, capacity, 0.01).numpy()
    np.testing.assert_allclose(pi, init, atol=1e-5)
    np.testing.assert_array_equal(pi.argmax(0), init.argmax(0))
    # Capacities out of [eps, 1 - eps] are those bounds.
    np.testing.assert_allclose(rescale_capacity(init, 1.0, 0.01).numpy(), init, atol=1e-5)
    np.testing.assert_allclose(exclusive_capacity(rescale_capacity(init, 0.0, 0.01)),
                               0.01, atol=1e-5)


def test_inference_is_identity_and_traces_no_random_op():
    layer = _mask(PHI)
    x = tf.random.normal((4, 3))
    np.testing.assert_array_equal(layer(x, tf.zeros(4, tf.int32), training=False), x)
    fn = tf.function(lambda x, t: layer(x, t, training=False))
    graph = fn.get_concrete_function(
        tf.TensorSpec((None, 3)), tf.TensorSpec((None,), tf.int32)).graph
    ops = {op.type for op in graph.get_operations()}
    assert not any("Random" in op or "Mul" == op for op in ops), ops


@pytest.mark.parametrize("sample_per", ["task", "example"])
def test_owner_always_uses_its_channel(sample_per):
    layer = _mask(np.array([[0.99, 0.01, 0.5], [0.01, 0.99, 0.4]], "float32"),
                  sample_per=sample_per, seed=1)
    task_ids = tf.constant([0, 1] * 200)
    out = _train(layer, tf.ones((400, 3)), task_ids)[0].numpy()
    assert (out[0::2, 0] == 1).all() and (out[1::2, 1] == 1).all()
    assert (out[0::2, 2] == 1).all()  # task 0 owns channel 2 (0.5 > 0.4)
    assert set(np.unique(out)) <= {0.0, 1.0}
    if sample_per == "example":  # guests sample at their probability
        assert out[1::2, 2].mean() == pytest.approx(0.4, abs=0.1)


def test_one_mask_per_task_per_step():
    layer = _mask(np.full((2, 8), 0.5, "float32"), seed=3)
    out = _train(layer, tf.ones((6, 8)), tf.constant([0, 0, 0, 1, 1, 1]))[0].numpy()
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[3], out[5])


def _toy_loss(masked):
    # A non-linear loss of the masked features, so the test needs the
    # estimator to be right beyond first order.
    return tf.square(tf.reduce_sum(masked * [1.0, -2.0, 0.5], -1) - 0.7)


def _exact_gradient(phi):
    """d/dPhi of sum_t E_{m ~ q(., t)} L(m), enumerating the 2^3 masks."""
    phi = tf.Variable(phi)
    with tf.GradientTape() as tape:
        owner = tf.one_hot(tf.argmax(phi, 0), 2, axis=0)
        total = 0.0
        for t in range(2):
            for bits in itertools.product([0.0, 1.0], repeat=3):
                m = tf.constant(bits)
                # The owner's mask is 1 with probability 1.
                prob = tf.reduce_prod(tf.where(
                    owner[t] > 0, m, tf.where(m > 0, phi[t], 1 - phi[t])))
                total += prob * _toy_loss(m[None])[0]
    return tape.gradient(total, phi).numpy()


def test_reinforce_matches_exact_gradient():
    rows = 40000
    layer = _mask(PHI, sample_per="example", beta=0.0, seed=7)
    task_ids = tf.constant([0, 1] * (rows // 2))
    with tf.GradientTape(persistent=True) as tape:
        masked, scope = _train(layer, tf.ones((rows, 3)), task_ids)
        row_losses = _toy_loss(masked)
        # Each task's rows average to its expected loss, as in MultiTaskModel.
        surrogate = scope.terms(row_losses, tf.fill([rows], 1.0 / (rows // 2)))
    estimate = tf.convert_to_tensor(tape.gradient(surrogate, layer.mask_probs)).numpy()
    # Standard error from the per-row score terms l_i (m - phi) / (phi (1 - phi)).
    m = masked.numpy()
    phi_rows = PHI[task_ids.numpy()]
    per_row = row_losses.numpy()[:, None] * (m - phi_rows) / (phi_rows * (1 - phi_rows))
    se = np.stack([per_row[task_ids.numpy() == t].std(0) for t in range(2)]) / np.sqrt(rows // 2)
    exact = _exact_gradient(PHI)
    assert np.all(np.abs(estimate - exact) <= 4 * se + 1e-6), (estimate, exact, se)
    assert np.abs(exact).max() > 0.1  # the test compares something non-trivial


def test_reinforce_surrogate_is_zero_in_value_and_baseline_tracks_loss():
    layer = _mask(PHI, baseline_decay=0.5, seed=2)
    task_ids = tf.constant([0, 0, 1, 1])
    _, scope = _train(layer, tf.ones((4, 3)), task_ids)
    # Each task's two rows weigh 1/2: the KL of each task counts once, and
    # the surrogate adds nothing to the value.
    terms = scope.terms(tf.constant([1.0, 3.0, 4.0, 4.0]), tf.fill([4], 0.5))
    kl = kl_divergence("bernoulli", PHI, layer.target_probs).numpy()
    assert float(terms) == pytest.approx(kl.sum(), rel=1e-6)
    np.testing.assert_allclose(layer.baseline.numpy(), [1.0, 2.0])  # 0.5 * mean


@pytest.mark.parametrize("distribution", ["gaussian", "gaussian_matched"])
def test_gaussian_gradients_flow_to_phi(distribution):
    layer = _mask(np.full((2, 4), 0.5, "float32"), distribution=distribution, seed=0)
    task_ids = tf.constant([0, 1] * 8)
    with tf.GradientTape() as tape:
        out, scope = _train(layer, tf.ones((16, 4)), task_ids)
        loss = tf.reduce_sum(tf.square(out))
    grad = tape.gradient(loss, layer.mask_probs).numpy()
    owner = np.array([[True] * 4, [False] * 4])  # ties: argmax picks task 0
    assert np.all(grad[owner] == 0) and np.all(np.abs(grad[~owner]) > 0)
    # No score function for the Gaussian: the terms are the KL alone, even
    # with large row losses.
    terms = scope.terms(tf.fill([16], 100.0), tf.fill([16], 1 / 8))
    assert float(terms) == pytest.approx(float(tf.reduce_sum(layer.kl_divergence())))


def test_serialises_in_a_functional_model(tmp_path):
    x = keras.Input((4, 4, 6))
    task_ids = keras.Input((), dtype="int32")
    y = ProgressiveMask(3, distribution="gaussian", beta=2.0, seed=5)(x, task_ids)
    model = keras.Model([x, task_ids], y)
    layer = model.layers[-1]
    layer.mask_probs.assign(np.full((3, 6), 0.3, "float32"))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    again = loaded.layers[-1]
    assert again.get_config() == layer.get_config()
    np.testing.assert_array_equal(again.mask_probs.numpy(), layer.mask_probs.numpy())


@pytest.mark.parametrize("kwargs, match", [
    ({"num_tasks": 1}, "at least 2 tasks"),
    ({"num_tasks": 2, "distribution": "beta"}, "distribution"),
    ({"num_tasks": 2, "eps": 0.6}, "eps"),
    ({"num_tasks": 2, "sample_per": "batch"}, "sample_per"),
    ({"num_tasks": 2, "baseline_decay": 1.0}, "baseline_decay"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveMask(**kwargs)


def test_training_outside_an_objective_step_fails_loudly():
    # A plain keras.Model's train_step would silently drop the KL and the
    # score function: the layer refuses to train there.
    layer = _mask(PHI)
    with pytest.raises(RuntimeError, match="ProgressiveMask.*tf_mtl.Model"):
        layer(tf.ones((2, 3)), tf.constant([0, 1]), training=True)


def test_projection_keeps_phi_in_range():
    layer = _mask(PHI)
    optimizer = keras.optimizers.SGD(10.0)
    optimizer.apply_gradients([(tf.constant([[-1.0, 1, 0], [1, -1, 0]]), layer.mask_probs)])
    phi = layer.mask_probs.numpy()
    assert phi.min() == pytest.approx(0.01) and phi.max() == pytest.approx(0.99)


def test_baseline_removes_the_loss_level_from_the_score():
    # A constant loss has zero true gradient; once the baseline holds it,
    # the score-function term gives exactly zero, whatever was sampled.
    layer = _mask(PHI, baseline_decay=0.9, beta=0.0, seed=4)
    layer.baseline.assign([2.5, 2.5])
    task_ids = tf.constant([0, 1] * 50)
    with tf.GradientTape() as tape:
        _, scope = _train(layer, tf.ones((100, 3)), task_ids)
        loss = scope.terms(tf.fill([100], 2.5), tf.fill([100], 0.02))
    np.testing.assert_array_equal(tape.gradient(loss, layer.mask_probs), 0.0)


def test_gaussian_mask_moments():
    phi = np.array([[0.99, 0.2], [0.5, 0.8]], "float32")
    layer = _mask(phi, distribution="gaussian", sample_per="example", seed=9)
    rows = 20000
    out = _train(layer, tf.ones((rows, 2)), tf.zeros(rows, tf.int32))[0].numpy()
    assert (out[:, 0] == 1).all()  # task 0 owns channel 0
    # Guest channel 1 of task 0: N(1, r(0.2)^2), r(0.2) = 2.
    assert out[:, 1].mean() == pytest.approx(1.0, abs=0.05)
    assert out[:, 1].std() == pytest.approx(2.0, rel=0.03)
    # Matched: the Bernoulli(0.2)'s mean 0.2 and std 0.4.
    matched = _mask(phi, distribution="gaussian_matched", sample_per="example", seed=9)
    out = _train(matched, tf.ones((rows, 2)), tf.zeros(rows, tf.int32))[0].numpy()
    assert (out[:, 0] == 1).all()
    assert out[:, 1].mean() == pytest.approx(0.2, abs=0.01)
    assert out[:, 1].std() == pytest.approx(0.4, rel=0.03)
