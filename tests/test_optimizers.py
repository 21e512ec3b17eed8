"""tf_mtl.optimizers: PyTorch's L2 weight decay on Keras' optimizers, the
learning-rate schedules, and the flags that choose them."""

import keras
import numpy as np
import pytest
from absl import flags

from tf_mtl import optimizers
from tf_mtl.optimizers import AdamL2, SGDL2


@pytest.mark.parametrize("ours, keras_one", [
    (lambda: AdamL2(0.1, l2=0.5), lambda: keras.optimizers.Adam(0.1)),
    (lambda: SGDL2(0.1, momentum=0.8, l2=0.5), lambda: keras.optimizers.SGD(0.1, momentum=0.8)),
])
def test_the_decay_is_added_to_the_gradient_before_the_update(ours, keras_one):
    # PyTorch's weight_decay: the update of g + l2 * w, through the moments.
    w = keras.Variable(np.array([1.0, -2.0, 3.0], "float32"))
    reference = keras.Variable(w.numpy())
    optimizer, plain = ours(), keras_one()
    for step in range(3):
        g = np.array([0.3, 0.1, -0.2], "float32") * (step + 1)
        optimizer.apply_gradients([(g, w)])
        plain.apply_gradients([(g + 0.5 * reference.numpy(), reference)])
        np.testing.assert_allclose(w.numpy(), reference.numpy(), rtol=1e-6)


def test_serialises_and_refuses_a_negative_coefficient():
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(SGDL2(0.05, l2=1e-4)))
    assert isinstance(restored, SGDL2) and restored.l2 == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="`l2` must be >= 0"):
        AdamL2(l2=-1.0)


def test_learning_rate_schedules_follow_the_step_count():
    step = optimizers.learning_rate(0.1, "step", 5, 10, decay_epochs=2, decay_rate=0.5)
    cosine = optimizers.learning_rate(0.1, "cosine", 5, 10)
    rates = [float(step(s)) for s in (0, 19, 20, 39, 40, 49)]
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    np.testing.assert_allclose([float(cosine(0)), float(cosine(25)), float(cosine(50))],
                               [0.1, 0.05, 0.0], atol=1e-7)
    assert optimizers.learning_rate(0.1, "constant", 5, 0) == 0.1
    with pytest.raises(ValueError, match="steps per epoch"):
        optimizers.learning_rate(0.1, "cosine", 5, 0)
    with pytest.raises(ValueError, match="'exp'"):
        optimizers.learning_rate(0.1, "exp", 5, 10)



def test_flags_make_the_optimizer():
    flag_values = flags.FlagValues()
    optimizers.define_flags(flag_values)

    def made(*arguments, epochs=4):
        flag_values.unparse_flags()
        flag_values(["train.py", *arguments])
        return optimizers.from_flags(flag_values, epochs, steps_per_epoch=10)

    decoupled = made("--weight_decay=1e-4", "--optimizer=sgd")
    assert isinstance(decoupled, keras.optimizers.SGD)
    assert decoupled.weight_decay == pytest.approx(1e-4)
    adam_l2 = made("--weight_decay=1e-5", "--weight_decay_mode=l2", "--optimizer=adam")
    assert isinstance(adam_l2, AdamL2) and adam_l2.l2 == pytest.approx(1e-5)
    assert adam_l2.weight_decay is None
    sgd_l2 = made("--weight_decay=1e-4", "--weight_decay_mode=l2", "--optimizer=sgd",
                  "--momentum=0.8")
    assert sgd_l2.l2 == pytest.approx(1e-4) and sgd_l2.momentum == pytest.approx(0.8)
    cosine = made("--learning_rate=0.1", "--lr_schedule=cosine", epochs=5)
    assert isinstance(cosine._learning_rate, keras.optimizers.schedules.CosineDecay)
    assert cosine._learning_rate.decay_steps == 50
    with pytest.raises(ValueError, match="steps per epoch"):
        flag_values.unparse_flags()
        flag_values(["train.py", "--lr_schedule=step"])
        optimizers.from_flags(flag_values, 4, steps_per_epoch=-2)
