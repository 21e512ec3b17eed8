"""tf_mtl._keras: the private Keras APIs tf_mtl relies on still do what it
needs (the first tests to fail when a Keras upgrade moves one)."""

import inspect

import keras
import pytest

from tf_mtl import _keras
from tf_mtl.training import ConditionedTraining


def _nested():
    inner = keras.Sequential([keras.layers.Dense(3, name="d1"), keras.layers.Dense(2, name="d2")],
                             name="inner")
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(1, name="d3")],
                             name="outer")
    return outer, inner


def test_flatten_layers_walks_every_nested_layer_once():
    outer, _ = _nested()
    names = [layer.name for layer in _keras.flatten_layers(outer) if layer.name[0] != "i"
             or layer.name == "inner"]  # but the input layers
    assert names[0] == "outer" and sorted(names) == ["d1", "d2", "d3", "inner", "outer"]
    assert "outer" not in [l.name for l in _keras.flatten_layers(outer, include_self=False)]
    assert [l.name for l in _keras.flatten_layers(outer, recursive=False)
            if l.name[0] == "d"] == ["d3"]


def test_created_trainable_is_a_layers_own_variables_whatever_trainable_says():
    outer, inner = _nested()
    dense = inner.layers[0]
    dense.trainable = False
    assert [v.path for v in _keras.created_trainable(dense)] == [
        v.path for v in dense.weights]
    assert _keras.created_trainable(outer) == []  # its sublayers' are not its own


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_unlocked_tracking_lets_a_built_model_take_state_and_locks_again():
    model = _Subclassed()
    model(keras.ops.ones((1, 3)))
    assert model._tracker.locked
    extra = keras.layers.Dense(1)
    extra.build((None, 2))
    with pytest.raises(ValueError, match="state"):
        model.extra = extra
    with _keras.unlocked_tracking(model):
        model.extra = extra
    assert model._tracker.locked
    assert any(v is extra.kernel for v in model.weights)


def test_the_trainer_privates_tf_mtl_overrides_or_reads_are_there():
    assert issubclass(_keras.Functional, keras.Model)
    parameters = inspect.signature(keras.Model._maybe_symbolic_build).parameters
    assert {"iterator", "data_batch"} <= set(parameters)
    assert "_maybe_symbolic_build" in vars(ConditionedTraining)
    model, _ = _nested()
    model.compile(optimizer="sgd", loss="mse")
    assert isinstance(model._loss_tracker, keras.metrics.Mean)
    assert "training" in inspect.signature(keras.Model.compute_loss).parameters


def test_the_version_checked_is_the_pinned_one():
    with open("requirements.txt") as f:
        pinned = next(line.split("==")[1].strip() for line in f if line.startswith("keras=="))
    assert _keras.KERAS_VERSION_CHECKED == pinned == keras.__version__, (
        "Keras moved: re-check every entry of tf_mtl/_keras.py, then its version")
