"""What every loss weighting is: a small stateful object between the per-task
losses of a step and the objective (DESIGN.md, composable objectives)."""

import keras
import tensorflow as tf

from tf_mtl.objective import ObjectivePart


class Weighting(ObjectivePart):
    """Base class of loss weightings: per-task losses -> task weights.

    A step's objective is `sum_t w_t * L_t + extra` (plus the sharing
    method's own terms, which no weighting touches: MPPS's KL and score
    function, a regulariser), where `L_t` is task t's loss (its
    `Task.loss_weight` and, for non-jointly labelled data, its N_t/N share
    included) and:

    - `task_weights()`, shape `(T,)`: the weights of this step, decided by the
      weighting's state before the step's losses are known (so that a step
      that runs one pass per task can weight each pass as it goes). They
      carry gradient to the weighting's own variables where `sum_t w_t L_t`
      is what trains them (uncertainty weighting), and none otherwise;
    - `update(losses, weights, gramian)`: called once the step's losses
      (global batch means, no gradient) are known; updates the state (a loss
      history) and returns `extra`, a scalar objective term through which
      the weighting trains its variables (0 by default). `gramian` is the
      `(T, T)` Gram matrix of the gradients of `w_t L_t` (on the
      aggregated part, see `tf_mtl.aggregation`) when `needs_gramian`, else
      None.

    State lives in Keras variables (`ObjectivePart`); `tf.distribute` keeps
    it equal on every replica, as the losses it sees are the global ones.
    """

    # Whether `update` reads the Gram matrix of the per-task gradients, which
    # a step then computes (as gradient aggregation does).
    needs_gramian = False

    def task_weights(self):
        """This step's task weights, `(T,)`."""
        return tf.ones([self.num_tasks])

    def update(self, losses, weights, gramian=None):
        """Updates the state from this step's losses; returns the extra term."""
        del losses, weights, gramian
        return tf.constant(0.0)

    def on_epoch_begin(self, epoch):
        """Called by `fit` at the start of every epoch (also of one resumed
        in its middle)."""


class EpochCallback(keras.callbacks.Callback):
    """Tells a weighting where epochs begin (`MultiTaskModel.fit` adds it)."""

    def __init__(self, weighting):
        super().__init__()
        self.weighting = weighting

    def on_epoch_begin(self, epoch, logs=None):
        self.weighting.on_epoch_begin(epoch)
