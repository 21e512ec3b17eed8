"""The protocol every task-aware layer follows (`TaskAware`), the contract
of task-conditioned layers, and the objective scope through which such a
layer adds its own terms to a training step."""

import contextlib
import threading

import keras
import tensorflow as tf

from tf_mtl._keras import flatten_layers


# The scopes of the training steps being traced, one stack per thread:
# MirroredStrategy traces each replica's step in a thread of its own and
# switches threads at every cross-replica call, so one global would be
# overwritten by another replica between the forward pass and the loss.
_scopes = threading.local()


class ObjectiveScope:
    """What the conditioned layers of one forward pass add to its objective.

    A training step opens the scope (`objective_scope()`) around its forward
    pass; each conditioned layer with terms of its own records there what it
    drew (`TaskConditioned.record`). Once the step knows the loss of every
    row, `terms(row_losses, row_weights)` returns their sum, each layer's
    `objective_terms` weighting a row's terms like that row's loss.
    """

    def __init__(self):
        self.records = []
        self.named = {}

    def terms(self, row_losses, row_weights):
        """The conditioned layers' terms of the objective, a scalar; their
        sums by `TaskConditioned.objective_name` go to `named`, for logs.

        Args:
            row_losses: the loss of each row the layers saw, `(N,)`.
            row_weights: `d objective / d row_losses`, `(N,)`: the weight of
                each row's loss in the objective.
        """
        total = tf.constant(0.0)
        for layer, state in self.records:
            value = layer.objective_terms(state, row_losses, row_weights)
            if layer.objective_name:
                self.named[layer.objective_name] = self.named.get(layer.objective_name, 0.0) + value
            total += value
        return total


@contextlib.contextmanager
def objective_scope():
    """Opens an `ObjectiveScope` for the forward pass of a training step."""
    stack = _scopes.__dict__.setdefault("stack", [])
    stack.append(ObjectiveScope())
    try:
        yield stack[-1]
    finally:
        stack.pop()


class TaskAware:
    """The protocol of every layer that reads the task of each row.

    Such a layer is called as `layer(x, task_ids, training=...)`, where
    `task_ids` is an int32 vector giving the task of every row of `x`, or
    None for rows that have no task yet (a stem every task computes alike).
    `routes_tasks(training)` says whether it needs the rows' tasks in this
    mode: before the first layer that does, rows enter the routed part
    (`tf_mtl.layers.routes`). Where it does not, a layer with
    `identity_unless_routing` is the identity and is skipped
    (`apply_task_aware`); any other computes on the rows as they are.
    """

    identity_unless_routing = True

    def routes_tasks(self, training):
        return True


class TaskConditioned(TaskAware, keras.layers.Layer):
    """Base class of layers whose behaviour depends on the task of each example.

    A conditioned layer is called as `layer(x, task_ids, training=...)`, where
    `task_ids` is an int32 vector giving the task of every row of `x`. It
    gathers its per-task state by id: it never reads a global "current task"
    and never loops over tasks, so a batch mixing tasks costs one call.

    What a training step reads from a conditioned layer:

    - `routes_tasks(training)`: whether the layer needs `task_ids` in this
      mode. Before the first layer that does, `MultiTaskModel` runs the
      task-agnostic stem once and enters the routed part there (DESIGN.md,
      task-routed batches); a layer that is the identity at inference (an
      MPPS mask) returns False for `training=False`, so evaluation and export
      run the plain backbone.
    - `objective_terms(state, row_losses, row_weights)`: the layer's own
      terms of the training objective (a scalar), from the `state` it
      `record`ed in its forward pass. A layer that has such terms must be trained by a step
      that adds them (`tf_mtl.Model`, `MultiTaskModel`); called in training
      outside such a step it raises instead of training without them.
    - `dedicated_optimizer()`: variables the layer trains with an optimizer
      of its own, e.g. MPPS mask probabilities by plain SGD.

    And what a deployment reads (`deployed`): `deployment()`, a context
    manager, made once when the deployment is, that is entered at every
    trace of the deployed function; inside it the layer computes as
    deployed (a passed layer serves its passed weights as constants).
    """

    # What a model logs the layer's objective terms as (None: not logged).
    objective_name = None
    # A layer whose state is probabilities, a partition or gates computes in
    # float32 under a mixed precision policy (its inputs are cast): the
    # log-probabilities of MPPS's score function and the KL lose too much in
    # float16, and the cost is one cast of the activations at the site.
    float32_state = False

    def __init__(self, **kwargs):
        if self.float32_state:
            kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def record(self, state):
        """Hands `state` to the objective scope of the step being traced,
        for `objective_terms`; raises where no step will add the terms."""
        stack = getattr(_scopes, "stack", None)
        if not stack:
            raise RuntimeError(
                f"{type(self).__name__} {self.name!r} was called in training "
                "outside a step that adds its objective terms, so it would "
                "train without them. Train it in a `tf_mtl.Model` (or a model "
                "class that mixes in `tf_mtl.ConditionedTraining`), or in a "
                "`tf_mtl.MultiTaskModel`; a custom `train_step` opens "
                "`tf_mtl.layers.objective_scope()` around its forward pass and "
                "adds `scope.terms(row_losses, row_weights)` to its loss."
            )
        stack[-1].records.append((self, state))

    def objective_terms(self, state, row_losses, row_weights):
        """The layer's terms of the objective given its recorded `state`, a
        scalar.

        `row_losses` and `row_weights` are `(N,)` over the rows the layer
        saw: a row's terms are weighted like its loss.
        """
        raise NotImplementedError(
            f"{type(self).__name__} records objective terms but does not "
            "implement `objective_terms`."
        )

    def dedicated_optimizer(self):
        """`(optimizer, variables)` when this layer trains some of its
        variables with an optimizer of its own (the model's skips them), or
        None."""
        return None

    def deployment(self):
        """A reusable context manager in which the layer computes as
        deployed; this one changes nothing."""
        return contextlib.nullcontext()

    def compute_output_shape(self, x_shape, task_ids_shape=None):
        return x_shape


