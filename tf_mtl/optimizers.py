"""Optimizers and learning-rate schedules of `train.py`, and weight decay as
the papers' PyTorch code applies it.

Keras' `weight_decay` is decoupled (AdamW: `w <- w - lr * wd * w` beside the
Adam step). PyTorch's `Adam(weight_decay=wd)` and `SGD(weight_decay=wd)`,
which the reference implementations of the papers use, add an L2 gradient
instead, `g <- g + wd * w`, which then goes through Adam's moments: under
Adam the two differ (the L2 term is rescaled per parameter by 1/sqrt(v)).
"""

import keras


class L2WeightDecay:
    """Mixed into a Keras optimizer: `g <- g + l2 * w` for every variable it
    updates, before its update rule (PyTorch's `weight_decay`).

    Args:
        l2: the coefficient, >= 0.
    """

    def __init__(self, *args, l2=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not l2 >= 0:
            raise ValueError(f"`l2` must be >= 0. Received: l2={l2}")
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        gradient = keras.ops.cast(gradient, variable.dtype)
        super().update_step(gradient + self.l2 * variable, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


@keras.saving.register_keras_serializable(package="tf_mtl")
class AdamL2(L2WeightDecay, keras.optimizers.Adam):
    """Adam with PyTorch's L2 weight decay (`L2WeightDecay`).

    Example:

    >>> optimizer = AdamL2(1e-4, l2=1e-5)
    """


@keras.saving.register_keras_serializable(package="tf_mtl")
class SGDL2(L2WeightDecay, keras.optimizers.SGD):
    """SGD with PyTorch's L2 weight decay (`L2WeightDecay`).

    Example:

    >>> optimizer = SGDL2(0.05, momentum=0.8, l2=1e-4)
    """


SCHEDULES = ("constant", "step", "cosine")


def learning_rate(rate, schedule, epochs, steps_per_epoch, decay_epochs=100.0,
                  decay_rate=0.5):
    """`rate` over training, a function of the optimizer's step count (which
    a checkpoint keeps: a resumed run goes on where it was).

    Args:
        rate: the initial learning rate.
        schedule: `"constant"`; `"step"`, times `decay_rate` every
            `decay_epochs` epochs; `"cosine"`, decayed to 0 at the last step.
        epochs, steps_per_epoch: the length of training.

    >>> round(float(learning_rate(0.1, "step", 4, 10, decay_epochs=2)(20)), 6)
    0.05
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {SCHEDULES}. Received: {schedule!r}")
    if schedule == "constant":
        return rate
    if steps_per_epoch < 1:
        raise ValueError(f"The {schedule} schedule needs the number of steps per epoch. "
                         f"Received: steps_per_epoch={steps_per_epoch}")
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(rate, epochs * steps_per_epoch)
    every = max(1, round(decay_epochs * steps_per_epoch))
    # Keras' schedule keeps a boundary's step on the earlier rate; step k
    # (from 0) is the first of a decayed epoch.
    boundaries = [k - 1 for k in range(every, epochs * steps_per_epoch, every)]
    if not boundaries:  # Keras' piecewise schedule needs one
        return rate
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [rate * decay_rate ** k for k in range(len(boundaries) + 1)])


def build(name, rate, momentum=0.9, weight_decay=0.0, weight_decay_mode="decoupled"):
    """`"adam"` or `"sgd"` (with `momentum`) at `rate`, with `weight_decay`
    decoupled (Keras' AdamW) or as PyTorch's L2 gradient (`"l2"`)."""
    if name not in ("adam", "sgd"):
        raise ValueError(f"`name` must be 'adam' or 'sgd'. Received: {name!r}")
    if weight_decay_mode not in ("decoupled", "l2"):
        raise ValueError("`weight_decay_mode` must be 'decoupled' or 'l2'. "
                         f"Received: {weight_decay_mode!r}")
    sgd = {"momentum": momentum} if name == "sgd" else {}
    if weight_decay and weight_decay_mode == "l2":
        return (SGDL2 if sgd else AdamL2)(rate, l2=weight_decay, **sgd)
    decay = {"weight_decay": weight_decay} if weight_decay else {}
    return (keras.optimizers.SGD if sgd else keras.optimizers.Adam)(rate, **sgd, **decay)
