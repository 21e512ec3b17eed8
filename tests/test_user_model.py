"""Task-conditioned layers in a user's own Keras model (`tf_mtl.Model`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mtl
from tf_mtl.callbacks import ExclusiveCapacityScheduler
from tf_mtl.layers import (
    ProgressiveMask,
    TaskBatchNormalization,
    TaskConditioned,
    objective_scope,
)

ROWS = 64


def _data(seed=0, sample_weight=False):
    """`((x, task_ids), y)`: each row belongs to one of two tasks."""
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(ROWS, 6)).astype("float32")
    task_ids = (np.arange(ROWS) % 2).astype("int32")
    y = ((x[:, 0] > 0) + (x[:, 1] > 0) * (1 + task_ids)).astype("int32") % 3
    arrays = ((x, task_ids), y)
    if sample_weight:
        arrays += (rng.uniform(0.5, 2.0, ROWS).astype("float32"),)
    return tf.data.Dataset.from_tensor_slices(arrays).batch(16)


def _layers(mask):
    x = keras.Input((6,))
    task_ids = keras.Input((), dtype="int32")
    h = mask(keras.layers.Dense(8)(x), task_ids)
    h = keras.layers.ReLU()(TaskBatchNormalization()(h, task_ids))
    return [x, task_ids], keras.layers.Dense(3)(h)


def _compile(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def test_functional_model_trains_phi_with_its_objective_and_scheduler():
    mask = ProgressiveMask(2, seed=1, name="mask")
    model = _compile(tf_mtl.Model(*_layers(mask)))
    before = mask.mask_probs.numpy().copy()
    scheduler = ExclusiveCapacityScheduler(3, "linear")
    model.fit(_data(), epochs=3, verbose=0, callbacks=[scheduler])
    assert not np.allclose(mask.mask_probs.numpy(), before)
    assert mask.draws.numpy() == 3 * 4  # one draw per step
    assert [round(h["ec_target"], 2) for h in scheduler.history] == [0.99, 0.5, 0.01]
    # Phi is trained by its own SGD, not by the model's Adam.
    assert mask.dedicated_optimizer()[0].iterations.numpy() == 12
    assert all(v is not mask.mask_probs for v in model.optimizer._trainable_variables)


def test_plain_keras_model_fails_at_the_first_step_instead_of_dropping_the_objective():
    model = _compile(keras.Model(*_layers(ProgressiveMask(2))))
    with pytest.raises(RuntimeError, match="tf_mtl.Model"):
        model.fit(_data(), epochs=1, verbose=0)


class Probe(TaskConditioned):
    """Records the row losses and weights its objective receives."""

    def build(self, x_shape, task_ids_shape=None):
        self.seen = self.add_weight(shape=(2, 16), initializer="zeros",
                                    trainable=False, name="seen")

    def call(self, x, task_ids, training=None):
        if training:
            self.record(task_ids)
        return x

    def objective_terms(self, task_ids, row_losses, row_weights):
        self.seen.assign(tf.stack([row_losses, row_weights]))
        return tf.constant(0.0)


@pytest.mark.parametrize("sample_weight", [False, True])
def test_row_losses_and_weights_are_read_exactly_from_the_compiled_loss(sample_weight):
    probe = Probe()
    model = tf_mtl.Model(*_layers(probe))
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batch = next(iter(_data(sample_weight=sample_weight)))
    model.train_step(batch)
    (x, task_ids), y = batch[:2]
    weights = batch[2].numpy() if sample_weight else np.ones(16, "float32")
    per_row = keras.losses.sparse_categorical_crossentropy(
        y, model((x, task_ids), training=False), from_logits=True).numpy()
    seen_losses, seen_weights = probe.seen.numpy()
    np.testing.assert_allclose(seen_weights, weights / 16, rtol=1e-6)
    # The probe saw the training pass (batch statistics), so compare it with
    # a training-mode forward pass too.
    with objective_scope():
        logits = model((x, task_ids), training=True)
    train_rows = keras.losses.sparse_categorical_crossentropy(
        y, logits, from_logits=True).numpy()
    np.testing.assert_allclose(seen_losses, train_rows, rtol=1e-5)
    assert not np.allclose(per_row, train_rows)  # the test tells the two apart


def test_save_and_reload_keeps_state_and_every_optimizer(tmp_path):
    mask = ProgressiveMask(2, seed=3, name="mask")
    model = _compile(tf_mtl.Model(*_layers(mask)))
    model.fit(_data(), epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")  # safe mode
    assert type(loaded) is type(model)
    batch = next(iter(_data()))[0]
    np.testing.assert_allclose(loaded(batch), model(batch), rtol=1e-6)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    again = loaded.get_layer("mask")
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(mask.dedicated_optimizer()[0].variables,
                    again.dedicated_optimizer()[0].variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # Both continue alike.
    model.fit(_data(1), epochs=1, verbose=0)
    loaded.fit(_data(1), epochs=1, verbose=0)
    np.testing.assert_allclose(loaded.get_layer("mask").mask_probs, mask.mask_probs,
                               rtol=1e-6)


class Subclassed(tf_mtl.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)
        self.mask = ProgressiveMask(2, seed=0)
        self.norm = TaskBatchNormalization()
        self.head = keras.layers.Dense(3)

    def call(self, inputs, training=None):
        x, task_ids = inputs
        h = self.mask(self.dense(x), task_ids, training=training)
        return self.head(keras.ops.relu(self.norm(h, task_ids, training=training)))


def test_subclassed_model_trains_its_masks():
    model = _compile(Subclassed())
    model((np.zeros((2, 6), "float32"), np.zeros(2, "int32")))
    before = model.mask.mask_probs.numpy().copy()
    model.fit(_data(), epochs=1, verbose=0)
    assert model.conditioned_layers == [model.mask]
    assert not np.allclose(model.mask.mask_probs.numpy(), before)
