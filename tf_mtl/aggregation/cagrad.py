"""CAGrad (Liu, Liu, Jin, Stone and Liu, "Conflict-Averse Gradient Descent for
Multi-task Learning", NeurIPS 2021)."""

import keras
import tensorflow as tf

from tf_mtl.aggregation.base import GramianAggregator
from tf_mtl.aggregation.simplex import min_on_simplex


@keras.saving.register_keras_serializable(package="tf_mtl")
class CAGrad(GramianAggregator):
    """Conflict-averse gradient: the direction in a ball around the average
    gradient `g_0` that most improves the worst task,

        d = argmax_{||d - g_0|| <= c ||g_0||}  min_t g_t . d      (eq. 4),

    through its dual (eq. 5): `w = argmin_{w in simplex} g_w . g_0 +
    c ||g_0|| ||g_w||`, `d = g_0 + (c ||g_0|| / ||g_w||) g_w`, everything
    from the Gram matrix (`||g_0||^2` is the mean of its entries). As in the
    authors' code the update is `d / (1 + c^2)` (their `rescale=1`), on the
    scale of the average gradient, not of the sum.

    Args:
        c: the radius of the ball relative to `||g_0||`; 0.5 in the paper's
            NYUv2 and Cityscapes experiments. `c = 0` is the average gradient.
    """

    def __init__(self, c=0.5, **kwargs):
        super().__init__(**kwargs)
        if not c >= 0:
            raise ValueError(f"`c` must be >= 0. Received: c={c}")
        self.c = float(c)

    def task_coefficients(self, gramian):
        num_tasks = tf.cast(tf.shape(gramian)[0], gramian.dtype)
        mean = tf.fill(tf.shape(gramian)[:1], 1.0 / num_tasks)
        radius = self.c * tf.sqrt(tf.reduce_mean(gramian) + 1e-20)
        w = min_on_simplex(gramian, mean, radius)
        gw_norm = tf.sqrt(tf.maximum(tf.tensordot(w, tf.linalg.matvec(gramian, w), 1), 0.0))
        return (mean + tf.math.divide_no_nan(radius, gw_norm) * w) / (1.0 + self.c ** 2)

    def get_config(self):
        return {**super().get_config(), "c": self.c}
