"""The gradients of one training step, per task where an aggregator or a
weighting needs them (DESIGN.md, composable objectives).

A step yields `StepGradients`: the gradient of everything that is not
aggregated, and, when a `tf_mtl.aggregation.Aggregator` or a weighting that
reads the Gram matrix (GradNorm) is in use, the `(T, D)` Jacobian of the
weighted task losses on the aggregated part, with the way back from an update
of that part to the variables' gradients. The aggregated part is either

- `"parameters"`: every trainable variable of the backbone that the model's
  optimizer trains (the heads and the sharing method's own state, e.g. MPPS's
  Phi, keep their plain gradients); or
- `"representation"`: the rows where the tasks' paths split, i.e. where rows
  enter the task-routed part (for hard sharing, where the features enter the
  heads). Every layer after it gets its plain gradient; the stem before it
  gets the aggregated one, by one more backward pass of the stem alone.
"""

import dataclasses
from typing import Callable, Optional

import tensorflow as tf

from tf_mtl.layers.routes import Recorded
from tf_mtl.objective import all_replicas_sum, num_replicas

AGGREGATE_ON = ("parameters", "representation")
PER_TASK_GRADIENTS = ("loop", "vectorized")


@dataclasses.dataclass
class StepGradients:
    """What a training step computed (this replica's share).

    Attributes:
        objective: the objective's value, a scalar.
        losses: each task's loss, `(T,)`, unweighted.
        gradients: gradients of the variables (a list, None where not
            connected), from the objective's parts that are not aggregated.
        jacobian: `(T, D)`, row t the gradient of task t's weighted loss on
            the aggregated part (flattened), or None.
        apply: `update (D,) -> gradients` of the variables, to add.
        named: the conditioned layers' named terms, for logs.
        rows: this replica's number of examples, for logs.
    """

    objective: tf.Tensor
    losses: tf.Tensor
    gradients: list
    jacobian: Optional[tf.Tensor] = None
    apply: Optional[Callable] = None
    named: dict = dataclasses.field(default_factory=dict)
    rows: Optional[tf.Tensor] = None


def flatten(tensors, like=None):
    """Concatenates tensors (None: zeros shaped as `like`'s) into a vector."""
    like = like or tensors
    return tf.concat([tf.reshape(tf.zeros_like(l) if t is None else tf.convert_to_tensor(t), [-1])
                      for t, l in zip(tensors, like)], 0)


def unflatten(vector, like):
    """Splits a vector into tensors shaped as `like`'s."""
    sizes = [tf.size(l) for l in like]
    return [tf.reshape(p, tf.shape(l)) for p, l in zip(tf.split(vector, sizes), like)]


def parameter_jacobian(tape, task_losses, variables, method):
    """`(T, D)`: the gradient of each of `task_losses` on `variables`,
    flattened: T backward passes (`"loop"`), or one vectorised with `pfor`
    (`"vectorized"`). `task_losses` is `(vector, its elements)`, both
    recorded on the persistent `tape` (it differentiates only what it
    recorded)."""
    task_losses, elements = task_losses
    if method == "vectorized":
        rows = tape.jacobian(task_losses, variables, experimental_use_pfor=True)
        return tf.concat([tf.reshape(tf.zeros((task_losses.shape[0],) + tuple(v.shape))
                                     if r is None else r, [task_losses.shape[0], -1])
                          for r, v in zip(rows, variables)], 1)
    return tf.stack([flatten(tape.gradient(loss, variables), variables)
                     for loss in elements])


def needs_task_gradients(weighting, aggregator):
    """Whether a step computes each task's gradient (not only their sum): for
    an aggregator, or a weighting that reads their Gram matrix."""
    return aggregator is not None or getattr(weighting, "needs_gramian", False)


