"""IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial
Multi-task Learning", ICLR 2021)."""

import keras
import tensorflow as tf

from tf_mtl.aggregation.base import GramianAggregator


@keras.saving.register_keras_serializable(package="tf_mtl")
class IMTLG(GramianAggregator):
    """Impartial gradients: the combination `g = sum_t alpha_t g_t`,
    `sum_t alpha_t = 1`, whose projections onto every task's unit gradient
    `u_t = g_t / ||g_t||` are equal. In closed form (eq. 9):

        alpha_{2:T} = g_1 U^T (D U^T)^{-1},  alpha_1 = 1 - sum alpha_{2:T},

    with rows `D_t = g_1 - g_t` and `U_t = u_1 - u_t` (t = 2..T); every
    product comes from the Gram matrix.
    """

    def task_coefficients(self, gramian):
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gramian), 1e-20))
        cos = gramian / norms[None, :]  # cos[i, s] = g_i . u_s
        g1_u = cos[0, 0] - cos[0, 1:]  # g_1 . (u_1 - u_s)
        d_u = (cos[0, 0] - cos[0, 1:])[None, :] - (cos[1:, 0:1] - cos[1:, 1:])
        rest = tf.linalg.solve(tf.transpose(d_u), g1_u[:, None])[:, 0]
        return tf.concat([1.0 - tf.reduce_sum(rest, keepdims=True), rest], 0)
