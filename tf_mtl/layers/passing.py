"""Parameter passing: per-task weights mixed by a passing matrix.

Zeng et al., "Multi-Task Parameter Passing Networks" (papers/004; equation
numbers are its supplement's). The per-task copies of a layer's weight,
stacked along the task axis of a per-task layer (`tf_mtl.layers.PerTaskDense`
and kin), are the columns of W (d x T), and passing is `W' = W A` (eq. 12):
task t's passed weights are `w'_t = sum_s A[s, t] w_s`, so column t of A says
what every task passes to task t.

- `"layer"` passing: one A of T x T per layer.
- `"channel"` passing: A of (C T) x (C T), C the output channels; W reshaped
  to (d_in, C T) with column `c * T + t` for output channel c of task t (the
  reference code's order), so `kron(eye(C), A_layer)` is layer passing. Its
  SGD steps at the rate over C (`channel_step_scale`).

Variants (appendix G and the reference code): `"linear"`, `W' = W A` with
A starting at I; `"residual"`, `W' = W + W A`, and `"nonlinear"`,
`W' = W + tanh(W A)`, both with A starting at 0. Either way the starting A
passes nothing: `W' = W` exactly.
"""

import numpy as np
import tensorflow as tf

from tf_mtl._keras import flatten_layers

PASSINGS = ("layer", "channel")
VARIANTS = ("linear", "residual", "nonlinear")


def check_passing(passing, variant, learning_rate):
    if passing not in PASSINGS:
        raise ValueError(f"`passing` must be one of {PASSINGS}. Received: passing={passing!r}")
    if variant not in VARIANTS:
        raise ValueError(f"`passing_variant` must be one of {VARIANTS}. "
                         f"Received: passing_variant={variant!r}")
    if not learning_rate > 0:
        raise ValueError("`passing_learning_rate` must be > 0. "
                         f"Received: passing_learning_rate={learning_rate}")


def passing_spec(passing="layer", variant="linear", learning_rate=0.1, conv_only=False,
                 per_tensor=False):
    """How a per-task twin passes its weights (`tf_mtl.backbones`): a dict
    that serialises with the blocks that hold it.

    Args:
        passing: `"layer"` or `"channel"`.
        variant: `"linear"`, `"residual"` or `"nonlinear"`.
        learning_rate: the passing matrices' plain SGD (0.1 in B.2);
            channel-wise, over C (`channel_step_scale`).
        conv_only: pass the convolution and dense weights only, not the
            normalisation's gamma and beta.
        per_tensor: one passing matrix per passed weight (kernel and bias,
            gamma and beta apart, as the reference code) instead of one per
            layer.
    """
    return check_spec({"passing": passing, "variant": variant,
                       "learning_rate": float(learning_rate), "conv_only": bool(conv_only),
                       "per_tensor": bool(per_tensor)})


def check_spec(spec):
    check_passing(spec["passing"], spec["variant"], spec["learning_rate"])
    return {"per_tensor": False, **spec}  # specs saved before it was an option


def layer_passing(spec, normalization=False):
    """The passing arguments of one per-task layer under `spec` (None: none)."""
    if spec is None or (normalization and spec["conv_only"]):
        return {}
    return {"passing": spec["passing"], "passing_variant": spec["variant"],
            "passing_learning_rate": spec["learning_rate"],
            "passing_per_tensor": spec["per_tensor"]}


def matrix_size(passing, num_tasks, channels):
    return num_tasks if passing == "layer" else channels * num_tasks


def neutral_matrix(variant, size):
    """The A that passes nothing: I (linear) or 0 (residual, nonlinear)."""
    return np.eye(size, dtype="float32") if variant == "linear" else np.zeros(
        (size, size), "float32")


