"""Batch normalisation that keeps the tasks of a routed batch apart."""

import keras
import tensorflow as tf

from tf_mtl.layers.base import TaskAware, broadcast_rows
from tf_mtl.layers.routes import tiled_tasks


# The backbones' and heads' momentum, the papers' PyTorch 0.1 in Keras'
# terms: Keras' default 0.99 leaves a third of the initial statistics after
# 100 steps, too slow for runs of a few hundred steps per epoch.
NORM_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="tf_mtl")
class TaskBatchNormalization(TaskAware, keras.layers.BatchNormalization):
    """Batch normalisation whose statistics are each task's own.

    The papers run one forward pass per task (MPPS 4.4, Maximum Roaming 3);
    a task-routed batch runs them as one. Plain batch normalisation after a
    task-conditioned layer would pool the rows of every task into one mean
    and variance, so task t's output, loss and score-function gradient would
    depend on the other tasks' masks. Called with `task_ids` in training,
    this layer normalises the rows of task t with the moments of those rows
    alone,

        y_i = gamma * (x_i - mu_t) / sqrt(var_t + epsilon) + beta,  t = task of row i,

    exactly what a pass of task t on its own computes. gamma and beta are
    shared. What inference normalises with depends on what each task's
    inference is:

    - `num_tasks=None` (default): one set of moving statistics serves every
      task, left where T passes in task order would leave it,

          m <- momentum^n m + sum_t (1 - momentum) momentum^(k_t) mu_t,

      over the n tasks present in the batch, k_t of them after t. For a
      method whose inference is one shared network (MPPS's fully shared
      backbone, where no row has a task). Without `task_ids`, at inference,
      or when frozen, the layer is then Keras' `BatchNormalization`.
    - `num_tasks=T`: each task keeps its own moving statistics, `(T, C)`,
      `m[t] <- momentum m[t] + (1 - momentum) mu_t` for the tasks with rows,
      and inference normalises row i with those of its task: for a method
      whose inference is per task (Maximum Roaming's partitions, MTAN's
      attention), whose task t then sees the statistics of its own training
      passes. Rows without `task_ids` (a shared stem, which every task's pass
      computes alike) update every task's statistics alike and are
      normalised at inference with their mean over the tasks.
      `MultiTaskModel` sets `num_tasks` on the layers of a backbone whose
      inference routes tasks.

    Where the rows are tiled (`tf_mtl.layers.routes.Tiled`) each task's
    block is normalised on its own, by static slices: no gathers, nothing
    TFLite needs Flex ops for.

    A `TaskAware` layer that routes nothing: it reads the rows' tasks where
    they have them and normalises rows without one as they are.

    Args:
        num_tasks: None (pooled moving statistics) or T (each task's own).
        **kwargs: of `keras.layers.BatchNormalization`.

    Example:

    >>> x = keras.Input((4, 4, 8))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> y = TaskBatchNormalization(num_tasks=2)(x, task_ids)
    """

    def __init__(self, num_tasks=None, **kwargs):
        super().__init__(**kwargs)
        if num_tasks is not None and int(num_tasks) < 1:
            raise ValueError(f"`num_tasks` must be None or >= 1. Received: num_tasks={num_tasks}")
        self.num_tasks = None if num_tasks is None else int(num_tasks)

    identity_unless_routing = False

    def routes_tasks(self, training):
        return False

    def keep_task_statistics(self, num_tasks):
        """Gives each of `num_tasks` tasks its own moving statistics (see
        the class docstring); before the layer is built."""
        if self.num_tasks == num_tasks:
            return
        if self.built:
            raise ValueError(f"{self.name}: per-task statistics must be set before the "
                             "layer is built.")
        self.num_tasks = int(num_tasks)

    def add_weight(self, *args, **kwargs):
        # The moving statistics: under tf.distribute each replica's update is
        # averaged over the replicas, so every replica (and worker) keeps the
        # same statistics, where Keras leaves each with its own shard's.
        if not kwargs.get("trainable", True):
            kwargs.setdefault("aggregation", "mean")
            if self.num_tasks is not None:
                kwargs["shape"] = (self.num_tasks, *kwargs["shape"])
        return super().add_weight(*args, **kwargs)

    def call(self, inputs, task_ids=None, training=None, mask=None):
        update = bool(training and self.trainable)
        if self.num_tasks is None and (task_ids is None or not update):
            return super().call(inputs, training=training, mask=mask)
        if (mask is not None or self.renorm or self.synchronized
                or self.axis not in (-1, len(inputs.shape) - 1)):
            raise ValueError(
                f"{self.name}: per-task statistics need channels last and no "
                "`mask`, `renorm` or `synchronized`."
            )
        x = tf.cast(inputs, tf.float32)
        ones = tf.ones(x.shape[-1:])
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else ones
        beta = tf.cast(self.beta, tf.float32) if self.center else 0.0 * ones
        if task_ids is None:
            outputs = self._untasked(x, update, gamma, beta)
        else:
            statistics = None if update else (self.moving_mean, self.moving_variance)
            outputs = task_normalization(x, task_ids, self.num_tasks, gamma, beta,
                                         self.epsilon, statistics, self._update_moving)
        return tf.cast(outputs, self.compute_dtype)

    def _untasked(self, x, update, gamma, beta):
        """Rows of no task with per-task statistics: they serve every task."""
        if update:
            mean, variance = tf.nn.moments(x, list(range(len(x.shape) - 1)))
            every = lambda value: tf.repeat(value[None], self.num_tasks, axis=0)
            self._update_moving(every(mean), every(variance), tf.ones(self.num_tasks, bool))
        else:
            mean = tf.reduce_mean(self.moving_mean, 0)
            variance = tf.reduce_mean(self.moving_variance, 0)
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, self.epsilon)

    def _update_moving(self, mean, variance, present):
        if self.num_tasks is not None:
            update_task_statistics(self.moving_mean, self.moving_variance, mean, variance,
                                   present, self.momentum)
            return
        # T successive momentum updates, one per present task, in closed form.
        present = tf.cast(present, tf.float32)
        after = tf.cumsum(present, exclusive=True, reverse=True)
        decay = self.momentum ** after * (1.0 - self.momentum) * present
        keep = self.momentum ** tf.reduce_sum(present)
        for moving, value in ((self.moving_mean, mean), (self.moving_variance, variance)):
            moving.assign(keep * moving + tf.reduce_sum(decay[:, None] * value, 0))

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks}


