"""Binary channel partitions: Maximum Roaming and fixed partitioning.

Pascal, Michiardi, Bost, Huet and Zuluaga, "Maximum Roaming Multi-Task
Learning" (papers/003); equation numbers are the paper's. Fixed
partitioning is Strezoski et al.'s Task Routing: the same partition, never
updated.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_mtl.layers.base import TaskConditioned, mask_channels

SELECTIONS = ("random", "least_aligned")


@keras.saving.register_keras_serializable(package="tf_mtl")
class ChannelPartition(TaskConditioned):
    """Task t uses the channels of its column of M (eq. 2):
    `y_i = x_i * m_{t_i}`, channel-wise, with M a binary T x C matrix.

    Put after normalisation and before the activation (a backbone's site).
    Every task keeps `round(p * C)` channels, p the sharing ratio, and every
    channel starts with at least one task (constraint 3): as in the
    reference code, channel j first goes to task `j mod T` (a minimal
    cover), then each task is filled up to its count with channels drawn
    uniformly. (The paper's alternative, a Bernoulli(p) draw per entry with
    uncovered channels given to one task, gives tasks unequal counts, which
    would end their plans at different steps.) Constraint 3 with equal
    counts needs p >= 1/T (p = 1/T: the disjoint partition); a smaller p
    is refused, as every p below it would give that same partition.

    `roam()` is one step of the update plan (Definition 1, eq. 4): per task,
    one active channel off and one never-visited channel on. The partition
    M, the visited sets B_t and the update count c are non-trainable
    weights: they are saved and restored with the model, and each step's
    draw is a function of `(seed, c)`, so a resumed plan continues as an
    uninterrupted one. Inference uses each task's current mask too (the
    paper's evaluation).

    Args:
        num_tasks: T.
        sharing_ratio: p in [1/T, 1], the fraction of channels of each task.
        seed: seed of the initial partition and of the plan's draws.

    Example:

    >>> x = keras.Input((16,))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> y = ChannelPartition(num_tasks=3, sharing_ratio=0.5)(x, task_ids)
    """

    float32_state = True

    def __init__(self, num_tasks, sharing_ratio=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_tasks) < 1:
            raise ValueError(f"`num_tasks` must be >= 1. Received: {num_tasks}")
        if not 1.0 / int(num_tasks) - 1e-9 <= sharing_ratio <= 1.0:
            raise ValueError(
                f"`sharing_ratio` must be in [1/T, 1] = [{1 / int(num_tasks):.4g}, 1] for "
                f"{num_tasks} tasks: every channel keeps a task (constraint 3), so below "
                f"1/T each task holds C/T channels whatever p. Received: "
                f"sharing_ratio={sharing_ratio}")
        self.num_tasks = int(num_tasks)
        self.sharing_ratio = float(sharing_ratio)
        self.seed = int(np.random.randint(2**31 - 1) if seed is None else seed)

    def build(self, x_shape, task_ids_shape=None):
        channels = x_shape[-1]
        if channels < self.num_tasks:
            raise ValueError(f"{self.name}: {channels} channels cannot give each of "
                             f"{self.num_tasks} tasks one (constraint 3).")
        init = initial_partition(self.num_tasks, channels, self.sharing_ratio, self.seed)
        constant = lambda value: (lambda shape, dtype=None: tf.constant(value, dtype))
        self.partition = self.add_weight(shape=init.shape, name="partition",
                                         initializer=constant(init), trainable=False)
        self.visited = self.add_weight(shape=init.shape, name="visited",
                                       initializer=constant(init), trainable=False)
        self.updates = self.add_weight(shape=(), name="updates", initializer="zeros",
                                       dtype="int64", trainable=False)

    def routes_tasks(self, training):
        return True  # each task's own mask, in training and at inference

    def call(self, x, task_ids, training=None):
        return mask_channels(x, tf.gather(self.partition, tf.cast(task_ids, tf.int32)))

    def compute_output_shape(self, x_shape, task_ids_shape=None):
        return x_shape

    # -- the update plan -------------------------------------------------------

    def plan_length(self):
        """Updates until some task has visited every channel: (1 - p) C."""
        visited = self.visited.numpy() > 0
        return int(self.updates.numpy()) + int((~visited).sum(axis=1).min())

    def update_ratio(self):
        """r(c) = c / ((1 - p) C) (eq. 6): how far the plan has gone."""
        length = self.plan_length()
        return 1.0 if length == 0 else int(self.updates.numpy()) / length

    def overlap(self):
        """Mean over task pairs of the fraction of channels both use."""
        m = self.partition.numpy() > 0
        pairs = [(m[s] & m[t]).mean() for s in range(len(m)) for t in range(s + 1, len(m))]
        return float(np.mean(pairs)) if pairs else 1.0

    def roam(self, completion=1.0, selection="random", kernel=None):
        """One update of the plan (eq. 4), unless it is over: r(c) has
        reached `completion` (eq. 6) or a task has visited every channel.
        Returns whether M changed.

        Per task t, i- leaves A_t (the active channels) and i+, never
        visited, joins it and B_t. `selection`: `"random"`, uniform (the
        paper's method), or `"least_aligned"`, the paper's ablation on the
        filters `kernel` (`(..., C)`, channel last): by |cosine similarity|,
        i+ is the unvisited channel least aligned with A_t and i- the active
        channel most aligned with the rest of A_t: the paper's stated intent
        (its printed argmin / argmax are the other way round).
        """
        if selection not in SELECTIONS:
            raise ValueError(f"`selection` must be one of {SELECTIONS}. "
                             f"Received: selection={selection!r}")
        updates = int(self.updates.numpy())
        if updates >= completion * self.plan_length():
            return False
        active, visited = self.partition.numpy() > 0, self.visited.numpy() > 0
        similarity = None
        if selection == "least_aligned":
            if kernel is None:
                raise ValueError(f"{self.name}: `least_aligned` selection needs the "
                                 "filters (`kernel`) of the layer the partition masks.")
            similarity = filter_similarity(kernel)
        roam_step(active, visited, np.random.default_rng([self.seed, updates]), similarity)
        self.partition.assign(active.astype("float32"))
        self.visited.assign(visited.astype("float32"))
        self.updates.assign(updates + 1)
        return True

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks,
                "sharing_ratio": self.sharing_ratio, "seed": self.seed}


def initial_partition(num_tasks, channels, sharing_ratio, seed):
    """M(0), `(T, C)` float32: channel j to task `j mod T` (constraint 3),
    then each task filled uniformly up to `round(p * C)` channels."""
    partition = np.zeros((num_tasks, channels), bool)
    partition[np.arange(channels) % num_tasks, np.arange(channels)] = True
    rng = np.random.default_rng(seed)
    count = int(round(sharing_ratio * channels))
    for t in range(num_tasks):
        free = np.flatnonzero(~partition[t])
        missing = count - partition[t].sum()
        if missing > 0:
            partition[t, rng.choice(free, missing, replace=False)] = True
    return partition.astype("float32")


def roam_step(active, visited, rng, similarity=None):
    """Eq. (4) on boolean `(T, C)` arrays A and B, in place: per task t,
    i- leaves A_t and i+ (not in B_t) joins A_t and B_t; both uniform
    (`similarity` None) or, given the channels' `(C, C)` |cosine|
    similarity, i+ the least aligned with A_t and i- the most aligned with
    the rest of A_t."""
    for t in range(len(active)):
        on, off = np.flatnonzero(active[t]), np.flatnonzero(~visited[t])
        if similarity is None:
            leaving, joining = rng.choice(on), rng.choice(off)
        else:
            to_rest = similarity[np.ix_(on, on)].sum(axis=1) - np.diag(similarity)[on]
            leaving = on[np.argmax(to_rest)]
            joining = off[np.argmin(similarity[np.ix_(off, on)].sum(axis=1))]
        active[t, leaving], active[t, joining], visited[t, joining] = False, True, True


def filter_similarity(kernel):
    """|cosine similarity| of the filters of every pair of output channels
    of `kernel` (`(..., C)`: channel u's filter is `kernel[..., u]`)."""
    filters = np.reshape(kernel, (-1, np.shape(kernel)[-1])).T
    unit = filters / np.maximum(np.linalg.norm(filters, axis=1, keepdims=True), 1e-12)
    return np.abs(unit @ unit.T)
