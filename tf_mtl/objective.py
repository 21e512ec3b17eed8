"""Per-task losses of a routed batch, and the rest of the objective: the
first piece of a training step (per-task losses -> weighting -> gradients ->
aggregation -> optimizers)."""

import keras
import tensorflow as tf

from tf_mtl.layers.base import draw_counter, next_seed


def all_replicas_sum(value):
    """The sum of `value` over the replicas (itself outside a replica context)."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: nothing to reduce
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def task_loss(task, y_true, y_pred, metrics):
    """Per-example loss of one task; updates its `metrics`. Checks its labels
    in the graph (what `tf_mtl.validation.check_dataset` could not see)."""
    if y_true.dtype.is_floating:
        y_true = tf.debugging.assert_all_finite(
            y_true, f"NaN or Inf in the labels of task {task.name!r}")
    if task.classes is not None:
        bad = task.out_of_range(y_true)
        check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [
            # No quotes: TensorFlow escapes them in the error message.
            f"Task {task.name}: class ids outside 0..{task.classes - 1}:",
            tf.boolean_mask(y_true, bad)])
        with tf.control_dependencies([check]):  # before the loss reads them
            y_true = tf.identity(y_true)
    for metric in metrics:
        metric.update_state(y_true, y_pred)
    return tf.cast(task.loss(y_true, y_pred), tf.float32)


def split_objective(losses, rows, task_ids, scope, task_weights, weights, loss_metrics,
                    regularizers=()):
    """This replica's share of the objective, in two parts.

    Returns `(task_losses, rest)`: `task_losses[t]`, task t's loss (its
    `task_weights[t]` included: `Task.loss_weight`, times N_t/N for data not
    jointly labelled, over its global number of rows), and `rest`, the
    conditioned layers' terms plus the weight `regularizers` (summed over
    replicas). The objective is `sum_t weights[t] task_losses[t] + rest`,
    `weights` those of the loss weighting (all 1 without one).

    `losses[t]` holds the per-row losses of task t and `rows[t]` their rows;
    `scope` the conditioned layers' records of the forward pass. The
    layers' terms see each row's loss weighted by its task's `weights`
    (MPPS's score function estimates the gradient of the weighted
    objective) and weight their per-task terms by `task_weights` alone (MPPS's
    KL is not the task loss a weighting balances). Updates `loss_metrics`.
    """
    counts = tf.stack([tf.cast(tf.size(l), tf.float32) for l in losses])
    global_counts = tf.maximum(all_replicas_sum(counts), 1.0)
    sums = tf.stack([tf.reduce_sum(l) for l in losses])
    task_losses = task_weights * sums / global_counts
    for metric, total, count in zip(loss_metrics, tf.unstack(sums), tf.unstack(counts)):
        metric.update_state(tf.math.divide_no_nan(total, count), sample_weight=count)
    rest = tf.constant(0.0)
    if scope.records:
        row_losses = tf.dynamic_stitch(rows, losses) * tf.gather(weights, task_ids)
        row_weights = tf.gather(task_weights / global_counts, task_ids)
        rest += scope.terms(row_losses, row_weights)
    if regularizers:  # one share per replica
        rest += tf.add_n(list(regularizers)) / num_replicas()
    return task_losses, rest


class ObjectivePart(keras.layers.Layer):
    """Base of the small stateful pieces a model is compiled with (a loss
    weighting, a gradient aggregator): state in Keras variables, built by
    `build(num_tasks)` when the model is compiled, so the model saves it,
    checkpoints carry it and `tf.distribute` mirrors it.

    With a `seed`, the part draws random numbers: draw i uses the stateless
    seed `(seed, i)` (`next_seed()`), i counted in a variable, so a resumed
    run draws what an uninterrupted one would and every replica alike.
    """

    def __init__(self, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.seed = None if seed is None else int(seed)
        self.num_tasks = None

    def build(self, num_tasks):
        self.num_tasks = int(num_tasks)
        if self.seed is not None:
            self.draws = draw_counter(self)
        self.built = True

    def next_seed(self):
        """The stateless seed of the next draw."""
        return next_seed(self.seed, self.draws)

    def call(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} is not called on tensors: compile a "
            "MultiTaskModel or a tf_mtl.Model with it, whose training step uses it.")

    def get_config(self):
        config = {"name": self.name}
        if self.seed is not None:
            config["seed"] = self.seed
        return config


def lookup(identifier, base, registry):
    """An instance of `base` from itself or its name in `registry`."""
    if isinstance(identifier, base):
        return identifier
    if identifier in registry:
        return registry[identifier]()
    raise ValueError(f"Unknown {base.__name__} {identifier!r}: pass a {base.__module__.rsplit('.', 1)[0]}."
                     f"{base.__name__} or one of {sorted(registry)}.")
