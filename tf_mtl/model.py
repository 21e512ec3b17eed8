"""MultiTaskModel: one backbone, one head per task, task-routed batches."""

import weakref

import keras
import numpy as np
import tensorflow as tf

from tf_mtl import objective, task_gradients
from tf_mtl import tasks as tasks_module
from tf_mtl._keras import flatten_layers
from tf_mtl.backbones import run_routed
from tf_mtl.layers.base import deployed, objective_scope
from tf_mtl.layers.routes import DataRouted, Tiled
from tf_mtl.routing import (
    ROUTINGS, check_routed_part, first_routed_layer, one_pass_gradients,
    sequential_gradients)
from tf_mtl.training import ConditionedTraining, worker_logs


@keras.saving.register_keras_serializable(package="tf_mtl")
class MultiTaskModel(ConditionedTraining, keras.Model):
    """A shared backbone and one head per task, trained with `fit`.

    Batches are routed by task (DESIGN.md, "task-routed batches"):

    - *Jointly labelled* data yields `(x, {task_name: y})`. The backbone runs
      once on `x` up to the first task-conditioned layer that is active in
      this mode; there the features are tiled T times with
      `task_ids = repeat(range(T), B)`, and the rows of task t go to head t.
      A backbone with no active conditioned layer (hard sharing) never tiles.
    - *Non-jointly labelled* data yields `(x, task_id, y)`: every example
      belongs to one task, conditioned layers read `task_id` and each head
      sees its own examples. Following MPPS appendix 7.1 the objective is
      `sum_t (N_t / N) * mean loss of task t`, with N_t counted exactly, in
      one pass over the training set's task ids, when `fit` starts (or given
      as `task_frequencies`). Up to 1/N this is eq. (6), the sum of the loss
      over every example; the bound of 7.1 read literally (the N_t/N weight
      on each example's term) would weight task means by N_t^2 instead.

    How a jointly labelled training batch crosses the task-conditioned part
    is `routing`:

    - `"tiled"` (default): one pass over the T x B tiled rows. Fastest; the
      conditioned part keeps T times the activations of hard sharing.
    - `"sequential"`: the stem (everything before the first site that
      routes, the layers of its block before it included) runs once, then
      the conditioned part and head of each task run on the B rows, each
      followed at once by its backward pass, with gradients accumulated
      (stem gradients from the summed gradients of its output). Same FLOPs,
      activation memory close to hard sharing. Batch normalisation in the conditioned part then sees each
      task's pass on its own, as in the paper's T forward passes.

    Evaluation and inference always use one pass (`call`). Where a
    conditioned layer routes tasks at inference too (Maximum Roaming's
    partitions, MTAN's attention), inference is per task, and from the first
    layer that routes, each `TaskBatchNormalization` keeps per-task moving
    statistics (`keep_task_statistics`; a block may keep a shared part
    pooled, as MTAN's shared network); where none does (MPPS, whose
    inference is the fully shared backbone), they stay pooled.

    The objective is `sum_t w_t * mean_t(loss_t)` (eq. 1, w_t the task's
    `loss_weight`, times N_t/N for non-jointly labelled data) plus the terms
    of the conditioned layers (`TaskConditioned.objective_terms`). Means are
    taken over the global batch, so the loss and its gradients are the same
    under `tf.distribute` as on one device.

    Logs hold `loss` and, per task, `{task}_loss` and `{task}_{metric}`.

    Args:
        backbone: list of layers: plain Keras layers, `Block`s with
            conditioning sites, or `TaskConditioned` layers.
        tasks: the `Task`s, in task-id order.
        input_shape: shape of one input example, e.g. `(28, 28, 1)`.
        jointly_labelled: which of the two data layouts above `fit` expects.
        task_frequencies: N_t / N for non-jointly labelled data; counted from
            the training data by `fit` when None.
        routing: `"tiled"` or `"sequential"`, see above.
        heads: `{task_name: layer}` to use instead of each task's own
            `Task.head()` (e.g. Safe MTL's gated decoders); saved with the
            model.

    Example:

    >>> from tf_mtl import backbones, data, tasks
    >>> mf = data.load("synthetic")
    >>> heads = [tasks.classification(n, k) for n, k in mf.task_classes.items()]
    >>> model = MultiTaskModel(backbones.lenet(), heads, (28, 28, 1))
    >>> model.compile(optimizer="adam")
    >>> history = model.fit(mf.train, epochs=1, verbose=0)
    """

    def __init__(self, backbone, tasks, input_shape, jointly_labelled=True,
                 task_frequencies=None, routing="tiled", heads=None, **kwargs):
        super().__init__(**kwargs)
        if routing not in ROUTINGS:
            raise ValueError(
                f"`routing` must be one of {ROUTINGS}. Received: routing={routing!r}"
            )
        self.routing = routing
        tasks = tuple(tasks)
        names = [task.name for task in tasks]
        if not tasks or len(set(names)) != len(names):
            raise ValueError(
                f"`tasks` must be a non-empty list of distinct tasks. Received "
                f"task names: {names}"
            )
        self.backbone = list(backbone)
        check_routed_part(self.backbone)
        self.tasks = tasks
        self.task_names = tuple(names)
        self.example_shape = tuple(input_shape)
        self.jointly_labelled = bool(jointly_labelled)
        if heads is not None and set(heads) != set(names):
            raise ValueError(f"`heads` must have one layer per task {names}. "
                             f"Received heads for {sorted(heads)}.")
        self._custom_heads = heads is not None
        self.heads = {t.name: heads[t.name] if heads else t.head() for t in tasks}
        self.task_frequencies = self.add_weight(
            shape=(len(tasks),), initializer="zeros", trainable=False,
            name="task_frequencies",
        )
        if task_frequencies is not None:
            self.set_task_frequencies(task_frequencies)
        self._checked = weakref.WeakKeyDictionary()  # dataset -> its task counts
        self._loss_tracker = keras.metrics.Mean(name="loss")
        # Terms the conditioned layers add to the training objective (MPPS:
        # `kl`), logged apart: evaluation runs without them.
        layers = [l for block in self.backbone
                  for l in flatten_layers(block)]
        self._term_trackers = {name: keras.metrics.Mean(name=name) for name in sorted(
            {getattr(l, "objective_name", None) for l in layers} - {None})}
        first = first_routed_layer(self.backbone, False)
        if first is not None:
            # Inference is per task (DESIGN.md): from where the rows are
            # routed, each task normalises with its own training statistics.
            for layer in self.backbone[first:]:
                if hasattr(layer, "keep_task_statistics"):
                    layer.keep_task_statistics(self.num_tasks)
        self._task_metrics = {
            task.name: [keras.metrics.Mean(name=f"{task.name}_loss")]
            + [m.build(f"{task.name}_{m.name}") for m in task.metrics]
            for task in tasks
        }
        self._weight_trackers = []
        self(np.zeros((1,) + self.example_shape, "float32"))

    def get_config(self):
        return {
            "name": self.name,
            "backbone": [keras.saving.serialize_keras_object(l) for l in self.backbone],
            "tasks": [task.get_config() for task in self.tasks],
            "input_shape": self.example_shape,
            "jointly_labelled": self.jointly_labelled,
            "routing": self.routing,
            "heads": {n: keras.saving.serialize_keras_object(h) for n, h in self.heads.items()}
            if self._custom_heads else None,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        backbone = [keras.saving.deserialize_keras_object(l)
                    for l in config.pop("backbone")]
        task_list = [tasks_module.from_config(t) for t in config.pop("tasks")]
        if config.get("heads"):
            config["heads"] = {n: keras.saving.deserialize_keras_object(h)
                               for n, h in config["heads"].items()}
        return cls(backbone, task_list, **config)

    @property
    def num_tasks(self):
        return len(self.tasks)

    @property
    def metrics(self):
        weighting = [] if self.weighting is None else self.weighting.metrics  # gradnorm_loss
        return [self._loss_tracker, *self._term_trackers.values()] + [
            m for metrics in self._task_metrics.values() for m in metrics
        ] + self._weight_trackers + weighting

    def set_task_frequencies(self, frequencies):
        """Sets N_t / N from counts or frequencies of each task."""
        frequencies = np.asarray(frequencies, "float64")
        if frequencies.shape != (self.num_tasks,) or frequencies.sum() <= 0 or (
            frequencies < 0
        ).any():
            raise ValueError(
                f"`task_frequencies` must be {self.num_tasks} non-negative "
                f"numbers, not all zero. Received: {frequencies.tolist()}"
            )
        self.task_frequencies.assign(frequencies / frequencies.sum())

    # -- forward -----------------------------------------------------------

    def features(self, x, task_ids=None, training=False, tap=None):
        """Runs the backbone on a batch serving every task (`task_ids` None)
        or on rows of the given tasks; returns the features and the task of
        each row (None when every row serves every task).

        A `tf_mtl.task_gradients.RepresentationTap` records where rows enter
        the routed part; with nothing routed in the backbone they enter it
        before the heads."""
        route = Tiled(self.num_tasks) if task_ids is None else DataRouted(task_ids)
        route = tap.wrap(route) if tap else route
        features, routed = run_routed(self.backbone, x, route, training)
        if tap is not None and routed is None:
            features, routed = route(features)
        return features, task_ids if routed is None else routed

    def _heads(self, features, task_ids, training, tiled):
        """Per-task predictions, and each task's row indices when routed
        (`tiled`: the rows were tiled, not given their tasks by the data)."""
        if task_ids is None:
            return {n: self.heads[n](features, training=training)
                    for n in self.task_names}, None
        if tiled:  # task t's rows are the t-th of T equal blocks
            split = lambda values: tf.split(values, self.num_tasks)
        else:
            split = lambda values: tf.dynamic_partition(values, task_ids, self.num_tasks)
        rows, parts = split(tf.range(tf.shape(features)[0])), split(features)
        return {n: self.heads[n](p, training=training)
                for n, p in zip(self.task_names, parts)}, rows

    def call(self, x, training=False):
        """`x -> {task_name: output}` for a batch serving every task."""
        features, task_ids = self.features(x, None, training)
        return self._heads(features, task_ids, training, tiled=True)[0]

    def deployable_call(self):
        """The function `x -> {task_name: output}` a deployment runs (what
        `tf_mtl.export` traces): the model at inference. A method whose
        inference can drop parts of the model overrides it. Its conditioned
        layers compute as deployed (`TaskConditioned.deployment`: passed
        layers serve their passed weights, no passing matrix in the graph)."""
        return deployed(self, lambda x: self(x, training=False))

    # -- training ----------------------------------------------------------
    #
    # The step is `ConditionedTraining.train_step`; this model's part is the
    # per-task losses of a routed batch (`forward_objective`) and their
    # gradients (`step_gradients`, `tf_mtl.routing`).

    def _base_weights(self):
        weights = tf.constant([t.loss_weight for t in self.tasks], tf.float32)
        if self.jointly_labelled:
            return weights
        return weights * tf.cast(self.task_frequencies, tf.float32)

    def _unpack(self, data):
        """`(x, task_ids or None, {task_name: labels})` of a batch."""
        if self.jointly_labelled:
            x, labels = data
            return x, None, labels
        x, task_ids, y = data
        task_ids = tf.cast(task_ids, tf.int32)
        parts = tf.dynamic_partition(y, task_ids, self.num_tasks)
        return x, task_ids, dict(zip(self.task_names, parts))

    def task_loss(self, task, y_true, y_pred):
        """Per-example loss of one task (`tf_mtl.objective.task_loss`)."""
        return objective.task_loss(task, y_true, y_pred, self._task_metrics[task.name][1:])

    def split_objective(self, losses, rows, task_ids, scope, weights, regularized=True):
        """`(task_losses, rest)` of this replica (`tf_mtl.objective.
        split_objective`); `regularized`: whether to add the weight
        regularizers (once per step)."""
        return objective.split_objective(
            losses, rows, task_ids, scope, self._base_weights(), weights,
            [m[0] for m in self._task_metrics.values()],
            self.losses if regularized else ())

    def forward_objective(self, x, task_ids, labels, weights, tap=None, training=True):
        """One pass over every task's rows: `(task_losses, rest, named terms)`."""
        tiled = task_ids is None
        with objective_scope() as scope:
            features, task_ids = self.features(x, task_ids, training, tap)
        preds, rows = self._heads(features, task_ids, training, tiled)
        losses = [self.task_loss(t, labels[t.name], preds[t.name]) for t in self.tasks]
        task_losses, rest = self.split_objective(losses, rows, task_ids, scope, weights)
        return task_losses, rest, scope.named

    def track_objective(self, loss, step):
        self._track_loss(loss, step.rows, step.named)

    def _track_loss(self, loss, rows, named=None):
        # `loss` is this replica's share of the objective: scaled by the
        # number of replicas and weighted alike on each, their mean is the
        # objective, whatever share of the batch each replica holds. So are
        # the layers' `named` terms.
        replicas = objective.num_replicas()
        global_batch = objective.all_replicas_sum(tf.cast(rows, tf.float32))
        for tracker, value in [(self._loss_tracker, loss)] + [
                (self._term_trackers[n], v) for n, v in (named or {}).items()]:
            tracker.update_state(value * replicas, sample_weight=global_batch / replicas)

    def batch_objective(self, data, training, weights=None):
        """The objective of one batch in one pass, tasks weighted by
        `weights` (None: equally; this replica's share); tracked."""
        x, task_ids, labels = self._unpack(data)
        weights = tf.ones([self.num_tasks]) if weights is None else weights
        task_losses, rest, named = self.forward_objective(x, task_ids, labels, weights,
                                                          training=training)
        loss = tf.reduce_sum(weights * task_losses) + rest
        self._track_loss(loss, tf.shape(x)[0], named)
        if training:
            self.check_finite(loss)
        return loss

    def check_finite(self, loss):
        # In program order before the update, so no weight becomes NaN.
        tf.debugging.Assert(tf.math.is_finite(loss), [
            "The training objective is NaN or Inf at step", self.optimizer.iterations,
            "(non-finite inputs, or a diverging run: lower the learning rate)."])

    def _split_at_the_input(self):
        """Whether the tasks' paths split at the input: per-task copies from
        the first weight on."""
        first = first_routed_layer(self.backbone, True)
        if first is None or any(l.trainable_weights for l in self.backbone[:first]):
            return False
        return bool(getattr(self.backbone[first], "num_tasks", None))

    def shared_variable_indices(self):
        """Indices in `trainable_variables` of the parameters an aggregator
        acts on with `aggregate_on="parameters"`: the backbone's, except
        those a conditioned layer trains with an optimizer of its own."""
        owners = self.variable_optimizers()
        backbone = {id(v) for layer in self.backbone for v in layer.trainable_variables}
        return [i for i, v in enumerate(self.step_variables())
                if id(v) in backbone and owners[id(v)] is self.optimizer]

    def step_gradients(self, data, weights, per_task):
        """The step's gradients (`tf_mtl.training.ConditionedTraining`), the
        batch crossing the routed part as `routing` says."""
        x, task_ids, labels = self._unpack(data)
        weights = tf.ones([self.num_tasks]) if weights is None else weights
        first = first_routed_layer(self.backbone, True)
        if self.routing == "sequential" and task_ids is None and first is not None:
            return sequential_gradients(self, x, labels, first, weights, per_task)
        return one_pass_gradients(self, x, task_ids, labels, weights, per_task)

    def test_step(self, data):
        self.batch_objective(data, training=False)
        return worker_logs(self.get_metrics_result())

    # -- checks before any step runs ---------------------------------------

    def compile(self, optimizer="adam", loss=None, metrics=None, jit_compile=False,
                **kwargs):
        """Keras' `compile` (`ConditionedTraining.compile`: `weighting`,
        `aggregator`, `aggregate_on`, `per_task_gradients`); losses and
        metrics come from the `Task`s. `jit_compile` defaults to False: the
        routed step has data-dependent shapes (task partitions) that XLA
        would recompile for."""
        if loss is not None or metrics is not None:
            raise ValueError(
                "MultiTaskModel takes its losses and metrics from its Tasks; "
                "do not pass `loss` or `metrics` to compile."
            )
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def check_objective(self, weighting, aggregator, aggregate_on, compile_kwargs):
        if task_gradients.needs_task_gradients(weighting, aggregator) \
                and aggregate_on == "representation" and self._split_at_the_input():
            raise ValueError(
                "This model's tasks share no representation: each has its own "
                "column from the input on (per-task copies: PPNet, Cross-stitch). "
                "Aggregate on the parameters: aggregate_on='parameters'.")

    def fit(self, x=None, y=None, validation_data=None, heldout_data=None, **kwargs):
        """Keras' `fit` (`ConditionedTraining.fit`: `heldout_data`), labels
        from the dataset `x`; every dataset checked first (`check_dataset`)."""
        if y is not None:
            raise ValueError(
                "MultiTaskModel reads labels from the dataset `x`; `y` must be None."
            )
        counts = self.check_dataset(x, "x")
        for data, argument in ((validation_data, "validation_data"),
                               (heldout_data, "heldout_data")):
            if data is not None:
                self.check_dataset(data, argument)
        if not self.jointly_labelled and not float(tf.reduce_sum(self.task_frequencies)):
            if counts is None:
                raise ValueError(
                    "`x` is endless, so its N_t / N weights cannot be counted: "
                    "pass `task_frequencies` to this non-jointly labelled model.")
            self.set_task_frequencies(counts)
        return super().fit(x, validation_data=validation_data, heldout_data=heldout_data,
                           **kwargs)

    def evaluate(self, x=None, **kwargs):
        self.check_dataset(x, "x")
        if not self.jointly_labelled and not float(tf.reduce_sum(self.task_frequencies)):
            raise ValueError(
                "The N_t / N weights of this non-jointly labelled model are "
                "unknown: `fit` it first (it counts them on the training "
                "data) or pass `task_frequencies`."
            )
        return super().evaluate(x, **kwargs)

    def check_dataset(self, dataset, argument):
        """Raises a ValueError naming the task, key, value or batch at fault
        when `dataset` does not fit this model (`tf_mtl.validation.
        check_dataset`, one pass over the data); returns each task's number
        of examples (None for endless data). `argument` names the data in
        the errors. A dataset passes once: `fit` does not scan again data
        a caller (e.g. `train.py`, naming its splits) has checked."""
        from tf_mtl import validation

        if not isinstance(dataset, tf.data.Dataset) or dataset not in self._checked:
            self._checked[dataset] = validation.check_dataset(self, dataset, argument)
        return self._checked[dataset]