def parameter_gradients(tape, variables, shared, scaled, scaled_rest, scaled_tasks, method):
    """`(gradients, jacobian, apply)` of a step aggregated on the parameters
    `variables[i] for i in shared`: the others get the gradient of the whole
    (scaled) objective `scaled`, the shared ones that of `scaled_rest`, the
    part no aggregator touches, and `jacobian` holds the task gradients
    (`scaled_tasks`, see `parameter_jacobian`) of the shared ones, which
    `apply(update)` scatters back as gradients of `variables`."""
    others = [i for i in range(len(variables)) if i not in shared]
    gradients = dict(zip(others, tape.gradient(scaled, [variables[i] for i in others])))
    gradients.update(zip(shared, tape.gradient(scaled_rest, [variables[i] for i in shared])))
    jacobian = parameter_jacobian(tape, scaled_tasks, [variables[i] for i in shared], method)
    return ([gradients[i] for i in range(len(variables))], jacobian,
            lambda update: scatter(update, variables, shared))


def accumulate(sums, gradients):
    """`sums + gradients`, element by element; None (not connected) adds 0."""
    return [g if s is None else s if g is None else s + tf.convert_to_tensor(g)
            for s, g in zip(sums, gradients, strict=True)]


def scatter(update, variables, shared):
    """`update`, the flattened gradients of `variables[i] for i in shared`,
    as gradients of all `variables` (None elsewhere)."""
    parts = dict(zip(shared, unflatten(update, [variables[i] for i in shared])))
    return [parts.get(i) for i in range(len(variables))]


class RepresentationTap:
    """Records the rows entering the task-routed part on `tape`, and cuts
    their gradient there so the stem gets only the aggregated one.

    `wrap(route)` returns the route a forward pass uses instead of `route`
    (`tf_mtl.layers.routes`). Routed row k of a source of B
    rows copies source row `k mod B` (tiled: T blocks of B; data not jointly
    labelled: the rows themselves), so task t's gradient of the
    representation sums the gradients of its routed copies.
    """

    def __init__(self, num_tasks, tape):
        self.num_tasks, self.tape = num_tasks, tape
        self.sources, self.routed, self.task_ids = [], [], []

    def wrap(self, route):
        return Recorded(route, self._record)

    def _record(self, rows, routed, task_ids):
        self.tape.watch(routed)  # cut from the variables, so not watched by itself
        self.sources.append(rows)
        self.routed.append(routed)
        self.task_ids.append(task_ids)

    def jacobian(self, routed_gradients):
        """`(T, D)` from the gradients of the routed rows."""
        rows = []
        for source, routed, gradient, task_ids in zip(self.sources, self.routed,
                                                      routed_gradients, self.task_ids):
            if gradient is None:  # rows no loss reads (a gate at 0)
                gradient = tf.zeros_like(routed)
            batch = tf.shape(source)[0]
            copy_of = tf.range(tf.shape(gradient)[0]) % batch
            per_task = tf.math.unsorted_segment_sum(
                gradient, task_ids * batch + copy_of, self.num_tasks * batch)
            rows.append(tf.reshape(per_task, [self.num_tasks, -1]))
        return tf.concat(rows, 1) if rows else tf.zeros([self.num_tasks, 0])


def aggregate(aggregator, jacobian, aggregate_on):
    """The aggregated update of this replica and the global Gram matrix
    (`aggregator` None: the sum of the task gradients, for a weighting that
    reads the Gram matrix).

    On the parameters every replica holds a share of each task's gradient:
    they are summed first, so the aggregator sees the global gradients, and
    the update is divided among the replicas (the optimizer sums them). On
    the representation each replica holds its own examples' rows: the Gram
    matrix is the sum of the replicas', and each aggregates its own rows.
    """
    if aggregate_on == "parameters":
        jacobian = all_replicas_sum(jacobian)
        gramian = tf.matmul(jacobian, jacobian, transpose_b=True)
    else:
        gramian = all_replicas_sum(tf.matmul(jacobian, jacobian, transpose_b=True))
    update = tf.reduce_sum(jacobian, 0) if aggregator is None \
        else aggregator.aggregate(jacobian, gramian)
    if aggregate_on == "parameters":
        update /= num_replicas()
    return update, gramian