def pass_weights(stacked, matrix, passing, variant):
    """The passed weights of one stacked weight `(T, ..., C)`, same shape;
    a channel-wise A's gradient comes scaled by 1 / C
    (`channel_step_scale`)."""
    if passing == "layer":
        mixed = tf.tensordot(matrix, stacked, axes=[[0], [0]])  # [t] = sum_s A[s, t] W[s]
    else:
        matrix = _scale_gradient(matrix, channel_step_scale(stacked.shape[-1]))
        rank = len(stacked.shape)
        channels_last = tf.transpose(stacked, [*range(1, rank), 0])  # (..., C, T)
        columns = tf.reshape(channels_last, [-1, matrix.shape[0]])  # column c * T + t
        mixed = tf.reshape(columns @ matrix, tf.shape(channels_last))
        mixed = tf.transpose(mixed, [rank - 1, *range(rank - 1)])
    if variant == "linear":
        return mixed
    return stacked + (mixed if variant == "residual" else tf.tanh(mixed))


def channel_step_scale(channels):
    """What a channel-wise A's plain SGD step is scaled by: 1 / C.

    Eq. (13): one step of A moves the passed weights by `-lr W W^T G`
    (W the weight as the matrix whose columns A mixes, G = dL/dW'). Along
    a gradient of no preferred direction the step's mean size is
    `lr tr(W W^T) / dim = lr ||W||_F^2 / dim`, dim the length of a column:
    d_in C layer-wise (a task's whole copy) but d_in channel-wise (one
    output channel of one task). So at the same rate a channel-wise A moves
    W' C times as far as a layer-wise one; scaled by 1 / C, the two take
    the same mean step at the same rate (the paper's 0.1, B.2). Unscaled,
    LeNet's 256-unit dense layer steps 256 times as far as layer passing,
    and the adjacent steps raise the loss they minimise.
    """
    return 1.0 / channels


def _scale_gradient(value, scale):
    """`value`, whose gradient is multiplied by `scale` (exactly `value`
    forward: A at I still passes nothing bit for bit). A scaled gradient,
    not a scaled learning rate: layers build in Keras' stateless scope,
    where A's optimizer (made before the channels are known) cannot be
    changed."""
    @tf.custom_gradient
    def identity(x):
        return tf.identity(x), lambda upstream: upstream * scale

    return identity(tf.convert_to_tensor(value))  # read here: a custom gradient holds no variable


def task_affinity(matrix, num_tasks, variant):
    """A reduced to T x T (appendix I.2): channel-wise, the sum of each task
    pair's C x C block over C; minus I for the linear variant, so that in
    every variant it is what the phase changed (0: nothing passed)."""
    matrix = np.asarray(matrix, np.float64)
    channels = matrix.shape[0] // num_tasks
    blocks = matrix.reshape(channels, num_tasks, channels, num_tasks)  # [c, s, c', t]
    affinity = blocks.sum(axis=(0, 2)) / channels
    return affinity - np.eye(num_tasks) if variant == "linear" else affinity


def passed_layers(model):
    """The layers of `model` that pass their weights."""
    return [l for l in flatten_layers(model, include_self=False)
            if getattr(l, "passing_matrix", None) is not None]


def set_back(model):
    """`W <- W'`, A back to passing nothing, for every passed layer of
    `model` (the end of an adjacent-learning phase, eq. 7). The outputs do
    not change."""
    for layer in passed_layers(model):
        layer.set_back()


def fixed_matrix(layer, keep=0.5):
    """Adj-fixed's passing of `layer`: each task keeps `keep` of its weights
    and takes the rest from the tasks' mean, `keep I + (1 - keep) 11^T / T`
    layer-wise, `kron(I_C, .)` channel-wise; minus I for the variants that
    add W themselves (residual; nonlinear to first order)."""
    tasks = layer.num_tasks
    mixing = keep * np.eye(tasks) + (1 - keep) * np.full((tasks, tasks), 1 / tasks)
    size = layer.passing_matrix.shape[0]
    if layer.passing == "channel":
        mixing = np.kron(np.eye(size // tasks), mixing)
    if layer.passing_variant != "linear":
        mixing -= np.eye(size)
    return mixing.astype("float32")
