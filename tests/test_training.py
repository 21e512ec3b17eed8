"""Tests of `tf_mtl.training`: task-conditioned layers in a user's own Keras
model (`tf_mtl.Model`, built on `ConditionedTraining`)."""

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


# -- weightings and aggregators in a user's model ------------------------------


def _two_outputs(regularized=False):
    """A functional model with a shared trunk and two outputs, `a` and `b`."""
    x = keras.Input((6,))
    regularizer = keras.regularizers.L2(0.1) if regularized else None
    trunk = keras.layers.Dense(5, activation="tanh", kernel_regularizer=regularizer,
                               name="trunk")(x)
    outputs = {"b": keras.layers.Dense(1, name="head_b")(trunk),
               "a": keras.layers.Dense(3, name="head_a")(trunk)}
    return tf_mtl.Model(x, outputs)


def _two_task_data(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(ROWS, 6)).astype("float32")
    y = {"a": (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0), "b": x[:, 2:3] * 2}
    weights = {"a": rng.uniform(0.5, 2.0, ROWS).astype("float32"),
               "b": rng.uniform(0.5, 2.0, ROWS).astype("float32")}
    return tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(16)


LOSSES = {"a": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "b": "mse"}


def _compile_two(model, **objective):
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSSES,
                  loss_weights={"a": 1.0, "b": 3.0}, **objective)
    return model


def test_the_tasks_of_a_functional_model_are_its_outputs():
    model = _compile_two(_two_outputs(), weighting="dwa")
    assert model.task_names == ("a", "b")
    with pytest.raises(ValueError, match="subclassed model"):
        Subclassed().compile("sgd", loss="mse", aggregator="pcgrad")


def _hand_step(model, batch, combine):
    """The SGD(0.1) step `combine(task gradients of the trunk)`, every head
    on its task's gradient, every variable on the regulariser's: computed
    loss by loss from Keras' own losses."""
    x, y, weights = batch
    with tf.GradientTape(persistent=True) as tape:
        pred = model(x, training=True)
        losses = {
            "a": LOSSES["a"](y["a"], pred["a"], sample_weight=weights["a"]),
            "b": 3.0 * keras.losses.MeanSquaredError()(y["b"], pred["b"],
                                                       sample_weight=weights["b"])}
        rest = tf.add_n(model.losses)
    trunk = model.get_layer("trunk").trainable_variables
    task_grads = {t: tape.gradient(losses[t], trunk) for t in ("a", "b")}
    jacobian = tf.stack([tf.concat([tf.reshape(g, [-1]) for g in task_grads[t]], 0)
                         for t in ("a", "b")])
    update = combine(jacobian)
    expected = {}
    sizes = [int(tf.size(v)) for v in trunk]
    for v, u, r in zip(trunk, tf.split(update, sizes), tape.gradient(rest, trunk)):
        expected[v.path] = v - 0.1 * (tf.reshape(u, v.shape) + (0.0 if r is None else r))
    for t in ("a", "b"):
        for v, g in zip(model.get_layer(f"head_{t}").trainable_variables,
                        tape.gradient(losses[t], model.get_layer(f"head_{t}").trainable_variables)):
            expected[v.path] = v - 0.1 * g
    return expected, losses


@pytest.mark.parametrize("per_task_gradients", ["loop", "vectorized"])
def test_an_aggregator_acts_on_the_shared_trunk_as_computed_by_hand(per_task_gradients):
    model = _compile_two(_two_outputs(regularized=True), aggregator="pcgrad",
                         per_task_gradients=per_task_gradients)
    batch = next(iter(_two_task_data()))
    pcgrad = tf_mtl.aggregation.PCGrad(seed=0)
    pcgrad.build(2)
    expected, _ = _hand_step(
        model, batch, lambda j: pcgrad.aggregate(j, tf.matmul(j, j, transpose_b=True)))
    model.aggregator.draws.assign(0)
    model.train_step(batch)
    for v in model.trainable_variables:
        np.testing.assert_allclose(v.numpy(), expected[v.path].numpy(), atol=1e-6,
                                   err_msg=v.path)


