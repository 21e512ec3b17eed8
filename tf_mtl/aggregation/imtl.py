"""IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial
Multi-task Learning", ICLR 2021)."""

import keras
import numpy as np
import tensorflow as tf

from tf_mtl.aggregation.base import GramianAggregator


@keras.saving.register_keras_serializable(package="tf_mtl")
class IMTLG(GramianAggregator):
    """Impartial gradients: the combination `g = sum_t alpha_t g_t`,
    `sum_t alpha_t = 1`, whose projections onto every task's unit gradient
    `u_t = g_t / ||g_t||` are equal.

    With G the Gram matrix, `g . u_t = (G alpha)_t / ||g_t||`, so the
    condition reads `G alpha = c d`, `d_t = ||g_t||`: `alpha` is `G^+ d`
    normalised to sum to 1, which is eq. 9's closed form
    `alpha_{2:T} = g_1 U^T (D U^T)^{-1}` where G is invertible. Through the
    pseudo-inverse a task whose gradient is zero (no rows in a batch of
    data not jointly labelled) gets weight 0 and the others are balanced
    among themselves, as TorchJD's IMTL-G does; every gradient zero gives
    the zero update. Where no combination projects equally (the gradients
    span fewer dimensions than the tasks that have one, e.g. more tasks
    than dimensions) it raises instead of returning what the linear
    system makes of it.
    """

    def task_coefficients(self, gramian):
        g = tf.cast(gramian, tf.float64)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(g), 0.0))
        # Eigenvalues below the rounding of the input's dtype are zero.
        rcond = 10.0 * np.finfo(gramian.dtype.as_numpy_dtype).eps * tf.cast(
            tf.shape(g)[0], tf.float64)
        alpha = tf.linalg.matvec(tf.linalg.pinv(g, rcond=rcond), norms)
        residual = tf.norm(tf.linalg.matvec(g, alpha) - norms)
        check = tf.debugging.Assert(residual <= 1e-4 * tf.norm(norms), [
            "IMTL-G: no combination of the task gradients projects equally onto "
            "every one: they span fewer dimensions than the tasks with a nonzero "
            "gradient (more tasks than dimensions?). Relative residual:",
            residual / tf.norm(norms)])
        with tf.control_dependencies([check]):
            alpha = tf.math.divide_no_nan(alpha, tf.reduce_sum(alpha))
        return tf.cast(alpha, gramian.dtype)
