"""Random loss weighting (Lin, Ye, Xu, Shi and Zhang, "Reasonable
Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
TMLR 2022)."""

import keras
import tensorflow as tf

from tf_mtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="tf_mtl")
class RandomLossWeighting(Weighting):
    """RLW: fresh random weights every step, `w = softmax(eps)`,
    `eps ~ N(0, I_T)` (the paper's normal sampling, as in LibMTL).

    The weights sum to 1, not T: the objective is a random convex
    combination of the task losses. Draw i uses the stateless seed
    `(seed, i)`, with i a variable, so a resumed run draws what an
    uninterrupted one would, and every replica draws the same.

    Args:
        seed: integer seed of the draws.
    """

    def __init__(self, seed=0, **kwargs):
        super().__init__(seed=seed, **kwargs)

    def task_weights(self):
        eps = tf.random.stateless_normal([self.num_tasks], self.next_seed())
        return tf.nn.softmax(eps)
