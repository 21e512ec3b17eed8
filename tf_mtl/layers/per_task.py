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

from tf_mtl.layers.base import TaskConditioned
from tf_mtl.layers.routes import tiled_tasks
from tf_mtl.layers.passing import (
    check_passing,
    matrix_size,
    neutral_matrix,
    pass_weights,
)
from tf_mtl.layers.task_batch_norm import task_normalization, update_task_statistics


def per_task(x, task_ids, num_tasks, apply):
    """`apply(t, rows_of_task_t)` on each task's rows, stitched back in order
    (split and concatenated where the rows are tiled, `tiled_tasks`)."""
    blocks = tiled_tasks(num_tasks)
    if blocks is not None:
        return tf.concat([apply(t, part) for t, part in
                          zip(blocks, tf.split(x, len(blocks)))], axis=0)
    task_ids = tf.cast(task_ids, tf.int32)
    parts = tf.dynamic_partition(x, task_ids, num_tasks)
    rows = tf.dynamic_partition(tf.range(tf.shape(x)[0]), task_ids, num_tasks)
    return tf.dynamic_stitch(rows, [_never_empty(apply, t, part) for t, part in enumerate(parts)])


def _never_empty(apply, task, rows):
    """`apply(task, rows)` on one zero row more, sliced off: a task may have
    no row in a batch, and oneDNN's convolution of an empty batch returns
    the input's shape (graph optimisations drop a reshape restating it)."""
    zero = tf.zeros(tf.concat([[1], tf.shape(rows)[1:]], axis=0), rows.dtype)
    # A gather, not a slice: the bi-level step differentiates this twice, and
    # the second derivative of a slice of dynamic length mis-shapes.
    return tf.gather(apply(task, tf.concat([rows, zero], axis=0)),
                     tf.range(tf.shape(rows)[0]))


