"""GradDrop (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai and Anguelov, "Just
Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
NeurIPS 2020)."""

import keras
import tensorflow as tf

from tf_mtl.aggregation.base import Aggregator


@keras.saving.register_keras_serializable(package="tf_mtl")
class GradDrop(Aggregator):
    """Gradient sign dropout: each coordinate keeps the gradients of one sign.

    Per coordinate, with the sign purity (eq. 1)

        P = (1 + sum_t g_t / sum_t |g_t|) / 2

    and `U ~ Uniform(0, 1)`, task t's gradient is kept where
    `(P > U and g_t > 0) or (P < U and g_t < 0)` and dropped elsewhere
    (eq. 2, leak 0); the update is the sum of the kept gradients. A
    coordinate is a parameter, or on the representation one activation of
    one example (the paper's per-activation purity without its sum over the
    batch). Not a combination of the task gradients: it needs the whole
    `(T, D)` matrix, and on the representation under `tf.distribute` its
    draws differ from one device's.

    Args:
        seed: integer seed of U.
    """

    def __init__(self, seed=0, **kwargs):
        super().__init__(seed=seed, **kwargs)

    def aggregate(self, jacobian, gramian):
        purity = 0.5 * (1.0 + tf.math.divide_no_nan(
            tf.reduce_sum(jacobian, 0), tf.reduce_sum(tf.abs(jacobian), 0)))
        u = tf.random.stateless_uniform(tf.shape(purity), self.next_seed())
        keep = ((purity > u) & (jacobian > 0)) | ((purity < u) & (jacobian < 0))
        return tf.reduce_sum(tf.where(keep, jacobian, 0.0), 0)
