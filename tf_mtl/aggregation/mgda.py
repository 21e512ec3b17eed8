"""MGDA-UB (Sener and Koltun, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS 2018)."""

import keras

from tf_mtl.aggregation.base import GramianAggregator
from tf_mtl.aggregation.simplex import min_norm_on_simplex


@keras.saving.register_keras_serializable(package="tf_mtl")
class MGDA(GramianAggregator):
    """The multiple-gradient descent algorithm: the min-norm point of the
    convex hull of the task gradients,

        alpha = argmin_{alpha in simplex} || sum_t alpha_t g_t ||^2   (eq. 3),

    a common descent direction of every task (0 at a Pareto-stationary
    point), solved exactly on the Gram matrix by Wolfe's min-norm-point
    algorithm (`min_norm_on_simplex`): the paper's Frank-Wolfe (Algorithm
    2) stops short of an optimum on a face of the simplex. On the
    shared representation (`aggregate_on="representation"`) this is
    MGDA-UB, the paper's upper bound (eq. 7 and Theorem 1): the gradients
    of Z, not of every shared parameter. No gradient normalisation (the
    paper's code offers some; LibMTL's default is none too).
    """

    def task_coefficients(self, gramian):
        return min_norm_on_simplex(gramian)
