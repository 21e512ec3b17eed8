"""Weight decay as the papers' PyTorch code applies it.

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
