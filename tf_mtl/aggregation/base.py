"""What every gradient aggregator is: per-task gradients -> one update
(DESIGN.md, composable objectives)."""

import keras
import tensorflow as tf

from tf_mtl.objective import ObjectivePart


class Aggregator(ObjectivePart):
    """Base class of gradient aggregators.

    `aggregate(jacobian, gramian)` turns the `(T, D)` matrix whose row t is
    the gradient of task t's (weighted) loss on the aggregated part into the
    `(D,)` update direction the optimizer applies, given `gramian`, the
    `(T, T)` Gram matrix `J J^T` of the global gradients (which under
    `tf.distribute` may hold more than this replica's rows of `J`).

    Which part is aggregated is the model's choice (`compile(
    aggregate_on=...)`): every shared parameter, or the shared
    representation, where the tasks' paths split (each row of `J` then holds
    one task's gradient of the representation of this replica's examples).
    Parameters outside it get the plain sum of their task gradients.

    State (a draw counter) lives in Keras variables (`ObjectivePart`).
    """

    def aggregate(self, jacobian, gramian):
        raise NotImplementedError


class GramianAggregator(Aggregator):
    """An aggregator whose update is a combination `sum_t c_t g_t` of the task
    gradients with coefficients `c = task_coefficients(gramian)` that depend
    on the Gram matrix alone (PCGrad, MGDA, CAGrad, IMTL-G, the sum).

    Such an aggregator is exact on the representation under `tf.distribute`
    (the Gram matrix of the global batch is the sum of the replicas') and
    costs no more than the Gram matrix on top of the task gradients.
    """

    def task_coefficients(self, gramian):
        """`c`, `(T,)`, from the `(T, T)` Gram matrix."""
        raise NotImplementedError

    def aggregate(self, jacobian, gramian):
        return tf.linalg.matvec(jacobian, self.task_coefficients(gramian), transpose_a=True)


@keras.saving.register_keras_serializable(package="tf_mtl")
class Sum(GramianAggregator):
    """`sum_t g_t`: the gradient of the summed objective (no aggregation)."""

    def task_coefficients(self, gramian):
        return tf.ones([tf.shape(gramian)[0]])
