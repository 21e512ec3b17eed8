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

    With G the Gram matrix and `N = diag(||g_t||)`, `g . u_t = (G alpha)_t /
    ||g_t||`, so the condition reads `N^-1 G alpha = c 1`. It is solved on
    the cosines `C = N^-1 G N^-1` as `beta = C^+ 1`, `alpha = N^-1 beta`
    normalised to sum to 1: eq. 9's closed form `alpha_{2:T} = g_1 U^T
    (D U^T)^{-1}` where G is invertible. The cosines' eigenvalues depend on
    the gradients' directions alone, so a task whose gradient is small
    beside the others' (a task nearly fitted) is balanced with them rather
    than lost below G's rounding. A task whose gradient is zero (no rows in
    a batch of data not jointly labelled) gets weight 0 and the others are
    balanced among themselves, as TorchJD's IMTL-G does; every gradient
    zero gives the zero update. Where no combination projects equally (the
    gradients span fewer dimensions than the tasks that have one, e.g. more
    tasks than dimensions) it raises instead of returning what the linear
    system makes of it.
    """

    def task_coefficients(self, gramian):
        g = tf.cast(gramian, tf.float64)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(g), 0.0))
        inverse_norms = tf.math.divide_no_nan(tf.ones_like(norms), norms)
        cosines = g * inverse_norms[:, None] * inverse_norms[None, :]
        has_gradient = tf.cast(norms > 0.0, tf.float64)
        # Eigenvalues below the rounding of the input's dtype are zero.
        rcond = 10.0 * np.finfo(gramian.dtype.as_numpy_dtype).eps * tf.cast(
            tf.shape(g)[0], tf.float64)
        beta = tf.linalg.matvec(tf.linalg.pinv(cosines, rcond=rcond), has_gradient)
        residual = tf.norm(tf.linalg.matvec(cosines, beta) - has_gradient)
        check = tf.debugging.Assert(residual <= 1e-4 * tf.norm(has_gradient), [
            "IMTL-G: no combination of the task gradients projects equally onto "
            "every one: they span fewer dimensions than the tasks with a nonzero "
            "gradient (more tasks than dimensions?). Relative residual:",
            tf.math.divide_no_nan(residual, tf.norm(has_gradient))])
        with tf.control_dependencies([check]):
            alpha = beta * inverse_norms
            alpha = tf.math.divide_no_nan(alpha, tf.reduce_sum(alpha))
        return tf.cast(alpha, gramian.dtype)
