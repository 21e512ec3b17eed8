"""GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient
Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML
2018)."""

import keras
import tensorflow as tf

from tf_mtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="tf_mtl")
class GradNorm(Weighting):
    """GradNorm: weights that pull every task's gradient norm towards a
    common norm scaled by the task's relative training rate.

    With `G_t = ||grad_W (w_t L_t)||`, `G_bar` their mean over tasks,
    `Ltilde_t = L_t / L_t(0)` (the loss over the first step's) and
    `r_t = Ltilde_t / mean_i Ltilde_i`, the weights minimise (eq. 2)

        L_grad = sum_t | G_t - G_bar * r_t^alpha |,

    the target `G_bar * r_t^alpha` held constant; `w` trains with the
    model's optimizer on `L_grad` alone (the task losses do not move it) and
    is renormalised to `sum_t w_t = T` after every step.

    `L_grad` trains w and is no term of the network's objective, so the
    term `update` returns is `L_grad - stop_gradient(L_grad)`: L_grad's
    gradient, value 0, and the model's `loss` is `sum_t w_t L_t` as for
    every weighting. `L_grad` itself is the metric `gradnorm_loss`
    (`metrics`).

    `W` is the part the model aggregates (`compile(
    aggregate_on=...)`): all shared parameters (`"parameters"`), or the
    shared representation (`"representation"`, cheaper); the paper picks the
    last shared layer, between the two.

    Args:
        alpha: the asymmetry; 1.5 in the paper's NYUv2 experiments.

    Usage, with `model` a `tf_mtl.MultiTaskModel`:

    ```python
    model.compile("adam", weighting=tf_mtl.weighting.GradNorm(alpha=1.5))
    ```
    """

    needs_gramian = True

    def __init__(self, alpha=1.5, **kwargs):
        super().__init__(**kwargs)
        if not alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0. Received: alpha={alpha}")
        self.alpha = float(alpha)

    def build(self, num_tasks):
        super().build(num_tasks)
        self.loss_weights = self.add_weight(
            shape=(num_tasks,), name="loss_weights", initializer="ones",
            constraint=SumTo(num_tasks))
        self.initial_losses = self.add_weight(
            shape=(num_tasks,), name="initial_losses", initializer="zeros",
            trainable=False, aggregation="only_first_replica")
        self.gradnorm_loss = keras.metrics.Mean(name="gradnorm_loss")

    def task_weights(self):
        return tf.stop_gradient(tf.convert_to_tensor(self.loss_weights))

    def update(self, losses, weights, gramian=None):
        first = tf.reduce_all(self.initial_losses == 0.0)
        initial = tf.where(first, losses, self.initial_losses)
        self.initial_losses.assign(initial)
        # `gramian` holds the gradients of w_t L_t at this step's w: rescale
        # them so G_t carries w's gradient.
        w = tf.convert_to_tensor(self.loss_weights)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gramian), 0.0))
        g = w * norms / tf.stop_gradient(w)
        relative = tf.math.divide_no_nan(losses, initial)
        rate = tf.math.divide_no_nan(relative, tf.reduce_mean(relative))
        target = tf.stop_gradient(tf.reduce_mean(g) * rate ** self.alpha)
        loss = tf.reduce_sum(tf.abs(g - target))
        self.gradnorm_loss.update_state(loss)
        return loss - tf.stop_gradient(loss)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="tf_mtl")
class SumTo(keras.constraints.Constraint):
    """Positive weights rescaled to sum to `total` (GradNorm's renormalisation)."""

    def __init__(self, total):
        self.total = float(total)

    def __call__(self, w):
        w = tf.maximum(w, 1e-6)
        return w * self.total / tf.reduce_sum(w)

    def get_config(self):
        return {"total": self.total}
