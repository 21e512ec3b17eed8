"""Batch normalisation that keeps the tasks of a routed batch apart."""

import keras
import tensorflow as tf

from tf_mtl.layers.base import tiled_tasks


# The backbones' and heads' momentum: Keras' default 0.99 leaves a third of
# the initial statistics after 100 steps, too slow for runs of a few hundred
# steps per epoch.
NORM_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="tf_mtl")
class TaskBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalisation whose training statistics are each task's own.

    The papers run one forward pass per task (MPPS 4.4, Maximum Roaming 3);
    a task-routed batch runs them as one. Plain batch normalisation after a
    task-conditioned layer would pool the rows of every task into one mean
    and variance, so task t's output, loss and score-function gradient would
    depend on the other tasks' masks. Called with `task_ids` in training,
    this layer normalises the rows of task t with the moments of those rows
    alone,

        y_i = gamma * (x_i - mu_t) / sqrt(var_t + epsilon) + beta,  t = task of row i,

    exactly what a pass of task t on its own computes, and leaves the moving
    statistics where T such passes, in task order, would:

        m <- momentum^n m + sum_t (1 - momentum) momentum^(k_t) mu_t,

    over the n tasks present in the batch, k_t of them after t. Without
    `task_ids`, at inference, or when frozen, it is Keras'
    `BatchNormalization` (one set of moving statistics serves every task).

    Example:

    >>> x = keras.Input((4, 4, 8))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> y = TaskBatchNormalization()(x, task_ids)
    """

    def add_weight(self, *args, **kwargs):
        # The moving statistics: under tf.distribute each replica's update is
        # averaged over the replicas, so every replica (and worker) keeps the
        # same statistics, where Keras leaves each with its own shard's.
        if not kwargs.get("trainable", True):
            kwargs.setdefault("aggregation", "mean")
        return super().add_weight(*args, **kwargs)

    def call(self, inputs, task_ids=None, training=None, mask=None):
        if task_ids is None or not training or not self.trainable:
            return super().call(inputs, training=training, mask=mask)
        if (mask is not None or self.renorm or self.synchronized
                or self.axis not in (-1, len(inputs.shape) - 1)):
            raise ValueError(
                f"{self.name}: per-task statistics need channels last and no "
                "`mask`, `renorm` or `synchronized`."
            )
        x = tf.cast(inputs, tf.float32)
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else None
        beta = tf.cast(self.beta, tf.float32) if self.center else None
        blocks = tiled_tasks()
        if blocks is not None:  # each task's block on its own: no gathers
            parts, moments, mean, variance, present = block_moments(x, blocks, max(blocks) + 1)
            outputs = tf.concat([tf.nn.batch_normalization(p, m, v, beta, gamma, self.epsilon)
                                 for p, (m, v) in zip(parts, moments)], axis=0)
        else:
            task_ids = tf.cast(task_ids, tf.int32)
            mean, variance, present = task_moments(x, task_ids, tf.reduce_max(task_ids) + 1)
            outputs = normalize(x, task_ids, mean, variance, self.epsilon)
            outputs = outputs * (1.0 if gamma is None else gamma) + (0.0 if beta is None else beta)
        self._update_moving(mean, variance, present)
        return tf.cast(outputs, self.compute_dtype)

    def _update_moving(self, mean, variance, present):
        """T successive momentum updates, one per present task, in closed form."""
        present = tf.cast(present, tf.float32)
        after = tf.cumsum(present, exclusive=True, reverse=True)
        decay = self.momentum ** after * (1.0 - self.momentum) * present
        keep = self.momentum ** tf.reduce_sum(present)
        for moving, value in ((self.moving_mean, mean), (self.moving_variance, variance)):
            moving.assign(keep * moving + tf.reduce_sum(decay[:, None] * value, 0))


def block_moments(x, blocks, num_tasks):
    """Tiled rows, block k of task `blocks[k]` (`tiled_rows`): the blocks,
    each block's moments, and every task's mean and variance `(T, C)` (any
    block's where the task has none) and which tasks have rows, `(T,)`."""
    parts = tf.split(x, len(blocks))
    axes = list(range(len(x.shape) - 1))
    moments = [tf.nn.moments(p, axes) for p in parts]
    block_of = [blocks.index(t) if t in blocks else 0 for t in range(num_tasks)]
    mean, variance = (tf.stack([moments[k][i] for k in block_of]) for i in (0, 1))
    return parts, moments, mean, variance, tf.constant([t in blocks for t in range(num_tasks)])


def task_moments(x, task_ids, num_tasks):
    """Each task's batch mean and (biased) variance over its rows and the
    spatial axes, `(T, C)` each, and which tasks have rows, `(T,)`."""
    spatial = list(range(1, len(x.shape) - 1))
    per_row = tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]), tf.float32)
    counts = tf.math.unsorted_segment_sum(
        tf.ones_like(task_ids, tf.float32), task_ids, num_tasks) * per_row

    def task_mean(values):  # (N, ..., C) -> (T, C)
        rows = tf.reduce_sum(values, spatial) if spatial else values
        return tf.math.unsorted_segment_sum(rows, task_ids, num_tasks) / tf.maximum(
            counts, 1.0)[:, None]

    mean = task_mean(x)
    variance = task_mean(tf.square(x - broadcast_rows(tf.gather(mean, task_ids), len(spatial))))
    return mean, variance, counts > 0


def normalize(x, task_ids, mean, variance, epsilon):
    """`(x_i - mean[t_i]) / sqrt(variance[t_i] + epsilon)`."""
    spatial = len(x.shape) - 2
    return (x - broadcast_rows(tf.gather(mean, task_ids), spatial)) * broadcast_rows(
        tf.gather(tf.math.rsqrt(variance + epsilon), task_ids), spatial)


def broadcast_rows(per_row, spatial_dims):
    """`(N, C)` -> `(N, 1, ..., 1, C)` to broadcast over the spatial axes."""
    return tf.reshape(per_row, [-1] + [1] * spatial_dims + [per_row.shape[-1]])