def deployed(layer, function):
    """`function`, run with every conditioned layer of `layer` (a model)
    computing as deployed (`TaskConditioned.deployment`, made now)."""
    deployments = [l.deployment() for l in flatten_layers(layer, include_self=False)
                   if isinstance(l, TaskConditioned)]

    def call(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for deployment in deployments:
                stack.enter_context(deployment)
            return function(*args, **kwargs)

    return call


def draw_counter(layer):
    """The count of a layer's random draws, as a weight: draw i uses the
    stateless seed `(seed, i)`, so a run resumed from a checkpoint draws
    what an uninterrupted run would."""
    return layer.add_weight(shape=(), dtype="int32", name="draws", trainable=False,
                            initializer="zeros", aggregation="only_first_replica")


def next_seed(seed, draws, per_replica=False):
    """The stateless seed of the next draw, counted in `draws`. With
    `per_replica`, replicas (which hold different rows) draw differently;
    otherwise every replica draws the same."""
    value = tf.stack([tf.constant(seed, tf.int32), draws.value])
    draws.assign_add(1)
    replica = tf.distribute.get_replica_context()
    if per_replica and replica is not None:
        value = tf.random.experimental.stateless_fold_in(
            value, replica.replica_id_in_sync_group)
    return value


def task_weights(row_weights, task_ids, num_tasks):
    """The weight of each task in the objective, `(T,)`: the sum of its
    rows' weights. A per-task term weighted so counts once per task, like
    that task's loss (eq. 3's KL beside the task's loss)."""
    return tf.math.unsorted_segment_sum(row_weights, task_ids, num_tasks)


def apply_task_aware(layer, x, task_ids, training, route):
    """Calls a `TaskAware` layer by its protocol, first entering the routed
    part (`route(x) -> (x, task_ids)`) where the layer routes tasks and the
    rows have no task yet (`task_ids` None); returns `(x, task_ids)`. A
    layer that is the identity unless it routes is, where it does not, not
    traced at all (no mask op in an inference graph)."""
    if not layer.routes_tasks(training):
        if layer.identity_unless_routing:
            return x, task_ids
    elif task_ids is None:
        x, task_ids = route(x)
    return layer(x, task_ids, training=training), task_ids


def broadcast_rows(per_row, spatial_dims):
    """`(N, C)` -> `(N, 1, ..., 1, C)` to broadcast over the spatial axes."""
    return tf.reshape(per_row, [-1] + [1] * spatial_dims + [per_row.shape[-1]])


def mask_channels(x, row_masks):
    """`x_i * m_i` for every row i, channels last: `row_masks` `(N, C)`
    scales each row's channels (a task's mask or partition, gathered per
    row)."""
    return x * broadcast_rows(tf.cast(row_masks, x.dtype), len(x.shape) - 2)
