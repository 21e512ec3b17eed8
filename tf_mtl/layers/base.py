"""The contract every task-conditioned layer follows, and the objective scope
through which such a layer adds its own terms to a training step."""

import contextlib
import threading

import keras
import tensorflow as tf

from tf_mtl._keras import flatten_layers


def tile_tasks(features, tasks):
    """Repeats a batch once per task: rows `[k*B, (k+1)*B)` belong to the
    k-th task of `tasks` (T: tasks 0 .. T-1; or a sequence of task ids).

    This is where a jointly labelled batch enters the task-conditioned part
    of a backbone: everything before it ran once for all tasks.
    """
    blocks = task_blocks(tasks)
    task_ids = tf.repeat(tf.constant(blocks, tf.int32), tf.shape(features)[0])
    return tf.concat([features] * len(blocks), axis=0), task_ids


def task_blocks(tasks):
    """`tasks` (T, or a sequence of task ids) as a tuple of task ids."""
    if isinstance(tasks, int):
        return tuple(range(tasks))
    return tuple(int(t) for t in tasks)


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


@contextlib.contextmanager
def tiled_rows(tasks):
    """Declares the routed rows of the forward pass traced inside tiled
    (`tile_tasks(x, tasks)`): equal, contiguous blocks, the k-th holding
    the rows of the k-th task of `tasks` (T: tasks 0 .. T-1; or task ids,
    e.g. `[t]` for a pass of task t alone). Layers that hold per-task state
    then split the rows instead of partitioning them by id: the same values,
    fewer ops, and graphs TFLite converts without Flex ops (no
    DynamicPartition / DynamicStitch)."""
    stack = _scopes.__dict__.setdefault("tiled", [])
    stack.append(task_blocks(tasks))
    try:
        yield
    finally:
        stack.pop()


def tiled_tasks(num_tasks=None):
    """The task of each block of the rows being traced (`tiled_rows`), or
    None when they are not tiled or hold a task that a layer of `num_tasks`
    tasks does not have."""
    stack = getattr(_scopes, "tiled", None)
    if stack and (num_tasks is None or max(stack[-1]) < num_tasks):
        return stack[-1]
    return None


class TaskConditioned(keras.layers.Layer):
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

    def routes_tasks(self, training):
        return True

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


def apply_conditioned(layer, x, task_ids, training, route):
    """Calls a conditioned layer where it routes tasks, first entering the
    routed part (`route(x) -> (x, task_ids)`) when the rows have no task yet
    (`task_ids` None); returns `(x, task_ids)`. Where the layer does not
    route it is the identity and is not traced at all (no mask op in an
    inference graph)."""
    if not layer.routes_tasks(training):
        return x, task_ids
    if task_ids is None:
        x, task_ids = route(x)
    return layer(x, task_ids, training=training), task_ids
