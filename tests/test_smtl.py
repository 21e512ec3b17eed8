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


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_gate_at_zero_is_stl_and_at_one_is_hard_sharing(alpha):
    model = methods.safe_sharing(BACKBONE, TASKS, SHAPE)
    encoders = model.backbone[0]
    # Exactly 0 or 1 through the softmax of the soft gate.
    big = 1e9
    encoders.gate.logits.assign([[0.0, -big]] * 2 if alpha else [[-big, 0.0]] * 2)
    x = np.random.RandomState(0).rand(5, *SHAPE).astype("float32")
    outputs = model(x)
    for t, task in enumerate(TASKS):
        if alpha:  # HPS on the public encoder
            reference = methods.hard_sharing(BACKBONE(), [task], SHAPE)
            _copy(encoders.public, reference.backbone)
        else:  # STL on task t's private encoder
            reference = methods.single_task(BACKBONE(), task, SHAPE)
            _copy(encoders.private, reference.backbone, task=t)
        reference.heads[task.name].set_weights(model.heads[task.name].get_weights())
        np.testing.assert_allclose(outputs[task.name], reference(x)[task.name],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lite", [False, True])
@pytest.mark.parametrize("joint", [True, False])
def test_trains_gates_and_encoders_on_both_layouts(lite, joint, tmp_path):
    ds = data.load("synthetic" if joint else "synthetic_groups", batch_size=32, limit=96)
    model = methods.safe_sharing(BACKBONE, TASKS, SHAPE, joint, lite=lite, seed=1)
    gate = model.backbone[0].gate
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(ds.train, epochs=2, verbose=0)
    assert not np.allclose(gate.logits.numpy(), 0.0)
    probs = gate.public_probs().numpy()
    assert probs.shape == (2,) and np.all((probs > 0) & (probs < 1))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = next(iter(ds.test))[0]
    for name, out in model(x).items():
        np.testing.assert_allclose(loaded(x)[name], out, rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(loaded.backbone[0].gate.logits, gate.logits)
