"""MultiTaskModel: one backbone, one head per task, task-routed batches."""

import functools
import weakref

import keras
import numpy as np
import tensorflow as tf

from tf_mtl import tasks as tasks_module
from tf_mtl.backbones import Block, run_layers, run_tiled
from tf_mtl.layers.passing import fold_passing, folded_passing
from tf_mtl.layers.base import TaskConditioned, objective_scope, tile_tasks, tiled_rows
from tf_mtl.layers.task_batch_norm import TaskBatchNormalization
from tf_mtl.training import ConditionedTraining, worker_logs


ROUTINGS = ("tiled", "sequential")


def routing_option(routing):
    """`{"routing": routing}` for a builder, or `{}` (None: the builder's
    own default)."""
    return {} if routing is None else {"routing": routing}


def all_replicas_sum(value):
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: nothing to reduce
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


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

    Evaluation and inference always use one pass (`call`).

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
    >>> history = model.fit(mf.train, epochs=1)
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
        _check_routed_part(self.backbone)
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
                  for l in block._flatten_layers(include_self=True, recursive=True)]
        self._term_trackers = {name: keras.metrics.Mean(name=name) for name in sorted(
            {getattr(l, "objective_name", None) for l in layers} - {None})}
        self._task_metrics = {
            task.name: [keras.metrics.Mean(name=f"{task.name}_loss")]
            + [m.build(f"{task.name}_{m.name}") for m in task.metrics]
            for task in tasks
        }
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
        return [self._loss_tracker, *self._term_trackers.values()] + [
            m for metrics in self._task_metrics.values() for m in metrics
        ]

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

    def features(self, x, task_ids=None, training=False):
        """Runs the backbone on a batch serving every task (`task_ids` None)
        or on rows of the given tasks; returns the features and the task of
        each row (None when every row serves every task)."""
        if task_ids is not None:
            features, routed = run_layers(self.backbone, x, lambda r: (r, task_ids),
                                          training)
            return features, task_ids if routed is None else routed
        return run_tiled(self.backbone, x, self.num_tasks, training)

    def _heads(self, features, row_tasks, training, tiled):
        """Per-task predictions, and each task's row indices when routed
        (`tiled`: the rows were tiled, not given their tasks by the data)."""
        if row_tasks is None:
            return {n: self.heads[n](features, training=training)
                    for n in self.task_names}, None
        if tiled:  # task t's rows are the t-th of T equal blocks
            split = lambda values: tf.split(values, self.num_tasks)
        else:
            split = lambda values: tf.dynamic_partition(values, row_tasks, self.num_tasks)
        rows, parts = split(tf.range(tf.shape(features)[0])), split(features)
        return {n: self.heads[n](p, training=training)
                for n, p in zip(self.task_names, parts)}, rows

    def call(self, x, training=False):
        """`x -> {task_name: output}` for a batch serving every task."""
        features, row_tasks = self.features(x, None, training)
        return self._heads(features, row_tasks, training, tiled=True)[0]

    def deployable_call(self):
        """The function `x -> {task_name: output}` a deployment runs (what
        `tf_mtl.export` traces): the model at inference. A method whose
        inference can drop parts of the model overrides it. Passed layers
        serve their passed weights, with no passing matrix in the graph."""
        folded = fold_passing(self)

        def call(x):
            with folded_passing(folded):
                return self(x, training=False)

        return call

    # -- training ----------------------------------------------------------

    def _task_weights(self):
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

    def _task_loss(self, task, y_true, y_pred):
        """Per-example loss of one task; updates its metrics. Checks its
        labels in the graph (what `check_dataset` could not see)."""
        if y_true.dtype.is_floating:
            y_true = tf.debugging.assert_all_finite(
                y_true, f"NaN or Inf in the labels of task {task.name!r}"
            )
        if task.classes is not None:
            valid = tf.reduce_all((y_true >= 0) & (y_true < task.classes))
            check = tf.debugging.Assert(valid, [
                # No quotes: TensorFlow escapes them in the error message.
                f"Task {task.name}: class ids outside 0..{task.classes - 1}:",
                tf.boolean_mask(y_true, (y_true < 0) | (y_true >= task.classes))])
            with tf.control_dependencies([check]):  # before the loss reads them
                y_true = tf.identity(y_true)
        for metric in self._task_metrics[task.name][1:]:
            metric.update_state(y_true, y_pred)
        return tf.cast(task.loss(y_true, y_pred), tf.float32)

    def _objective(self, losses, rows, row_tasks, scope, regularized=True):
        """This replica's share of the objective.

        `losses[t]` holds the per-row losses of task t, `rows[t]` their rows
        (None when every row serves every task); `scope` the conditioned
        layers' records of the forward pass; `regularized`: whether to add
        the weight regularizers (once per step). Updates the per-task loss
        metrics.
        """
        counts = tf.stack([tf.cast(tf.size(l), tf.float32) for l in losses])
        global_counts = tf.maximum(all_replicas_sum(counts), 1.0)
        weights = self._task_weights()
        sums = tf.stack([tf.reduce_sum(l) for l in losses])
        loss = tf.reduce_sum(weights * sums / global_counts)
        for task, total, count in zip(self.tasks, tf.unstack(sums), tf.unstack(counts)):
            self._task_metrics[task.name][0].update_state(
                tf.math.divide_no_nan(total, count), sample_weight=count
            )
        if scope.records:
            row_losses = tf.dynamic_stitch(rows, losses)
            row_weights = tf.gather(weights / global_counts, row_tasks)
            loss += scope.terms(row_losses, row_weights)
        if regularized and self.losses:  # weight regularizers: one share per replica
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            loss += tf.add_n(self.losses) / replicas
        return loss

    def _track_loss(self, loss, x, named=None):
        # `loss` is this replica's share of the objective: scaled by the
        # number of replicas and weighted alike on each, their mean is the
        # objective, whatever share of the batch each replica holds. So are
        # the layers' `named` terms.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = all_replicas_sum(tf.cast(tf.shape(x)[0], tf.float32))
        for tracker, value in [(self._loss_tracker, loss)] + [
                (self._term_trackers[n], v) for n, v in (named or {}).items()]:
            tracker.update_state(value * replicas, sample_weight=global_batch / replicas)

    def _step(self, data, training):
        """Loss of one batch in one pass (this replica's share)."""
        x, task_ids, labels = self._unpack(data)
        with objective_scope() as scope:
            features, row_tasks = self.features(x, task_ids, training)
        preds, rows = self._heads(features, row_tasks, training, tiled=task_ids is None)
        losses = [self._task_loss(t, labels[t.name], preds[t.name]) for t in self.tasks]
        loss = self._objective(losses, rows, row_tasks, scope)
        self._track_loss(loss, x, scope.named)
        if training:
            self._check_finite(loss)
        return loss

    def _check_finite(self, loss):
        # In program order before the update, so no weight becomes NaN.
        tf.debugging.Assert(tf.math.is_finite(loss), [
            "The training objective is NaN or Inf at step", self.optimizer.iterations,
            "(non-finite inputs, or a diverging run: lower the learning rate)."])

    def _logs(self):
        return worker_logs({m.name: m.result() for m in self.metrics})

    def train_step(self, data):
        first = next((i for i, layer in enumerate(self.backbone)
                      if _routes_tasks(layer, True)), None)
        if self.routing == "sequential" and self.jointly_labelled and first is not None:
            gradients = self._sequential_gradients(data, first)
        else:
            with tf.GradientTape() as tape:
                loss = self.optimizer.scale_loss(self._step(data, training=True))
            gradients = tape.gradient(loss, self.trainable_variables)
        self.apply_conditioned_gradients(gradients)
        return self._logs()

    def _sequential_gradients(self, data, first):
        """Gradients of the objective with one forward-backward pass of the
        routed part per task (`routing="sequential"`).

        The stem, everything before the point where rows enter the routed
        part (inside backbone layer `first` when that is a block entered at
        a site), runs once; its gradients come from the tasks' summed
        gradients of its output.
        """
        x, _, labels = self._unpack(data)
        block = self.backbone[first]
        site = block.entry_site(True) if isinstance(block, Block) else -1
        with tf.GradientTape() as stem_tape:
            stem, _ = run_layers(self.backbone[:first], x, None, True)  # nothing routes
            stem = block.run_until(site, stem, True) if site >= 0 else (stem,)
        variables = self.trainable_variables
        stem_grads = [tf.zeros_like(s) for s in stem]
        accumulated = [tf.zeros_like(v) for v in variables]
        batch = tf.shape(x)[0]
        no_rows = tf.zeros([0], tf.int32)
        total, named = 0.0, {}
        for t, task in enumerate(self.tasks):
            # Task t starts once task t - 1 is done: its activations can go.
            with tf.control_dependencies(stem_grads + accumulated):
                inputs = [tf.identity(s) for s in stem]
            route = functools.partial(tile_tasks, tasks=[t])
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                with objective_scope() as scope, tiled_rows([t]):
                    if site >= 0:
                        features, row_tasks = block.run_from(site, inputs, None, True, route)
                        suffix = self.backbone[first + 1:]
                    else:
                        (features,), row_tasks, suffix = inputs, None, self.backbone[first:]
                    features, row_tasks = run_layers(suffix, features, route, True, row_tasks)
                pred = self.heads[task.name](features, training=True)
                losses = [tf.zeros([0])] * self.num_tasks
                losses[t] = self._task_loss(task, labels[task.name], pred)
                rows = [no_rows] * self.num_tasks
                rows[t] = tf.range(batch)
                loss = self._objective(losses, rows, row_tasks, scope, regularized=t == 0)
                scaled = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, inputs + variables)
            stem_grads = _accumulate(stem_grads, grads[:len(inputs)])
            accumulated = _accumulate(accumulated, grads[len(inputs):])
            total += loss
            for name, value in scope.named.items():
                named[name] = named.get(name, 0.0) + value
        self._track_loss(total, x, named)
        self._check_finite(total)
        return _accumulate(accumulated, stem_tape.gradient(list(stem), variables,
                                                           output_gradients=stem_grads))

    def test_step(self, data):
        self._step(data, training=False)
        return self._logs()

    # -- checks before any step runs ---------------------------------------

    def compile(self, optimizer="adam", loss=None, metrics=None, jit_compile=False,
                **kwargs):
        """Keras' `compile`; losses and metrics come from the `Task`s.

        `jit_compile` defaults to False: the routed step has data-dependent
        shapes (task partitions) that XLA would recompile for.
        """
        if loss is not None or metrics is not None:
            raise ValueError(
                "MultiTaskModel takes its losses and metrics from its Tasks; "
                "do not pass `loss` or `metrics` to compile."
            )
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def fit(self, x=None, y=None, validation_data=None, **kwargs):
        if y is not None:
            raise ValueError(
                "MultiTaskModel reads labels from the dataset `x`; `y` must be None."
            )
        counts = self.check_dataset(x, "x")
        if validation_data is not None:
            self.check_dataset(validation_data, "validation_data")
        if not self.jointly_labelled and not float(tf.reduce_sum(self.task_frequencies)):
            if counts is None:
                raise ValueError(
                    "`x` is endless, so its N_t / N weights cannot be counted: "
                    "pass `task_frequencies` to this non-jointly labelled model.")
            self.set_task_frequencies(counts)
        return super().fit(self.training_batches(x), validation_data=validation_data,
                           **kwargs)

    def training_batches(self, x):
        """What `train_step` receives from `fit(x)`: `x`'s batches. (A
        bi-level model pairs them with held-out ones.)"""
        return x

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


def _accumulate(sums, gradients):
    """`sums + gradients`, where a None gradient (not connected) adds 0."""
    return [s if g is None else s + tf.convert_to_tensor(g) for s, g in zip(sums, gradients)]


def _check_routed_part(backbone):
    """Refuses a plain batch normalisation after the first conditioned layer:
    its statistics would mix the rows of different tasks."""
    conditioned = False
    for layer in backbone:
        conditioned = conditioned or (
            isinstance(layer, TaskConditioned)
            or isinstance(layer, Block) and bool(layer.conditioned_layers()))
        if conditioned and isinstance(layer, keras.layers.BatchNormalization) \
                and not isinstance(layer, TaskBatchNormalization):
            raise ValueError(
                f"Backbone layer {layer.name!r} is a BatchNormalization after a "
                "task-conditioned layer: its batch statistics would mix the "
                "tasks' rows. Use tf_mtl.layers.TaskBatchNormalization there."
            )


def _routes_tasks(layer, training):
    return isinstance(layer, (Block, TaskConditioned)) and layer.routes_tasks(training)
