"""Every method under a mixed precision policy: it trains like float32 and
keeps its method state (masks, gates, partitions, passing matrices) float32."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import backbones, methods
from tf_mtl.data import synthetic
from tf_mtl.tasks import classification

TASKS = [classification("task_0", 3), classification("task_1", 3)]
SHAPE = (28, 28, 1)
LENET = functools.partial(backbones.lenet, 0.25)
BUILDERS = {
    "hps": lambda: methods.hard_sharing(LENET(), TASKS, SHAPE),
    "mpps": lambda: methods.progressive_sharing(LENET(), TASKS, SHAPE),
    "mpps_sequential": lambda: methods.progressive_sharing(LENET(), TASKS, SHAPE,
                                                           routing="sequential"),
    "mpps_gaussian": lambda: methods.progressive_sharing(
        LENET(), TASKS, SHAPE, distribution="gaussian_matched"),
    "smtl": lambda: methods.safe_sharing(LENET, TASKS, SHAPE),
    "lsmtl": lambda: methods.safe_sharing(LENET, TASKS, SHAPE, lite=True),
    "mr": lambda: methods.maximum_roaming(LENET(), TASKS, SHAPE),
    "ppnet": lambda: methods.parameter_passing(LENET, TASKS, SHAPE),
}
# Relative tolerance on the first step's loss: float16 keeps 11 bits of
# mantissa, bfloat16 8.
TOLERANCE = {"mixed_float16": 5e-3, "mixed_bfloat16": 3e-2}


@pytest.fixture
def policy_scope():
    def train(policy, build, weights):
        keras.mixed_precision.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            model = build()
            if weights is not None:
                model.set_weights(weights)
            model.compile(optimizer=keras.optimizers.SGD(0.05))
            x, labels = synthetic.make_synthetic(64, 2, 3, seed=0)
            data = tf.data.Dataset.from_tensor_slices((x, labels)).batch(32)
            initial = model.get_weights()
            logs = model.train_step(next(iter(data)))
            return model, initial, {k: float(v) for k, v in logs.items()}
        finally:
            keras.mixed_precision.set_dtype_policy("float32")

    return train


@pytest.mark.parametrize("method", sorted(BUILDERS))
@pytest.mark.parametrize("policy", sorted(TOLERANCE))
def test_a_step_under_mixed_precision_matches_float32(policy_scope, method, policy):
    reference, initial, logs = policy_scope("float32", BUILDERS[method], None)
    model, _, mixed_logs = policy_scope(policy, BUILDERS[method], initial)
    np.testing.assert_allclose(mixed_logs["loss"], logs["loss"], rtol=TOLERANCE[policy])
    assert all(v.dtype == "float32" for v in model.weights if "float" in v.dtype)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    # The method state computes in float32: its layers, not just its weights.
    for layer in model.conditioned_layers:
        if layer.float32_state:
            assert layer.compute_dtype == "float32", layer.name
    moved = [not np.array_equal(a, b) for a, b in zip(model.get_weights(), initial)]
    assert any(moved)


def test_a_step_whose_scaled_gradients_overflow_moves_no_method_state():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = BUILDERS["mpps"]()
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.05), initial_scale=2.0 ** 60))
        x, labels = synthetic.make_synthetic(32, 2, 3, seed=0)
        initial = model.get_weights()
        model.train_step((tf.constant(x), {k: tf.constant(v) for k, v in labels.items()}))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert float(model.optimizer.dynamic_scale) < 2.0 ** 60  # it overflowed
    phi = [v.path for v in model.trainable_variables if "mask_probs" in v.path]
    for variable, before in zip(model.weights, initial):
        if variable.trainable:  # the network's step and Phi's own SGD: both skipped
            np.testing.assert_array_equal(variable.numpy(), before, err_msg=variable.path)
    assert phi
