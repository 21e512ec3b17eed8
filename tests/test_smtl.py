"""SMTL and L-SMTL models (Safe MTL, eq. 1)."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import backbones, data, methods
from tf_mtl.tasks import classification

SHAPE = (28, 28, 1)
TASKS = [classification("task_0", 3), classification("task_1", 3)]
BACKBONE = functools.partial(backbones.lenet, 0.25)


def _dense(num_tasks=None):
    return [keras.layers.Flatten(), backbones.DenseUnit(16, num_tasks=num_tasks),
            backbones.DenseUnit(8, num_tasks=num_tasks)]


def _copy(source_layers, target_layers, task=None):
    """Copies a backbone's weights into a plain one; where a weight has a
    task axis the plain one lacks (a per-task twin's copies, per-task
    moving statistics), task `task`'s."""
    for source, target in zip(source_layers, target_layers, strict=True):
        target.set_weights([w[task] if w.ndim > v.ndim else w for w, v in
                            zip(source.get_weights(), target.get_weights(), strict=True)])


def _gates(model):
    from tf_mtl.layers import EncoderGate

    return [l for l in model.conditioned_layers if isinstance(l, EncoderGate)]


@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_gate_at_zero_is_stl_and_at_one_is_hard_sharing(alpha, after):
    model = methods.safe_sharing(BACKBONE, TASKS, SHAPE, gates_after_decoders=after)
    encoders = model.backbone[0]
    # Exactly 0 or 1 through the softmax of the soft gate.
    big = 1e9
    for gate in _gates(model):
        gate.logits.assign([[0.0, -big] if alpha else [-big, 0.0]] * gate.num_tasks)
    x = np.random.RandomState(0).rand(5, *SHAPE).astype("float32")
    outputs = model(x)
    for t, task in enumerate(TASKS):
        if alpha:  # HPS on the public encoder
            reference = methods.hard_sharing(BACKBONE(), [task], SHAPE)
            _copy(encoders.public, reference.backbone, task=t)
        else:  # STL on task t's private encoder
            reference = methods.single_task(BACKBONE(), task, SHAPE)
            _copy(encoders.private, reference.backbone, task=t)
        head = model.heads[task.name]
        if after:  # SMTL_c: the public or the private decoder
            head = head.public if alpha else head.private
        reference.heads[task.name].set_weights(head.get_weights())
        np.testing.assert_allclose(outputs[task.name], reference(x)[task.name],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lite, after, joint", [
    (False, False, True), (True, False, True), (False, False, False),
    (True, False, False), (False, True, True), (True, True, False)])
def test_trains_gates_and_encoders_on_both_layouts(lite, after, joint, tmp_path):
    from tf_mtl.callbacks import GateHistory

    ds = data.load("synthetic" if joint else "synthetic_groups", batch_size=32, limit=96)
    model = methods.safe_sharing(BACKBONE, TASKS, SHAPE, joint, lite=lite, seed=1,
                                 gates_after_decoders=after)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = GateHistory([t.name for t in TASKS])
    model.fit(ds.train, epochs=2, verbose=0, callbacks=[history])
    assert all(not np.allclose(g.logits.numpy(), 0.0) for g in _gates(model))
    probs = np.array(list(history.history[-1]["alpha"].values()))
    assert probs.shape == (2,) and np.all((probs > 0) & (probs < 1))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = next(iter(ds.test))[0]
    for name, out in model(x).items():
        np.testing.assert_allclose(loaded(x)[name], out, rtol=1e-5, err_msg=name)
    for a, b in zip(_gates(model), _gates(loaded), strict=True):
        np.testing.assert_array_equal(a.logits, b.logits)


