"""Every private Keras API tf_mtl uses, in one place.

Checked against Keras 3.15.1 on TensorFlow 2.21.0 (`requirements.txt`);
`tests/test_keras_compat.py` fails first when an upgrade moves one. Each
entry names the public API that falls short:

| private use | where | why no public API does it |
|---|---|---|
| `Layer._flatten_layers` (`flatten_layers`) | conditioned layers, blocks, export, MR, PPNet | the only walk over nested layers: `Model.layers` is the top level alone |
| `Layer._trainable_variables` (`created_trainable`) | PPNet's phases | the variables a layer created trainable, whatever `trainable` says now |
| `Layer._tracker` (`unlocked_tracking`) | `ConditionedTraining.compile` | a built model refuses new state; the objective's is made at compile |
| `keras.src.models.functional.Functional` (`Functional`) | `tf_mtl.Model(inputs, outputs)` | `keras.Model.__new__` returns a plain `Functional`, which our training cannot be mixed into |
| `Trainer._maybe_symbolic_build` (overridden) | `ConditionedTraining` | keras-team/keras#19246: the first distributed batch is averaged over replicas of unequal rows |
| `Trainer._loss_tracker` (read, and set) | `ConditionedTraining`, `MultiTaskModel` | `fit`'s `loss` log is this tracker; a custom `train_step` updates it |

Dropped: `Trainer._compute_loss` (the public `compute_loss` with
`training=True`; an override of `compute_loss` must take `training`, as
Keras' has since 3.3) and `StrategyExtended._in_multi_worker_mode` (the
cluster's size, from the public `cluster_resolver`).
"""

import contextlib

from keras.src.models.functional import Functional

KERAS_VERSION_CHECKED = "3.15.1"

__all__ = ["Functional", "created_trainable", "flatten_layers", "unlocked_tracking"]


def flatten_layers(layer, include_self=True, recursive=True):
    """`layer` (if `include_self`) and the layers it holds, depth first."""
    return layer._flatten_layers(include_self=include_self, recursive=recursive)


def created_trainable(layer):
    """The variables `layer` itself created trainable (not its sublayers')."""
    return layer._trainable_variables


@contextlib.contextmanager
def unlocked_tracking(layer):
    """Lets a built `layer` take new state as attributes."""
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield
    finally:
        if locked:
            layer._tracker.lock()
