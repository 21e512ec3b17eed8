"""The contract every task-conditioned layer follows."""

import keras
import tensorflow as tf


def tile_tasks(features, num_tasks):
    """Repeats a batch once per task: rows `[t*B, (t+1)*B)` belong to task t.

    This is where a jointly labelled batch enters the task-conditioned part
    of a backbone: everything before it ran once for all tasks.
    """
    batch = tf.shape(features)[0]
    task_ids = tf.repeat(tf.range(num_tasks, dtype=tf.int32), batch)
    return tf.concat([features] * num_tasks, axis=0), task_ids


class TaskConditioned(keras.layers.Layer):
    """Base class of layers whose behaviour depends on the task of each example.

    A conditioned layer is called as `layer(x, task_ids, training=...)`, where
    `task_ids` is an int32 vector giving the task of every row of `x`. It
    gathers its per-task state by id: it never reads a global "current task"
    and never loops over tasks, so a batch mixing tasks costs one call.

    `MultiTaskModel` reads two more things from a conditioned layer:

    - `routes_tasks(training)`: whether the layer needs `task_ids` in this
      mode. Before the first layer that does, the model runs the task-agnostic
      stem once and tiles its output T times (DESIGN.md, task-routed batches);
      a layer that is the identity at inference (an MPPS mask) returns False
      for `training=False`, so evaluation and export run the plain backbone.
    - `objective_terms(row_losses, task_ids)`: extra terms of the training
      objective, as `(row_terms, task_terms)`. `row_terms` has one value per
      row and is weighted like that row's loss; `task_terms` has one value per
      task and is weighted like that task. Either may be None.
    - `dedicated_optimizer()`: variables the layer trains with an optimizer
      of its own, e.g. MPPS mask probabilities by plain SGD.
    """

    def routes_tasks(self, training):
        return True

    def objective_terms(self, row_losses, task_ids):
        return None, None

    def dedicated_optimizer(self):
        """`(optimizer, variables)` when this layer trains some of its
        variables with an optimizer of its own (the model's skips them), or
        None."""
        return None

    def compute_output_shape(self, x_shape, task_ids_shape=None):
        return x_shape


def apply_conditioned(layer, x, task_ids, training, num_tasks):
    """Calls a conditioned layer where it routes tasks, first tiling a batch
    that serves every task (`task_ids` None); returns `(x, task_ids)`.
    Where the layer does not route it is the identity and is not traced at
    all (no mask op in an inference graph)."""
    if not layer.routes_tasks(training):
        return x, task_ids
    if task_ids is None:
        x, task_ids = tile_tasks(x, num_tasks)
    return layer(x, task_ids, training=training), task_ids