@pytest.mark.parametrize("lite, after", [(False, False), (True, False), (True, True)])
def test_export_serves_every_task_from_one_graph_without_flex_ops(lite, after, tmp_path):
    from tf_mtl import export

    model = methods.safe_sharing(BACKBONE, TASKS, SHAPE, lite=lite, seed=0,
                                 gates_after_decoders=after)
    for gate in _gates(model):
        gate.logits.assign(tf.random.normal(gate.logits.shape))
    saved, tflite = export.export(model, str(tmp_path))
    x = np.random.RandomState(1).rand(3, *SHAPE).astype("float32")
    expected = model(x, training=False)
    ops = export.graph_op_types(saved)
    assert not ops & {"DynamicPartition", "DynamicStitch"}
    interpreter = tf.lite.Interpreter(model_path=tflite)  # no Flex delegate
    served = interpreter.get_signature_runner()(image=x)
    for name, out in expected.items():
        np.testing.assert_allclose(served[name], out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lite, bilevel", [(False, False), (True, False), (False, True)])
def test_mirrored_strategy_equals_one_device(lite, bilevel, mirrored_pair):
    # Dense encoders without batch normalisation: splitting a batch between
    # replicas changes nothing, and the lite gate's one draw per pass is the
    # same on every replica.
    keras.utils.set_random_seed(3)
    build = functools.partial(methods.safe_sharing, _dense, TASKS, SHAPE, lite=lite, seed=4,
                              bilevel=bilevel, virtual_learning_rate=0.1)
    single, distributed = mirrored_pair(build)
    ds = data.load("synthetic", batch_size=32, limit=96)
    heldout = {"heldout_data": ds.test} if bilevel else {}
    expected = single.fit(ds.validation, epochs=2, verbose=0, **heldout).history
    got = distributed.fit(ds.validation, epochs=2, verbose=0, **heldout).history
    for key in ("loss", "task_0_loss", "task_1_accuracy"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)
    for a, b in zip(single.weights, distributed.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=a.path)


@pytest.mark.parametrize("lite, after", [(True, False), (True, True), (False, False)])
def test_lite_export_keeps_only_the_chosen_encoders(lite, after, tmp_path):
    from tf_mtl import export

    model = methods.safe_sharing(BACKBONE, TASKS, SHAPE, lite=lite, seed=0,
                                 gates_after_decoders=after)
    for gate, logits in zip(_gates(model), ([[4.0, -4.0]] if not after else [[4.0], [-4.0]])):
        gate.logits.assign(logits if lite else [[0.3, -0.2], [-0.5, 0.1]])
    saved, tflite = export.export(model, str(tmp_path))
    x = np.random.RandomState(1).rand(3, *SHAPE).astype("float32")
    expected = model(x, training=False)
    served = tf.lite.Interpreter(model_path=tflite).get_signature_runner()(image=x)
    from_saved = tf.saved_model.load(saved).signatures["serving_default"](image=tf.constant(x))
    for name, out in expected.items():
        np.testing.assert_allclose(served[name], out, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(from_saved[name], out, rtol=1e-4, atol=1e-5)

    exported = sum(v.shape.num_elements() for v in tf.saved_model.load(saved).inference_variables)
    encoders = model.backbone[0]
    count = lambda layers: sum(w.shape.num_elements() for l in layers for w in l.weights)
    public, private = count(encoders.public), count(encoders.private)
    heads = [model.heads[t.name] for t in TASKS]
    if not lite:  # both encoders, every decoder, the gate
        assert exported == public + private + count(heads) + 4
        return
    # Task 0 chose the public encoder, task 1 its private one: one copy of T.
    if after:
        heads = [heads[0].public, heads[1].private]
    assert exported == public + private // len(TASKS) + count(heads)
    assert not export.graph_op_types(saved) & {"Greater", "Softmax", "Sigmoid"}


def _hyper_model(virtual_learning_rate):
    keras.utils.set_random_seed(5)
    model = methods.safe_sharing(_dense, TASKS, SHAPE, seed=1, bilevel=True,
                                 virtual_learning_rate=virtual_learning_rate)
    model.compile(optimizer="sgd")
    model.gates[0].logits.assign([[0.4, -0.3], [-0.2, 0.6]])
    return model


def test_bilevel_gate_gradient_is_the_derivative_through_the_virtual_step():
    ds = data.load("synthetic", batch_size=16, limit=16)
    train, heldout = next(iter(ds.train)), next(iter(ds.validation))
    xi = 0.5  # large, so that the second-order term shows
    model = _hyper_model(xi)
    gates = [g.logits for g in model.gates]
    network = [v for v in model.trainable_variables if v is not gates[0]]

    def heldout_loss_after_virtual_step(logits):
        """L_val(w - xi grad_w L_train(w, a), a), by assigning w'."""
        gates[0].assign(logits)
        with tf.GradientTape() as tape:
            loss = model.batch_objective(train, training=True)
        weights = [w.numpy() for w in network]
        for w, g in zip(network, tape.gradient(loss, network)):
            w.assign_sub(xi * g)
        value = float(model.batch_objective(heldout, training=True))
        for w, value_w in zip(network, weights):
            w.assign(value_w)
        return value

    logits = gates[0].numpy()
    exact = model._hypergradients(train, heldout, network, gates)[0].numpy()
    first = _hyper_model(0.0)  # the same weights
    first_gates = [g.logits for g in first.gates]
    first_order = first._hypergradients(train, heldout, [
        v for v in first.trainable_variables if v is not first_gates[0]], first_gates)[0]
    step = 1e-2
    numeric = np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        delta = np.zeros_like(logits)
        delta[index] = step
        numeric[index] = (heldout_loss_after_virtual_step(logits + delta)
                          - heldout_loss_after_virtual_step(logits - delta)) / (2 * step)
    np.testing.assert_allclose(exact, numeric, rtol=2e-2, atol=2e-4)
    # The virtual step matters at this xi: first order is off by more.
    assert np.abs(first_order.numpy() - numeric).max() > 10 * np.abs(exact - numeric).max()


def test_bilevel_fit_steps_gates_on_heldout_data_and_saves_their_optimizer(tmp_path):
    ds = data.load("synthetic", batch_size=32, limit=96)
    model = methods.safe_sharing(BACKBONE, TASKS, SHAPE, lite=True, seed=2, bilevel=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    with pytest.raises(ValueError, match="heldout_data"):
        model.fit(ds.train, epochs=1, verbose=0)
    gate, before = model.gates[0], model.gates[0].logits.numpy()
    model.fit(ds.train, heldout_data=ds.validation, epochs=2, verbose=0)
    assert not np.allclose(gate.logits.numpy(), before)
    assert int(model.gate_optimizer.iterations) == int(model.optimizer.iterations) == 6
    # The network's optimizer holds no slot of the gates.
    assert all("logits" not in v.path for v in model.optimizer.variables)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.bilevel and loaded.virtual_learning_rate == 1e-4
    for a, b in zip(model.gate_optimizer.variables, loaded.gate_optimizer.variables,
                    strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    plain = methods.safe_sharing(BACKBONE, TASKS, SHAPE)
    plain.compile()
    with pytest.raises(ValueError, match="bi-level"):
        plain.fit(ds.train, heldout_data=ds.validation, verbose=0)


def test_sequential_routing_trains_like_tiled_routing():
    # Sequential routing runs the private encoders one task at a time: each
    # task must still get its own twin's weights.
    ds = data.load("synthetic", batch_size=32, limit=64)
    models = [methods.safe_sharing(_dense, TASKS, SHAPE, routing=r) for r in ("tiled", "sequential")]
    models[1].set_weights(models[0].get_weights())
    for model in models:
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        model.fit(ds.train, epochs=1, verbose=0)
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="routing='sequential', bilevel=True"):
        methods.safe_sharing(_dense, TASKS, SHAPE, routing="sequential", bilevel=True)


def test_bilevel_mixed_precision_scales_the_gate_loss():
    ds = data.load("synthetic", batch_size=32, limit=64)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = methods.safe_sharing(_dense, TASKS, SHAPE, seed=1, bilevel=True)
        model.compile(optimizer="adam")
        before = model.gates[0].logits.numpy()
        model.fit(ds.train, heldout_data=ds.validation, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.gate_optimizer, keras.optimizers.LossScaleOptimizer)
    after = model.gates[0].logits.numpy()
    assert np.isfinite(after).all() and not np.allclose(after, before)


def test_bilevel_trains_on_data_not_jointly_labelled():
    # The second-order step differentiates the per-task partitions twice,
    # with a task absent from some batches.
    ds = data.load("synthetic_groups", batch_size=16, limit=48)
    model = methods.safe_sharing(BACKBONE, TASKS, SHAPE, jointly_labelled=False, seed=1,
                                 bilevel=True)
    model.compile(optimizer="adam")
    loss = model.fit(ds.train, heldout_data=ds.validation, epochs=1, verbose=0).history["loss"]
    assert np.isfinite(loss).all()


def test_gated_encoders_refuse_a_plain_call():
    encoders = methods.safe_sharing(BACKBONE, TASKS, SHAPE).backbone[0]
    with pytest.raises(ValueError, match="routes tasks in this mode"):
        encoders(np.zeros((1, *SHAPE), "float32"))
