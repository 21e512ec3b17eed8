"""Uncertainty weighting (Kendall, Gal and Cipolla, "Multi-Task Learning Using
Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018)."""

import keras
import tensorflow as tf

from tf_mtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="tf_mtl")
class UncertaintyWeighting(Weighting):
    """UW: each task's homoscedastic uncertainty, learned with the network.

        objective = sum_t L_t / (2 sigma_t^2) + log sigma_t
                  = sum_t exp(-s_t) L_t / 2 + s_t / 2,   s_t = log sigma_t^2,

    Kendall et al.'s eq. (5) for every task (the form LibMTL uses; their
    eq. (10) for a classification task, `L_t / sigma_t^2 + log sigma_t`,
    has the same optimum, `w_t = 1 / (2 L_t)`). `s` is a trainable variable
    (zeros: `w_t = 1/2` at the start), trained by the model's optimizer
    through the objective itself.

    Usage, with `model` a `tf_mtl.MultiTaskModel`:

    ```python
    model.compile("adam", weighting=tf_mtl.weighting.UncertaintyWeighting())
    ```
    """

    def build(self, num_tasks):
        super().build(num_tasks)
        self.log_variances = self.add_weight(shape=(num_tasks,), name="log_variances",
                                             initializer="zeros")

    def task_weights(self):
        return tf.exp(-self.log_variances) / 2.0

    def update(self, losses, weights, gramian=None):
        return tf.reduce_sum(self.log_variances) / 2.0
