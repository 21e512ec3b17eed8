"""Equal weighting (EW): every task loss counts once."""

import keras

from tf_mtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="tf_mtl")
class EqualWeighting(Weighting):
    """`w_t = 1`: the objective is the sum of the task losses (MPPS eq. 1).

    What a model compiled without `weighting` trains; naming it logs the
    (constant) weights beside the other weightings'.
    """