class PerTaskLayer(TaskConditioned):
    """Base of the per-task layers: T, and parameter passing.

    With `passing` (`"layer"` or `"channel"`, `tf_mtl.layers.passing`), the
    layer holds a passing matrix A and computes with the passed weights
    `W' = W A` of the weights it names in `passed_weights`; A starts at
    passing nothing and trains with its own plain SGD (the paper's adjacent
    learning, lr `passing_learning_rate`). `set_back()` writes `W'` into W
    and resets A. `tf_mtl.callbacks.ParameterPassing` schedules which of W
    and A train. One A passes every weight of the layer (kernel and bias,
    gamma and beta), or, `passing_per_tensor`, each has its own, as in the
    reference code; `passing_matrix` is the first weight's (the kernel's,
    gamma's), `passing_matrices` all of them.

    Args:
        num_tasks: T.
        passing: None, `"layer"` (A is T x T) or `"channel"` ((C T) x (C T)).
        passing_variant: `"linear"`, `"residual"` or `"nonlinear"`.
        passing_learning_rate: A's plain SGD (0.1 in the paper, B.2);
            channel-wise, its steps are divided by C (`tf_mtl.layers.
            passing.channel_step_scale`).
        passing_per_tensor: one A per passed weight instead of one per layer.
    """

    passed_weights = ()

    def __init__(self, num_tasks, passing=None, passing_variant="linear",
                 passing_learning_rate=0.1, passing_per_tensor=False, **kwargs):
        super().__init__(**kwargs)
        if int(num_tasks) < 1:
            raise ValueError(f"`num_tasks` must be >= 1. Received: {num_tasks}")
        if passing is not None:
            check_passing(passing, passing_variant, passing_learning_rate)
        self.num_tasks = int(num_tasks)
        self.passing, self.passing_variant = passing, passing_variant
        self.passing_learning_rate = float(passing_learning_rate)
        self.passing_per_tensor = bool(passing_per_tensor)
        # Made here, not in `build`: Keras may build a layer in a stateless
        # scope, where no optimizer could create its step count.
        self._passing_optimizer = (keras.optimizers.SGD(self.passing_learning_rate)
                                   if passing else None)
        self._serving = None  # the weights a deployment serves

    def _build_passing(self, channels):
        if self.passing is None:
            return
        neutral = neutral_matrix(self.passing_variant,
                                 matrix_size(self.passing, self.num_tasks, channels))
        names = [n for n in self.passed_weights if getattr(self, n) is not None]
        # Attribute names, not a dict of variables: Keras would track it.
        self._matrix_names = {n: "passing_matrix" for n in names}
        if self.passing_per_tensor:
            self._matrix_names.update({n: f"passing_matrix_{n}" for n in names[1:]})
        for attribute in dict.fromkeys(self._matrix_names.values()):
            setattr(self, attribute, self.add_weight(
                shape=neutral.shape, name=attribute, autocast=False,
                initializer=lambda shape, dtype=None: neutral))

    @property
    def passing_matrices(self):
        """Every passing matrix of the layer: one, or one per passed weight."""
        return [getattr(self, a) for a in dict.fromkeys(self._matrix_names.values())]

    def _neutral(self):
        return neutral_matrix(self.passing_variant, self.passing_matrix.shape[0])

    def passes_nothing(self):
        """Whether every A is at its start (set back): `W' = W`."""
        return all(np.array_equal(m.numpy(), self._neutral()) for m in self.passing_matrices)

    def weight(self, name):
        """Weight `name` as the layer computes with it: passed, if it is."""
        value = getattr(self, name)
        if self.passing is None or value is None or name not in self.passed_weights:
            return value
        if self._serving is not None:  # deployed: no passing matrix in the graph
            return self._serving.get(name, value)
        return self._passed(name)

    def deployment(self):
        """Serves `W'`, folded now into constants (none when A passes
        nothing: W itself); no passing matrix in a deployed graph."""
        folded = {} if self.passing is None or self.passes_nothing() else {
            name: tf.constant(self.weight(name)) for name in self._matrix_names}
        return _Serving(self, folded)

    def _passed(self, name):
        # In float32 (A is float32 state), then in the weight's own dtype.
        value = tf.convert_to_tensor(getattr(self, name))
        matrix = getattr(self, self._matrix_names[name])
        passed = pass_weights(tf.cast(value, tf.float32), tf.cast(matrix, tf.float32),
                              self.passing, self.passing_variant)
        return tf.cast(passed, value.dtype)

    def set_back(self):
        """`W <- W'` for every passed weight, then A passes nothing (eq. 7):
        the layer computes what it did."""
        passed = {n: self._passed(n) for n in self._matrix_names}
        for name, value in passed.items():
            getattr(self, name).assign(value)
        for matrix in self.passing_matrices:
            matrix.assign(self._neutral())

    def dedicated_optimizer(self):
        if self._passing_optimizer is None:
            return None
        if not self._passing_optimizer.built:  # plain SGD: no slot to create
            self._passing_optimizer.build(self.passing_matrices)
        return self._passing_optimizer, self.passing_matrices

    def get_config(self):
        config = {**super().get_config(), "num_tasks": self.num_tasks}
        if self.passing is not None:
            config.update(passing=self.passing, passing_variant=self.passing_variant,
                          passing_learning_rate=self.passing_learning_rate,
                          passing_per_tensor=self.passing_per_tensor)
        return config


@keras.saving.register_keras_serializable(package="tf_mtl")
class PerTaskDense(PerTaskLayer):
    """A dense layer per task: `y_i = activation(x_i W[t_i] + b[t_i])`.

    `kernel` is `(T, in, units)`, `bias` `(T, units)`.

    Example:

    >>> x = keras.Input((16,))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> y = PerTaskDense(num_tasks=3, units=8)(x, task_ids)
    """

    passed_weights = ("kernel", "bias")

    def __init__(self, num_tasks, units, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", kernel_regularizer=None, **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, x_shape, task_ids_shape=None):
        self.kernel = self.add_weight(
            shape=(self.num_tasks, x_shape[-1], self.units), name="kernel",
            initializer=_per_task_initializer(self.kernel_initializer),
            regularizer=self.kernel_regularizer)
        self.bias = self.add_weight(shape=(self.num_tasks, self.units), name="bias",
                                    initializer="zeros") if self.use_bias else None
        self._build_passing(self.units)

    def call(self, x, task_ids, training=None):
        kernel, bias = self.weight("kernel"), self.weight("bias")

        def dense(t, rows):
            y = tf.matmul(rows, tf.cast(kernel[t], rows.dtype))
            return y + tf.cast(bias[t], y.dtype) if self.use_bias else y

        return self.activation(per_task(x, task_ids, self.num_tasks, dense))

    def compute_output_shape(self, x_shape, task_ids_shape=None):
        return tuple(x_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer)}


