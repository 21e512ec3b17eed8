"""Optimizers and learning-rate schedules of `train.py` (and its flags), and
weight decay as the papers' PyTorch code applies it.

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


def define_flags(flag_values=None):
    """absl flags of `train.py`: `--optimizer`, its learning rate and schedule,
    and weight decay (in `flag_values`, default absl's global ones)."""
    from absl import flags

    into = {"flag_values": flags.FLAGS if flag_values is None else flag_values}
    flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Optimizer (sgd: with --momentum).",
                      **into)
    flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.", lower_bound=1e-8, **into)
    flags.DEFINE_enum("lr_schedule", "constant", list(SCHEDULES),
                      "Learning rate over training: constant; step (times --lr_decay_rate "
                      "every --lr_decay_epochs); cosine (decayed to 0 at the last step).",
                      **into)
    flags.DEFINE_float("lr_decay_epochs", 100, "step schedule: epochs between two decays.",
                       lower_bound=1e-3, **into)
    flags.DEFINE_float("lr_decay_rate", 0.5, "step schedule: factor of each decay.",
                       lower_bound=0.0, **into)
    flags.DEFINE_float("weight_decay", 0.0, "Weight decay of the optimizer (see "
                       "--weight_decay_mode).", lower_bound=0.0, **into)
    flags.DEFINE_enum("weight_decay_mode", "decoupled", ["decoupled", "l2"],
                      "decoupled: Keras' (AdamW); l2: PyTorch's Adam and SGD, the papers' "
                      "code, which add weight_decay * w to the gradient "
                      "(tf_mtl.optimizers).", **into)
    flags.DEFINE_float("momentum", 0.9, "Momentum of --optimizer=sgd.", lower_bound=0.0,
                       upper_bound=0.999, **into)


def from_flags(flag_values, epochs, steps_per_epoch):
    """The optimizer the flags name, for `epochs` epochs of `steps_per_epoch`
    steps (a ValueError when a schedule needs them and `steps_per_epoch` is
    not positive)."""
    rate = learning_rate(flag_values.learning_rate, flag_values.lr_schedule, epochs,
                         steps_per_epoch, flag_values.lr_decay_epochs,
                         flag_values.lr_decay_rate)
    return build(flag_values.optimizer, rate, flag_values.momentum, flag_values.weight_decay,
                 flag_values.weight_decay_mode)
