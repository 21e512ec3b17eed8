"""EncoderGate: the SMTL soft gate and the L-SMTL Gumbel gate."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl.layers import EncoderGate

TASK_IDS = tf.constant([0, 1, 2, 0])


def _inputs():
    return (tf.random.stateless_normal((4, 5), seed=(1, 0)),
            tf.random.stateless_normal((4, 5), seed=(2, 0)))


def test_soft_gate_is_the_convex_combination_of_eq_1():
    gate = EncoderGate(3)
    public, private = _inputs()
    gate(public, private, TASK_IDS)
    gate.logits.assign([[0.0, 0.0], [1.0, -1.0], [-2.0, 0.5]])
    alpha = tf.nn.softmax(gate.logits, -1)[:, 0].numpy()
    np.testing.assert_allclose(alpha[:2], [0.5, 1 / (1 + np.exp(-2))], rtol=1e-6)
    expected = (alpha[TASK_IDS.numpy(), None] * public
                + (1 - alpha[TASK_IDS.numpy(), None]) * private)
    for training in (True, False):
        np.testing.assert_allclose(gate(public, private, TASK_IDS, training=training),
                                   expected, rtol=1e-6)


def test_hard_gate_is_exactly_binary_forward_with_a_gradient_backward():
    gate = EncoderGate(3, lite=True, tau=0.1, seed=0)
    public, private = _inputs()
    gate(public, private, TASK_IDS)
    with tf.GradientTape() as tape:
        mixed = gate(public, private, TASK_IDS, training=True)
        loss = tf.reduce_sum(mixed * tf.range(1.0, 6.0))
    rows = mixed.numpy()
    for i in range(4):  # each row is exactly one encoder's features
        assert (np.array_equal(rows[i], public[i]) or np.array_equal(rows[i], private[i]))
    grad = tape.gradient(loss, gate.logits).numpy()
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_hard_gate_draws_the_public_encoder_with_probability_s():
    gate = EncoderGate(3, lite=True, seed=5)
    gate.build((None, 1))
    gate.logits.assign(np.log([0.2 / 0.8, 1.0, 0.9 / 0.1]).astype("float32"))
    draw = tf.function(lambda: gate.public_weight(training=True))
    draws = np.array([draw().numpy() for _ in range(3000)])
    assert set(np.unique(draws)) == {0.0, 1.0}
    np.testing.assert_allclose(draws.mean(0), [0.2, 0.5, 0.9], atol=0.03)
    assert int(gate.draws.numpy()) == 3000  # the draw count is saved state


def test_hard_gate_at_inference_is_the_deterministic_choice():
    gate = EncoderGate(3, lite=True)
    public, private = _inputs()
    gate(public, private, TASK_IDS)
    gate.logits.assign([0.3, -0.2, 2.0])
    np.testing.assert_array_equal(gate.public_weight(), [1.0, 0.0, 1.0])
    out = gate(public, private, TASK_IDS, training=False).numpy()
    np.testing.assert_array_equal(out[1], private[1])
    np.testing.assert_array_equal(out[2], public[2])


@pytest.mark.parametrize("lite", [False, True])
def test_saves_and_reloads(lite, tmp_path):
    public, private = keras.Input((3,)), keras.Input((3,))
    task_ids = keras.Input((), dtype="int32")
    gate = EncoderGate(2, lite=lite, tau=0.5, seed=3, name="gate")
    model = keras.Model([public, private, task_ids], gate(public, private, task_ids))
    gate.logits.assign(gate.logits + 0.7)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras").get_layer("gate")
    assert loaded.get_config() == gate.get_config()
    np.testing.assert_array_equal(loaded.logits, gate.logits)
