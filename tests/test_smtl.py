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


def _copy(source_layers, target_layers, task=None):
    """Copies a backbone's weights into a plain one (task t's copies of a
    per-task twin when `task` is given)."""
    for source, target in zip(source_layers, target_layers, strict=True):
        weights = source.get_weights()
        target.set_weights([w[task] for w in weights] if task is not None else weights)


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
            _copy(encoders.public, reference.backbone)
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


@pytest.mark.parametrize("lite", [False, True])
def test_mirrored_strategy_equals_one_device(lite, mirrored):
    # Dense encoders without batch normalisation: splitting a batch between
    # replicas changes nothing, and the lite gate's one draw per pass is the
    # same on every replica.
    def dense(num_tasks=None):
        return [keras.layers.Flatten(), backbones.DenseUnit(16, num_tasks=num_tasks),
                backbones.DenseUnit(8, num_tasks=num_tasks)]

    keras.utils.set_random_seed(3)
    single = methods.safe_sharing(dense, TASKS, SHAPE, lite=lite, seed=4)
    with mirrored.scope():
        distributed = methods.safe_sharing(dense, TASKS, SHAPE, lite=lite, seed=4)
        distributed.set_weights(single.get_weights())
        distributed.compile(optimizer=keras.optimizers.SGD(0.1))
    single.compile(optimizer=keras.optimizers.SGD(0.1))
    ds = data.load("synthetic", batch_size=32, limit=96)
    expected = single.fit(ds.validation, epochs=2, verbose=0).history
    got = distributed.fit(ds.validation, epochs=2, verbose=0).history
    for key in ("loss", "task_0_loss", "task_1_accuracy"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)
    for a, b in zip(single.weights, distributed.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=a.path)
