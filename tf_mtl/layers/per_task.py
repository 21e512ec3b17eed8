"""Layers that hold one set of weights per task (DESIGN.md, per-task weights).

SMTL's private encoders, PPNet's passed layers, MTAN's attention modules and
Cross-stitch's columns all keep one copy of a layer per task. Here the
copies are one weight with a leading task axis, `W[t]`, and the layer is
called on a task-routed batch, `layer(x, task_ids)`: row i uses `W[task_ids[i]]`.
A method that mixes the copies (PPNet's passing matrix) acts on that axis.

The rows of each task go through their task's weights in one partitioned
computation: `dynamic_partition` by task (a split, where the rows are tiled),
one matmul / convolution per task on its rows, `dynamic_stitch` back. The FLOPs are those of one layer on all the
rows, whatever the layout (tiled jointly labelled rows, or the data's own
task ids), and no task's rows ever meet another task's weights.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_mtl.layers.base import TaskConditioned, tiled_tasks
from tf_mtl.layers.task_batch_norm import (
    block_moments,
    broadcast_rows,
    normalize,
    task_moments,
)


def per_task(x, task_ids, num_tasks, apply):
    """`apply(t, rows_of_task_t)` on each task's rows, stitched back in order
    (split and concatenated where the rows are tiled, `tiled_rows`)."""
    blocks = tiled_tasks(num_tasks)
    if blocks is not None:
        return tf.concat([apply(t, part) for t, part in
                          zip(blocks, tf.split(x, len(blocks)))], axis=0)
    task_ids = tf.cast(task_ids, tf.int32)
    parts = tf.dynamic_partition(x, task_ids, num_tasks)
    rows = tf.dynamic_partition(tf.range(tf.shape(x)[0]), task_ids, num_tasks)
    return tf.dynamic_stitch(rows, [apply(t, part) for t, part in enumerate(parts)])


class PerTaskLayer(TaskConditioned):
    """Base of the per-task layers: T, and the config every one shares."""

    def __init__(self, num_tasks, **kwargs):
        super().__init__(**kwargs)
        if int(num_tasks) < 1:
            raise ValueError(f"`num_tasks` must be >= 1. Received: {num_tasks}")
        self.num_tasks = int(num_tasks)

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks}


@keras.saving.register_keras_serializable(package="tf_mtl")
class PerTaskDense(PerTaskLayer):
    """A dense layer per task: `y_i = activation(x_i W[t_i] + b[t_i])`.

    `kernel` is `(T, in, units)`, `bias` `(T, units)`.

    Example:

    >>> x = keras.Input((16,))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> y = PerTaskDense(num_tasks=3, units=8)(x, task_ids)
    """

    def __init__(self, num_tasks, units, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, x_shape, task_ids_shape=None):
        self.kernel = self.add_weight(
            shape=(self.num_tasks, x_shape[-1], self.units), name="kernel",
            initializer=_per_task_initializer(self.kernel_initializer))
        self.bias = self.add_weight(shape=(self.num_tasks, self.units), name="bias",
                                    initializer="zeros") if self.use_bias else None

    def call(self, x, task_ids, training=None):
        def dense(t, rows):
            y = tf.matmul(rows, tf.cast(self.kernel[t], rows.dtype))
            return y + tf.cast(self.bias[t], y.dtype) if self.use_bias else y

        return self.activation(per_task(x, task_ids, self.num_tasks, dense))

    def compute_output_shape(self, x_shape, task_ids_shape=None):
        return tuple(x_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@keras.saving.register_keras_serializable(package="tf_mtl")
class PerTaskConv2D(PerTaskLayer):
    """A 2-D convolution per task: row i is convolved with `W[t_i]`.

    `kernel` is `(T, kh, kw, in, filters)`, `bias` `(T, filters)`; channels
    last.

    Example:

    >>> x = keras.Input((8, 8, 3))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> y = PerTaskConv2D(num_tasks=2, filters=4, kernel_size=3)(x, task_ids)
    """

    def __init__(self, num_tasks, filters, kernel_size, strides=1, padding="valid",
                 use_bias=True, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.filters = int(filters)
        self.kernel_size = _pair(kernel_size)
        self.strides = _pair(strides)
        if padding not in ("valid", "same"):
            raise ValueError(
                f"`padding` must be 'valid' or 'same'. Received: padding={padding!r}")
        self.padding = padding
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, x_shape, task_ids_shape=None):
        self.kernel = self.add_weight(
            shape=(self.num_tasks, *self.kernel_size, x_shape[-1], self.filters),
            name="kernel", initializer=_per_task_initializer(self.kernel_initializer))
        self.bias = self.add_weight(shape=(self.num_tasks, self.filters), name="bias",
                                    initializer="zeros") if self.use_bias else None

    def call(self, x, task_ids, training=None):
        def conv(t, rows):
            y = tf.nn.conv2d(rows, tf.cast(self.kernel[t], rows.dtype),
                             self.strides, self.padding.upper())
            # oneDNN's convolution of an empty batch (a task with no rows)
            # returns the input's channels: restate the output shape.
            _, height, width, _ = self.compute_output_shape(tuple(rows.shape))
            if height is not None and width is not None:
                y = tf.reshape(y, [-1, height, width, self.filters])
            return y + tf.cast(self.bias[t], y.dtype) if self.use_bias else y

        return per_task(x, task_ids, self.num_tasks, conv)

    def compute_output_shape(self, x_shape, task_ids_shape=None):
        spatial = []
        for size, k, s in zip(x_shape[1:3], self.kernel_size, self.strides):
            if size is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append(-(-size // s))
            else:
                spatial.append((size - k) // s + 1)
        return (x_shape[0], *spatial, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "strides": self.strides,
                "padding": self.padding, "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


def _pair(value):
    return (int(value),) * 2 if isinstance(value, int) else tuple(int(v) for v in value)


def _per_task_initializer(initializer):
    """Initialises each task's copy as a layer of its own would be: the fans
    of one copy, not of the stack, and a seed of its own."""
    config = initializer.get_config()

    def initialize(shape, dtype=None):
        seeds = np.random.randint(2**31 - 1, size=shape[0])  # set_random_seed fixes them
        return tf.stack([type(initializer)(**{**config, "seed": int(seed)})(shape[1:], dtype)
                         for seed in seeds])

    return initialize


@keras.saving.register_keras_serializable(package="tf_mtl")
class PerTaskBatchNormalization(PerTaskLayer):
    """Batch normalisation per task: each task's own gamma, beta and moving
    statistics, `(T, C)` each, and each task's own batch statistics in
    training (as `TaskBatchNormalization`):

        y_i = gamma[t] * (x_i - mu_t) / sqrt(var_t + epsilon) + beta[t],
        m[t] <- momentum * m[t] + (1 - momentum) * mu_t   (tasks with rows),

    and the moving statistics of the row's task at inference. Channels last.

    Example:

    >>> x = keras.Input((8, 8, 4))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> y = PerTaskBatchNormalization(num_tasks=2)(x, task_ids)
    """

    def __init__(self, num_tasks, momentum=0.99, epsilon=1e-3, **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    def build(self, x_shape, task_ids_shape=None):
        shape = (self.num_tasks, x_shape[-1])
        for name, init, trainable in [("gamma", "ones", True), ("beta", "zeros", True),
                                      ("moving_mean", "zeros", False),
                                      ("moving_variance", "ones", False)]:
            setattr(self, name, self.add_weight(shape=shape, name=name, initializer=init,
                                                trainable=trainable))

    def call(self, x, task_ids, training=None):
        x32 = tf.cast(x, tf.float32)
        update = bool(training and self.trainable)
        blocks = tiled_tasks(self.num_tasks)
        if blocks is not None:
            y = self._tiled(x32, blocks, update)
        else:
            y = self._routed(x32, tf.cast(task_ids, tf.int32), update)
        return tf.cast(y, self.compute_dtype)

    def _routed(self, x, task_ids, update):
        """Rows of any tasks, in any order: statistics by segment sums."""
        if update:
            mean, variance, present = task_moments(x, task_ids, self.num_tasks)
            self._update_moving(mean, variance, present)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        spatial = len(x.shape) - 2
        y = normalize(x, task_ids, mean, variance, self.epsilon)
        return y * broadcast_rows(tf.gather(self.gamma, task_ids), spatial) + broadcast_rows(
            tf.gather(self.beta, task_ids), spatial)

    def _tiled(self, x, blocks, update):
        """Tiled rows (block k of task `blocks[k]`): each block normalised
        on its own, no gathers."""
        if update:
            parts, moments, mean, variance, present = block_moments(x, blocks, self.num_tasks)
            self._update_moving(mean, variance, present)
        else:
            parts = tf.split(x, len(blocks))
            moments = [(self.moving_mean[t], self.moving_variance[t]) for t in blocks]
        return tf.concat([tf.nn.batch_normalization(p, mean, variance, self.beta[t],
                                                    self.gamma[t], self.epsilon)
                          for p, (mean, variance), t in zip(parts, moments, blocks)], axis=0)

    def _update_moving(self, mean, variance, present):
        """Each task with rows: `m[t] <- momentum m[t] + (1 - momentum) mu_t`."""
        keep = tf.where(present[:, None], self.momentum, 1.0)
        for moving, value in ((self.moving_mean, mean), (self.moving_variance, variance)):
            moving.assign(keep * moving + (1.0 - keep) * value)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum,
                "epsilon": self.epsilon}