def task_normalization(x, task_ids, num_tasks, gamma, beta, epsilon, statistics=None,
                       update=None):
    """`gamma_t * (x_i - mu_t) / sqrt(var_t + epsilon) + beta_t` for every
    row i, t its task: the batch normalisation of each task's rows alone.

    Args:
        x: `(N, ..., C)` float32, channels last.
        task_ids: `(N,)`; unread where the rows are tiled (`tiled_tasks`),
            whose blocks are normalised by static slices instead.
        num_tasks: T, or None: the largest task id present, plus one.
        gamma, beta: `(C,)`, shared by the tasks, or `(T, C)`, each task's.
        statistics: `(mean, variance)`, `(T, C)` each, to normalise with
            (inference); None: each task's batch moments, handed to
            `update(mean, variance, present)` (training; `present`, `(T,)`,
            says which tasks have rows).
    """
    of_task = lambda value, t: value[t] if len(value.shape) == 2 else value
    blocks = tiled_tasks(num_tasks)
    if blocks is not None:
        if statistics is None:
            parts, moments, mean, variance, present = block_moments(
                x, blocks, num_tasks or max(blocks) + 1)
            update(mean, variance, present)
        else:
            parts = tf.split(x, len(blocks))
            moments = [(statistics[0][t], statistics[1][t]) for t in blocks]
        return tf.concat([
            tf.nn.batch_normalization(part, mean, variance, of_task(beta, t),
                                      of_task(gamma, t), epsilon)
            for part, (mean, variance), t in zip(parts, moments, blocks)], axis=0)
    task_ids = tf.cast(task_ids, tf.int32)
    if statistics is None:
        mean, variance, present = task_moments(
            x, task_ids, num_tasks or tf.reduce_max(task_ids) + 1)
        update(mean, variance, present)
    else:
        mean, variance = statistics
    spatial = len(x.shape) - 2
    of_row = lambda value: (broadcast_rows(tf.gather(value, task_ids), spatial)
                            if len(value.shape) == 2 else value)
    return normalize(x, task_ids, mean, variance, epsilon) * of_row(gamma) + of_row(beta)


def update_task_statistics(moving_mean, moving_variance, mean, variance, present, momentum):
    """Each task with rows: `m[t] <- momentum m[t] + (1 - momentum) mu_t`."""
    keep = tf.where(present[:, None], momentum, 1.0)
    for moving, value in ((moving_mean, mean), (moving_variance, variance)):
        moving.assign(keep * moving + (1.0 - keep) * value)


def block_moments(x, blocks, num_tasks):
    """Tiled rows, block k of task `blocks[k]` (`tiled_tasks`): the blocks,
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

