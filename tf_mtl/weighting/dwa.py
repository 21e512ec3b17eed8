"""Dynamic Weight Average (Liu, Johns and Davison, "End-to-End Multi-Task
Learning with Attention", CVPR 2019, eq. 7)."""

import keras
import tensorflow as tf

from tf_mtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="tf_mtl")
class DynamicWeightAverage(Weighting):
    """DWA: weights from the rate at which each task's loss falls.

        w_t(k) = T exp(r_t(k-1) / tau) / sum_i exp(r_i(k-1) / tau),
        r_t(k-1) = L_t(k-1) / L_t(k-2),

    with `L_t(k)` task t's training loss averaged over epoch k, and
    `w_t = 1` for the first two epochs. A task whose loss falls slowly gets
    more weight.

    State: the running sum and count of the losses of the epoch under way
    and the averages of the last two finished epochs, folded in at the start
    of the next epoch (so a checkpoint written at an epoch's end, or in its
    middle, resumes into the same weights).

    Args:
        temperature: tau; 2 in the paper.

    Usage, with `model` a `tf_mtl.MultiTaskModel`:

    ```python
    model.compile("adam", weighting=tf_mtl.weighting.DynamicWeightAverage())
    ```
    """

    def __init__(self, temperature=2.0, **kwargs):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(
                f"`temperature` must be > 0. Received: temperature={temperature}")
        self.temperature = float(temperature)

    def build(self, num_tasks):
        super().build(num_tasks)
        state = dict(trainable=False, aggregation="only_first_replica",
                     initializer="zeros")
        self.loss_sum = self.add_weight(shape=(num_tasks,), name="loss_sum", **state)
        self.steps = self.add_weight(shape=(), name="steps", **state)
        # Rows: the averages of epochs k-2 and k-1; `epochs`: how many are known.
        self.epoch_losses = self.add_weight(shape=(2, num_tasks), name="epoch_losses",
                                            **state)
        self.epochs = self.add_weight(shape=(), name="epochs", **state)
        self.current_epoch = self.add_weight(shape=(), name="current_epoch", **state)

    def task_weights(self):
        ratio = self.epoch_losses[1] / self.epoch_losses[0]
        dynamic = self.num_tasks * tf.nn.softmax(ratio / self.temperature)
        return tf.where(self.epochs >= 2, dynamic, tf.ones([self.num_tasks]))

    def update(self, losses, weights, gramian=None):
        self.loss_sum.assign_add(losses)
        self.steps.assign_add(1.0)
        return tf.constant(0.0)

    def on_epoch_begin(self, epoch):
        # An epoch resumed in its middle goes on summing.
        new = float(self.current_epoch.numpy()) != epoch
        self.current_epoch.assign(float(epoch))
        if not new or float(self.steps.numpy()) == 0:
            return
        average = self.loss_sum / self.steps
        self.epoch_losses.assign(tf.stack([self.epoch_losses[1], average]))
        self.epochs.assign_add(1.0)
        self.loss_sum.assign(tf.zeros_like(self.loss_sum))
        self.steps.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