@keras.saving.register_keras_serializable(package="tf_mtl")
class PerTaskConv2D(PerTaskLayer):
    """A 2-D convolution per task: row i is convolved with `W[t_i]`.

    `kernel` is `(T, kh, kw, in, filters)`, `bias` `(T, filters)`; channels
    last. `dilation_rate` is Keras' (atrous convolution, stride 1).

    Example:

    >>> x = keras.Input((8, 8, 3))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> y = PerTaskConv2D(num_tasks=2, filters=4, kernel_size=3)(x, task_ids)
    """

    passed_weights = ("kernel", "bias")

    def __init__(self, num_tasks, filters, kernel_size, strides=1, padding="valid",
                 use_bias=True, kernel_initializer="glorot_uniform", kernel_regularizer=None,
                 dilation_rate=1, **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.filters = int(filters)
        self.kernel_size = _pair(kernel_size)
        self.strides = _pair(strides)
        self.dilation_rate = _pair(dilation_rate)
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError("`strides` > 1 is incompatible with `dilation_rate` > 1. "
                             f"Received: strides={strides}, dilation_rate={dilation_rate}")
        if padding not in ("valid", "same"):
            raise ValueError(
                f"`padding` must be 'valid' or 'same'. Received: padding={padding!r}")
        self.padding = padding
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, x_shape, task_ids_shape=None):
        self.kernel = self.add_weight(
            shape=(self.num_tasks, *self.kernel_size, x_shape[-1], self.filters),
            name="kernel", initializer=_per_task_initializer(self.kernel_initializer),
            regularizer=self.kernel_regularizer)
        self.bias = self.add_weight(shape=(self.num_tasks, self.filters), name="bias",
                                    initializer="zeros") if self.use_bias else None
        self._build_passing(self.filters)

    def call(self, x, task_ids, training=None):
        kernel, bias = self.weight("kernel"), self.weight("bias")

        def conv(t, rows):
            y = tf.nn.conv2d(rows, tf.cast(kernel[t], rows.dtype), self.strides,
                             self.padding.upper(), dilations=self.dilation_rate)
            return y + tf.cast(bias[t], y.dtype) if self.use_bias else y

        return per_task(x, task_ids, self.num_tasks, conv)

    def compute_output_shape(self, x_shape, task_ids_shape=None):
        spatial = []
        for size, k, s, d in zip(x_shape[1:3], self.kernel_size, self.strides,
                                 self.dilation_rate):
            k = (k - 1) * d + 1
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
                "dilation_rate": self.dilation_rate,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer)}


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

    passed_weights = ("gamma", "beta")  # the moving statistics stay each task's own

    def __init__(self, num_tasks, momentum=0.99, epsilon=1e-3, **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    def build(self, x_shape, task_ids_shape=None):
        shape = (self.num_tasks, x_shape[-1])
        for name, init, trainable in [("gamma", "ones", True), ("beta", "zeros", True),
                                      ("moving_mean", "zeros", False),
                                      ("moving_variance", "ones", False)]:
            # float32 under mixed precision too, like Keras' BatchNormalization;
            # moving statistics averaged over replicas (`TaskBatchNormalization`).
            setattr(self, name, self.add_weight(
                shape=shape, name=name, initializer=init, trainable=trainable,
                autocast=False, aggregation="none" if trainable else "mean"))
        self._build_passing(x_shape[-1])

    def call(self, x, task_ids, training=None):
        update = bool(training and self.trainable)
        statistics = None if update else (self.moving_mean, self.moving_variance)
        y = task_normalization(tf.cast(x, tf.float32), task_ids, self.num_tasks,
                               self.weight("gamma"), self.weight("beta"), self.epsilon,
                               statistics, self._update_moving)
        return tf.cast(y, self.compute_dtype)

    def _update_moving(self, mean, variance, present):
        update_task_statistics(self.moving_mean, self.moving_variance, mean, variance,
                               present, self.momentum)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum,
                "epsilon": self.epsilon}


class _Serving:
    """Inside, `layer` serves the weights `folded` names (`deployment`)."""

    def __init__(self, layer, folded):
        self.layer, self.folded, self.previous = layer, folded, []

    def __enter__(self):
        self.previous.append(self.layer._serving)
        self.layer._serving = self.folded

    def __exit__(self, *exc):
        self.layer._serving = self.previous.pop()
