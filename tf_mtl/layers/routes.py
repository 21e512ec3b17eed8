"""How rows without a task enter the task-conditioned part of a network
(DESIGN.md, task-routed batches), and what its layers read of them.

Everything before the first layer that needs task ids runs once on the
batch; there a *route* gives every row its task,

    route(rows) -> (routed_rows, task_ids),

and from there on each layer computes on `(x, task_ids)`. Two routes:

- `Tiled(tasks)`: a jointly labelled batch, repeated once per task (T x B
  rows, task k's the k-th block). A training step with `routing="tiled"`
  takes all tasks in one pass; `routing="sequential"` one pass per task,
  `Tiled([t])` (`tf_mtl.routing`).
- `DataRouted(task_ids)`: a batch whose examples each serve one task, the
  task given by the data; the rows are not copied.

The part a route enters is traced inside `route.scope()`: there layers that
hold per-task state read the tiled blocks' tasks (`tiled_tasks`) and split
the rows by static slices instead of partitioning them by id (the same
values, fewer ops, and graphs TFLite converts without Flex ops).
"""

import contextlib
import threading

import tensorflow as tf


class Route:
    """Gives rows without a task their task: `route(rows) -> (rows, task_ids)`.

    `tasks` is the task of each block of tiled rows, or None where the
    rows' tasks come from the data.
    """

    tasks = None

    def __call__(self, rows):
        raise NotImplementedError

    def scope(self):
        """The context the routed part is traced in."""
        return contextlib.nullcontext()


class Tiled(Route):
    """A jointly labelled batch, repeated once per task: rows `[k*B, (k+1)*B)`
    belong to the k-th task of `tasks` (T: tasks 0 .. T-1; or a sequence of
    task ids, e.g. `[t]` for a pass of task t alone)."""

    def __init__(self, tasks):
        self.tasks = task_blocks(tasks)

    def __call__(self, rows):
        task_ids = tf.repeat(tf.constant(self.tasks, tf.int32), tf.shape(rows)[0])
        return tf.concat([rows] * len(self.tasks), axis=0), task_ids

    def scope(self):
        return _tiled_scope(self.tasks)


class DataRouted(Route):
    """Rows whose tasks the data gives (`task_ids`, `(B,)`): not copied."""

    def __init__(self, task_ids):
        self.task_ids = task_ids

    def __call__(self, rows):
        return rows, self.task_ids


class Recorded(Route):
    """`route`, each entry handed to `record(rows, routed, task_ids)`, its
    rows cut from the gradient of what ran before
    (`tf_mtl.task_gradients.RepresentationTap`)."""

    def __init__(self, route, record):
        self.route, self.record = route, record
        self.tasks = route.tasks

    def __call__(self, rows):
        routed, task_ids = self.route(tf.stop_gradient(rows))
        self.record(rows, routed, task_ids)
        return routed, task_ids

    def scope(self):
        return self.route.scope()


def task_blocks(tasks):
    """`tasks` (T, or a sequence of task ids) as a tuple of task ids."""
    if isinstance(tasks, int):
        return tuple(range(tasks))
    return tuple(int(t) for t in tasks)


# The tiled scopes of the passes being traced, one stack per thread:
# MirroredStrategy traces each replica's step in a thread of its own.
_tiled = threading.local()


@contextlib.contextmanager
def _tiled_scope(tasks):
    stack = _tiled.__dict__.setdefault("stack", [])
    stack.append(tasks)
    try:
        yield
    finally:
        stack.pop()


def tiled_tasks(num_tasks=None):
    """The task of each block of the tiled rows being traced (`Tiled.scope`),
    or None when they are not tiled or hold a task that a layer of
    `num_tasks` tasks does not have."""
    stack = getattr(_tiled, "stack", None)
    if stack and (num_tasks is None or max(stack[-1]) < num_tasks):
        return stack[-1]
    return None
