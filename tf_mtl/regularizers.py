"""Task-relationship penalties on per-task weights (PPNet's regularised
baselines, papers/004 B.2, after Smith et al.'s federated multi-task
learning).

A per-task weight `(T, ...)` is read as W, d x T, each task's copy a column.
"""

import keras
import tensorflow as tf

MODES = ("fixed", "dynamic")


@keras.saving.register_keras_serializable(package="tf_mtl")
class TaskTraceRegularizer(keras.regularizers.Regularizer):
    """`strength * tr(W Omega^-1 W^T)`, the tasks' relationship Omega:

    - `"fixed"`: `Omega^-1 = (I - 11^T / T)^2 = I - 11^T / T`, so the
      penalty is `strength * sum_t ||w_t - mean_s w_s||^2`: each task's
      weights pulled toward the tasks' mean (1e-5 in the paper);
    - `"dynamic"`: `Omega = (W^T W)^{1/2} / tr((W^T W)^{1/2})`, the
      relationship that minimises the penalty, held constant in the
      gradient; the penalty is then `strength * ||W||_*^2` (the squared
      nuclear norm) and, Omega being the minimiser, the gradient with Omega
      held constant is that of `||W||_*^2` (5e-5 in the paper).

    Example:

    >>> layer = tf_mtl.layers.PerTaskDense(
    ...     3, 8, kernel_regularizer=TaskTraceRegularizer(1e-5, "fixed"))
    """

    def __init__(self, strength, mode="fixed", epsilon=1e-8):
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
        if not strength >= 0:
            raise ValueError(f"`strength` must be >= 0. Received: strength={strength}")
        self.strength, self.mode, self.epsilon = float(strength), mode, float(epsilon)

    def __call__(self, weight):
        weight = tf.convert_to_tensor(weight, tf.float32)
        columns = tf.transpose(tf.reshape(weight, [weight.shape[0], -1]))  # d x T
        if self.mode == "fixed":
            centred = columns - tf.reduce_mean(columns, axis=1, keepdims=True)
            return self.strength * tf.reduce_sum(tf.square(centred))
        gram = tf.matmul(columns, columns, transpose_a=True)
        tasks = gram.shape[0]
        values, vectors = tf.linalg.eigh(tf.stop_gradient(gram) + self.epsilon * tf.eye(tasks))
        roots = tf.sqrt(tf.maximum(values, self.epsilon))
        # Omega^-1 = tr((W^T W)^{1/2}) (W^T W)^{-1/2}
        inverse = tf.reduce_sum(roots) * (vectors / roots) @ tf.transpose(vectors)
        return self.strength * tf.linalg.trace(inverse @ gram)

    def get_config(self):
        return {"strength": self.strength, "mode": self.mode, "epsilon": self.epsilon}
