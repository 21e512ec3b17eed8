"""Cross-stitch units: Misra, Shrivastava, Gupta and Hebert, "Cross-stitch
Networks for Multi-task Learning" (CVPR 2016)."""

import keras
import numpy as np
import tensorflow as tf

from tf_mtl.layers.base import TaskConditioned
from tf_mtl.layers.routes import tiled_tasks


@keras.saving.register_keras_serializable(package="tf_mtl")
class CrossStitch(TaskConditioned):
    """Mixes the activations of the T task columns (eq. 1 of the paper, for
    T tasks):

        x~_t = sum_s alpha[t, s] x_s,

    row by row: `x_s` is task s's activation of the same example. Row t of
    the learned T x T matrix `alpha` starts at `same` on the diagonal and
    `(1 - same) / (T - 1)` elsewhere (the paper's {alpha_S, alpha_D} =
    {0.9, 0.1} for two tasks: each column starts mostly its own).

    The one place a model may mix rows of different tasks, because the
    method is that mixing: it needs every task's row of every example, so
    it runs on jointly labelled rows tiled over all T tasks
    (`tf_mtl.layers.routes.Tiled`), as the columns of `methods.cross_stitch`
    give it.

    Args:
        num_tasks: T (>= 2).
        same: alpha_S, the initial weight of a column's own activation.

    Example:

    >>> from tf_mtl import backbones
    >>> from tf_mtl.layers import CrossStitch
    >>> columns = backbones.lenet(num_tasks=2)  # one column per task
    >>> layers = [columns[0], CrossStitch(2), columns[1], CrossStitch(2)]
    """

    float32_state = True

    def __init__(self, num_tasks, same=0.9, **kwargs):
        super().__init__(**kwargs)
        if int(num_tasks) < 2:
            raise ValueError(f"Cross-stitch mixes the columns of several tasks: "
                             f"`num_tasks` must be >= 2. Received: {num_tasks}")
        if not 0.0 <= same <= 1.0:
            raise ValueError(f"`same` (alpha_S) must be in [0, 1]. Received: {same}")
        self.num_tasks, self.same = int(num_tasks), float(same)

    def build(self, x_shape, task_ids_shape=None):
        t = self.num_tasks
        start = np.full((t, t), (1.0 - self.same) / (t - 1), "float32")
        np.fill_diagonal(start, self.same)
        self.alpha = self.add_weight(shape=(t, t), name="alpha",
                                     initializer=lambda shape, dtype=None: start)

    def call(self, x, task_ids, training=None):
        blocks = tiled_tasks(self.num_tasks)
        if blocks is None or sorted(blocks) != list(range(self.num_tasks)):
            raise ValueError(
                f"CrossStitch {self.name!r} mixes every task's activation of an "
                "example: it runs on jointly labelled rows tiled over all "
                f"{self.num_tasks} tasks (tiled routing). Received rows of tasks "
                f"{blocks if blocks is not None else 'given by the data'}.")
        order = list(blocks)
        alpha = tf.gather(tf.gather(self.alpha, order), order, axis=1)
        columns = tf.reshape(x, tf.concat([[self.num_tasks, -1], tf.shape(x)[1:]], 0))
        mixed = tf.tensordot(alpha, columns, axes=1)
        return tf.reshape(mixed, tf.shape(x))

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "same": self.same}
