"""PCGrad (Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for
Multi-Task Learning", NeurIPS 2020, Algorithm 1)."""

import keras
import tensorflow as tf

from tf_mtl.aggregation.base import GramianAggregator


@keras.saving.register_keras_serializable(package="tf_mtl")
class PCGrad(GramianAggregator):
    """Projecting conflicting gradients.

    For each task i, over the other tasks j in a random order:

        if g_i^PC . g_j < 0:   g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j,

    starting from `g_i^PC = g_i`; the update is `sum_i g_i^PC`. Every
    `g_i^PC` is a combination of the task gradients, so the projections run
    on the Gram matrix (`g_i^PC . g_j = c_i . G[:, j]`) and the update is
    `sum_t c_t g_t`. A draw counter seeds the orders: a resumed run projects
    as an uninterrupted one, every replica alike.

    Args:
        seed: integer seed of the random orders.

    Example:

    >>> pcgrad = PCGrad()
    >>> pcgrad.build(2)
    >>> g = tf.constant([[1.0, 0.0], [-1.0, 1.0]])
    >>> pcgrad.aggregate(g, tf.matmul(g, g, transpose_b=True)).numpy()
    array([0.5, 1.5], dtype=float32)
    """

    def __init__(self, seed=0, **kwargs):
        super().__init__(seed=seed, **kwargs)

    def task_coefficients(self, gramian):
        num_tasks = gramian.shape[0]
        seed = self.next_seed()
        eye = tf.eye(num_tasks)
        total = tf.zeros([num_tasks])
        for i in range(num_tasks):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(num_tasks), tf.random.experimental.stateless_fold_in(seed, i))
            c = eye[i]
            for k in range(num_tasks):
                j = order[k]
                dot = tf.tensordot(c, gramian[:, j], 1)
                step = tf.math.divide_no_nan(dot, gramian[j, j])
                c -= tf.where((dot < 0) & (j != i), step, 0.0) * tf.gather(eye, j)
            total += c
        return total