def test_summed_task_gradients_are_keras_own_step():
    data = _two_task_data()
    plain, summed = _two_outputs(regularized=True), _two_outputs(regularized=True)
    summed.set_weights(plain.get_weights())
    _compile_two(plain)
    _compile_two(summed, aggregator=tf_mtl.aggregation.Sum())
    plain.fit(data, epochs=2, verbose=0)
    summed.fit(data, epochs=2, verbose=0)
    for a, b in zip(plain.weights, summed.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=a.path)


class Recorded(tf_mtl.weighting.Weighting):
    """Weights (1, 2); records the losses its update sees."""

    def build(self, num_tasks):
        super().build(num_tasks)
        self.seen = self.add_weight(shape=(num_tasks,), initializer="zeros",
                                    trainable=False, name="seen")

    def task_weights(self):
        return tf.constant([1.0, 2.0])

    def update(self, losses, weights, gramian=None):
        self.seen.assign(losses)
        return tf.constant(0.0)


def test_a_weighting_sees_each_output_loss_and_weights_the_objective():
    model = _compile_two(_two_outputs(regularized=True), weighting=Recorded())
    batch = next(iter(_two_task_data()))
    expected, losses = _hand_step(model, batch, lambda j: 1.0 * j[0] + 2.0 * j[1])
    for t in ("a", "b"):  # the heads on their weighted losses
        for v in model.get_layer(f"head_{t}").trainable_variables:
            expected[v.path] = v - (v - expected[v.path]) * (2.0 if t == "b" else 1.0)
    logs = model.train_step(batch)
    np.testing.assert_allclose(model.weighting.seen.numpy(),
                               [losses["a"].numpy(), losses["b"].numpy()], rtol=1e-5)
    for v in model.trainable_variables:
        np.testing.assert_allclose(v.numpy(), expected[v.path].numpy(), atol=1e-6,
                                   err_msg=v.path)
    assert float(logs["b_weight"]) == 2.0
    # Keras' per-output loss logs stay unweighted.
    np.testing.assert_allclose(float(logs["b_loss"]), losses["b"].numpy() / 3.0, rtol=1e-5)


def test_a_weighting_saves_and_reloads_with_the_model(tmp_path):
    model = _compile_two(_two_outputs(), weighting="uw", aggregator="cagrad")
    model.fit(_two_task_data(), epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.weighting) is type(model.weighting)
    assert type(loaded.aggregator) is type(model.aggregator)
    for a, b in zip(model.weighting.weights, loaded.weighting.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    model.fit(_two_task_data(1), epochs=1, verbose=0)
    loaded.fit(_two_task_data(1), epochs=1, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=a.path)


def test_auto_lambda_fits_its_weights_on_heldout_data():
    model = _compile_two(_two_outputs(), weighting=tf_mtl.weighting.AutoLambda(
        learning_rate=0.05))
    with pytest.raises(ValueError, match="heldout_data"):
        model.fit(_two_task_data(), epochs=1, verbose=0)
    model.fit(_two_task_data(), heldout_data=_two_task_data(1), epochs=2, verbose=0)
    assert not np.allclose(model.weighting.lambdas.numpy(), 0.1)


@pytest.mark.parametrize("objective, loss, message", [
    ({"aggregator": "pcgrad", "aggregate_on": "representation"}, LOSSES, "aggregate on"),
    ({"weighting": "dwa"}, keras.losses.MeanSquaredError(reduction="mean_with_sample_weight"),
     "linear in them"),
])
def test_objectives_a_model_cannot_take_are_refused_at_compile(objective, loss, message):
    with pytest.raises(ValueError, match=message):
        _two_outputs().compile("sgd", loss=loss, **objective)
