"""Training task-conditioned layers in any Keras model.

A conditioned layer may add terms of its own to the objective (an MPPS mask:
eq. 3's KL and the score-function surrogate) and train some variables with an
optimizer of its own (Phi by plain SGD). `ConditionedTraining` is the one
mechanism that honours both, for `MultiTaskModel` and for a user's model:

    model = tf_mtl.Model(inputs, outputs)          # functional
    class MyModel(tf_mtl.Model): ...               # subclassed

then the usual `compile(optimizer, loss)` and `fit`.
"""

import functools

import keras
import tensorflow as tf

from tf_mtl import aggregation, task_gradients, weighting as weightings
from tf_mtl._keras import Functional, flatten_layers, unlocked_tracking
from tf_mtl.layers.base import TaskConditioned, objective_scope
from tf_mtl.objective import all_replicas_sum, num_replicas
from tf_mtl.task_gradients import StepGradients

# Reductions in which a loss is linear in its sample weights.
_LINEAR_REDUCTIONS = ("sum_over_batch_size", "mean", "sum")


def conditioned_layers(model, kind=TaskConditioned):
    """The task-conditioned layers of any Keras model or layer (those of
    `kind`, a subclass), in the order they were added."""
    found = []
    for layer in flatten_layers(model, include_self=False):
        if isinstance(layer, kind) and all(layer is not f for f in found):
            found.append(layer)
    return found


class ConditionedTraining:
    """Mixin of `keras.Model` that trains task-conditioned layers in full, and
    combines the tasks' losses and gradients as `compile` says.

    One training step serves every model (DESIGN.md, composable objectives):

        held-out hook -> task weights -> per-task losses and gradients
        (`step_gradients`) -> aggregation -> weighting -> optimizers

    - `fit_heldout(train, heldout)`: the step of a part fitted on `fit`'s
      `heldout_data` (Auto-Lambda's weights, bi-level gates), first;
    - the weighting's task weights, before the losses are known;
    - `step_gradients(data, weights, per_task)`, the model's own: a
      `tf_mtl.task_gradients.StepGradients` of `sum_t w_t L_t + rest`,
      with the Jacobian of the weighted task losses when an aggregator (or
      GradNorm) needs it. Here, for any Keras model, the compiled loss:
      the tasks are the model's outputs, and `L_t` is the part of the
      compiled loss that output t's sample weights scale (its loss times
      its `loss_weights` entry); regularizers and `add_loss` terms are
      `rest`. `MultiTaskModel` routes its batch by task instead;
    - the conditioned layers' own objective terms (`TaskConditioned.
      objective_terms`) join the objective. They need each row's loss:
      with `loss_i` the compiled loss of row i and `w_i` its weight in the
      batch mean (`sample_weight_i / batch`, Keras' default
      `"sum_over_batch_size"` reduction), `w_i * loss_i` is read exactly as
      the derivative of the compiled loss with respect to a scale of row i's
      sample weight, so every output, loss weight and sample weight counts;
      a per-task term (MPPS's KL) is weighted by its task's share of rows;
    - variables a layer trains with an optimizer of its own
      (`TaskConditioned.dedicated_optimizer`) go to that optimizer, with
      unscaled gradients, and the model's optimizer is built on the others.

    The conditioned layers' rows must be the batch's rows (a layer called on
    `(x, task_ids)` inputs of the model). Saving with `model.save` keeps every
    optimizer's state and the weighting's and aggregator's
    (`compile_from_config` builds the model's optimizer on the variables it
    owns).
    """

    weighting = aggregator = None
    aggregate_on, per_task_gradients = "parameters", "loop"

    @property
    def conditioned_layers(self):
        """The task-conditioned layers of this model."""
        return conditioned_layers(self)

    # -- compile -------------------------------------------------------------

    def compile(self, *args, weighting=None, aggregator=None, aggregate_on="parameters",
                per_task_gradients="loop", **kwargs):
        """Keras' `compile`, with how the tasks' losses and gradients combine.

        Args:
            weighting: a `tf_mtl.weighting.Weighting` (or its name, e.g.
                `"dwa"`): how the task losses are weighted. None: their sum
                (each times its loss weight), weights not logged.
            aggregator: a `tf_mtl.aggregation.Aggregator` (or its name,
                e.g. `"pcgrad"`): how the task gradients combine into one
                update. None: their sum, from one backward pass.
            aggregate_on: where the aggregator (and GradNorm) acts:
                `"parameters"`, every shared parameter, or `"representation"`,
                the rows where the tasks' paths split (`MultiTaskModel`
                only, `tf_mtl.task_gradients`).
            per_task_gradients: how task gradients of the parameters are
                computed: `"loop"`, one backward pass per task, or
                `"vectorized"`, one `pfor`-vectorised Jacobian.

        The shared parameters are those the model's optimizer trains and
        at least two tasks' losses reach; the others keep their plain
        gradient. Whatever the sharing method, the weighting applies to the
        task losses only: a method's own terms (MPPS's KL, a regulariser)
        join the objective unweighted, MPPS's score function sees the
        weighted losses, and variables trained by an optimizer of their own
        (MPPS's Phi) get their plain gradient, never an aggregated one.
        """
        if aggregate_on not in task_gradients.AGGREGATE_ON:
            raise ValueError(f"`aggregate_on` must be one of {task_gradients.AGGREGATE_ON}. "
                             f"Received: aggregate_on={aggregate_on!r}")
        if per_task_gradients not in task_gradients.PER_TASK_GRADIENTS:
            raise ValueError(
                f"`per_task_gradients` must be one of {task_gradients.PER_TASK_GRADIENTS}. "
                f"Received: per_task_gradients={per_task_gradients!r}")
        weighting = None if weighting is None else weightings.get(weighting)
        aggregator = None if aggregator is None else aggregation.get(aggregator)
        if weighting is not None or aggregator is not None:
            self.check_objective(weighting, aggregator, aggregate_on, kwargs)
        with self.distribute_strategy.scope():
            for part in (weighting, aggregator):
                if part is not None and not part.built:
                    part.build(self.num_tasks)
            trackers = [] if weighting is None else [
                keras.metrics.Mean(name=f"{name}_weight") for name in self.task_names]
        # The model is built; its state grows by the objective's, which it
        # then saves and checkpoints with its own.
        with unlocked_tracking(self):
            self.weighting, self.aggregator, self._weight_trackers = (
                weighting, aggregator, trackers)
        self.aggregate_on, self.per_task_gradients = aggregate_on, per_task_gradients
        super().compile(*args, **kwargs)
        if getattr(weighting, "fits_on_heldout_data", False) and isinstance(
                self.optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                f"{type(weighting).__name__} does not scale its held-out loss: train it "
                "in float32 or mixed_bfloat16, not under float16 loss scaling.")

    def check_objective(self, weighting, aggregator, aggregate_on, compile_kwargs):
        """Raises a ValueError when this model cannot combine its tasks'
        losses and gradients so (called by `compile` with a weighting or an
        aggregator)."""
        if aggregate_on == "representation":
            raise ValueError(
                f"A {type(self).__name__} does not say where its tasks' paths split: "
                "aggregate on the parameters (aggregate_on='parameters'), or build a "
                "tf_mtl.MultiTaskModel.")
        losses = compile_kwargs.get("loss")
        for loss in keras.tree.flatten(losses) if losses is not None else ():
            reduction = getattr(loss, "reduction", "sum_over_batch_size")
            if reduction not in _LINEAR_REDUCTIONS:
                raise ValueError(
                    f"A weighting or aggregator splits the compiled loss by its outputs' "
                    f"sample weights, which needs a loss linear in them: reduction in "
                    f"{_LINEAR_REDUCTIONS}. Received: {loss!r} with reduction={reduction!r}")

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:
            serialize = keras.saving.serialize_keras_object
            config.update(weighting=serialize(self.weighting),
                          aggregator=serialize(self.aggregator),
                          aggregate_on=self.aggregate_on,
                          per_task_gradients=self.per_task_gradients)
        return config

    # -- the training step ---------------------------------------------------

    def train_step(self, data):
        if self.takes_heldout_data():
            data, heldout = data
            self.fit_heldout(data, heldout)
        weighting = self.weighting
        with tf.GradientTape() as weighting_tape:
            weights = None if weighting is None else weighting.task_weights()
        step = self.step_gradients(
            data, None if weights is None else tf.stop_gradient(weights),
            task_gradients.needs_task_gradients(weighting, self.aggregator))
        gradients, gramian, loss = step.gradients, None, step.objective
        if step.jacobian is not None:
            update, gramian = task_gradients.aggregate(
                self.aggregator, step.jacobian, self.aggregate_on)
            gradients = task_gradients.accumulate(gradients, step.apply(update))
        if weighting is not None:
            gradients, extra = self._weighting_gradients(
                weighting_tape, weights, step.losses, gramian, gradients)
            loss += extra
        self.track_objective(loss, step)
        self.check_finite(loss)
        self.apply_conditioned_gradients(gradients, self.step_variables())
        return worker_logs(self.get_metrics_result())

    def step_variables(self):
        """The variables a training step differentiates and updates (a
        bi-level part's own leave it to `fit_heldout`)."""
        return self.trainable_variables

    def step_gradients(self, data, weights, per_task):
        """One pass of the compiled loss: `StepGradients` of
        `sum_t weights[t] L_t + rest` (`weights` None: the compiled loss);
        with `per_task`, the Jacobian of `weights[t] L_t` on the shared
        parameters."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        rows = tf.shape(tf.nest.flatten(x)[0])[0]
        variables = self.step_variables()
        split = self.weighting is not None or self.aggregator is not None
        if split and weights is None:
            weights = tf.ones([self.num_tasks])
        with tf.GradientTape(persistent=per_task) as tape:
            with objective_scope() as scope:
                y_pred = self(x, training=True)
            objective, task_losses, rest = self._compiled_objective(
                scope, x, y, y_pred, sample_weight, rows, weights, split)
            scale = self.optimizer.scale_loss
            scaled, scaled_rest = scale(objective), scale(rest)
            scaled_tasks = scale(weights * task_losses) if split else None
            scaled_tasks = (scaled_tasks, tf.unstack(scaled_tasks) if per_task else None)
        self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        step = functools.partial(StepGradients, objective, task_losses, rows=rows)
        if not per_task:
            return step(tape.gradient(scaled, variables))
        # Which variables each task's loss reaches: only whether a gradient
        # is None is read, so `tf.function` prunes these backward passes.
        reached = [sum(g is not None for g in grads) for grads in zip(
            *[tape.gradient(task, variables) for task in scaled_tasks[1]])]
        owners = self.variable_optimizers()
        shared = [i for i, v in enumerate(variables)
                  if reached[i] > 1 and owners[id(v)] is self.optimizer]
        return step(*task_gradients.parameter_gradients(
            tape, variables, shared, scaled, scaled_rest, scaled_tasks,
            self.per_task_gradients))

    def _compiled_objective(self, scope, x, y, y_pred, sample_weight, rows, weights, split):
        """`(objective, task losses, rest)` of the compiled loss; task losses
        (and `rest`, everything but them) only when `split` by output, then
        weighted by `weights`."""
        outputs = keras.tree.flatten(y_pred)
        scale = tf.ones([len(outputs) if split else 1, rows])
        with tf.GradientTape() as rows_tape:
            rows_tape.watch(scale)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=True,
                                     sample_weight=_scaled(y_pred, sample_weight, scale, split))
        contributions = rows_tape.gradient(loss, scale)
        if contributions is None:
            contributions = tf.zeros_like(scale)
        if split:
            task_losses = tf.reduce_sum(contributions, 1)
            rest = loss - tf.reduce_sum(task_losses)
            row_contributions = tf.reduce_sum(weights[:, None] * contributions, 0)
            objective = tf.reduce_sum(weights * task_losses) + rest
        else:
            task_losses, rest, row_contributions, objective = loss[None], 0.0, contributions[0], loss
        if scope.records:
            terms = self._conditioned_terms(scope, row_contributions, sample_weight, rows)
            objective, rest = objective + terms, rest + terms
        return objective, task_losses, rest

    def batch_objective(self, data, training, weights=None):
        """The objective of one batch in one pass, tasks weighted by
        `weights` (None: equally); this replica's share (`tf_mtl.bilevel`)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with objective_scope() as scope:
            y_pred = self(x, training=training)
        rows = tf.shape(tf.nest.flatten(x)[0])[0]
        return self._compiled_objective(scope, x, y, y_pred, sample_weight, rows, weights,
                                        weights is not None)[0]

    def _weighting_gradients(self, tape, weights, task_losses, gramian, gradients):
        """Updates the weighting with the step's global losses, adds the
        gradients of its own variables; returns them and its extra term
        (this replica's share)."""
        losses = tf.stop_gradient(all_replicas_sum(task_losses))
        scale = self.optimizer.scale_loss(tf.constant(1.0))
        if gramian is not None:  # of the scaled losses' gradients
            gramian = gramian / scale ** 2
        replicas = num_replicas()
        with tape:
            extra = self.weighting.update(losses, weights, gramian) / replicas
            own = (tf.reduce_sum(weights * losses) / replicas + extra) * scale
        for tracker, weight in zip(self._weight_trackers, tf.unstack(weights)):
            tracker.update_state(weight)
        own_variables = self.weighting.trainable_variables
        if own_variables:
            found = dict(zip(map(id, own_variables), tape.gradient(own, own_variables)))
            gradients = [found.get(id(v), g) for v, g in zip(self.step_variables(), gradients)]
        return gradients, extra

    def track_objective(self, loss, step):
        """Logs this replica's share of the step's objective (`loss`)."""
        self._loss_tracker.update_state(loss * num_replicas(), sample_weight=step.rows)

    def check_finite(self, loss):
        """Called with the objective before the update; Keras' `fit` leaves
        a non-finite loss to `keras.callbacks.TerminateOnNaN`."""

    def test_step(self, data):
        return worker_logs(super().test_step(data))

    def _conditioned_terms(self, scope, contributions, sample_weight, rows):
        """The layers' terms, from each row's share `w_i * loss_i` of the loss."""
        row_weights = tf.ones([rows])
        if sample_weight is not None:
            flat = tf.nest.flatten(sample_weight)
            row_weights = tf.reshape(tf.cast(flat[0], tf.float32), [rows])
        # Keras' loss is this replica's batch mean over the replicas' count.
        row_weights /= tf.cast(rows, tf.float32) * num_replicas()
        row_losses = tf.math.divide_no_nan(tf.stop_gradient(contributions), row_weights)
        return scope.terms(row_losses, row_weights)

    # -- held-out data -------------------------------------------------------

    def takes_heldout_data(self):
        """Whether part of the model is fitted on `fit`'s `heldout_data`
        (`tf_mtl.bilevel`): here, an Auto-Lambda weighting."""
        return bool(getattr(self.weighting, "fits_on_heldout_data", False))

    def fit_heldout(self, train, heldout):
        """The step of the part fitted on held-out data, before the model's
        step on the `train` batch."""
        self.weighting.fit_heldout(self, train, heldout)

    # -- optimizers ---------------------------------------------------------

    def variable_optimizers(self):
        """`{id(variable): optimizer}` for every trainable variable: the
        model's optimizer, except where a conditioned layer trains some with
        its own (`TaskConditioned.dedicated_optimizer`)."""
        owners = {id(v): self.optimizer for v in self.trainable_variables}
        for layer in self.conditioned_layers:
            dedicated = layer.dedicated_optimizer()
            if dedicated is not None:
                optimizer, variables = dedicated
                owners.update({id(v): optimizer for v in variables})
        return owners

    def apply_conditioned_gradients(self, gradients, variables=None):
        """Applies `gradients` (of `variables`, default `trainable_variables`,
        from a loss scaled by the model's optimizer) with the optimizer
        owning each variable."""
        variables = self.trainable_variables if variables is None else variables
        owners = self.variable_optimizers()
        # The model's optimizer unscales its own gradients (`scale_loss`); a
        # dedicated optimizer gets them unscaled, and under dynamic loss
        # scaling (mixed float16) none where the scaled ones overflowed: the
        # step the loss-scale optimizer skips, it skips too.
        unscale = 1.0 / self.optimizer.scale_loss(tf.constant(1.0))
        present = [g for g in gradients if g is not None]
        finite = tf.constant(True)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer) and present:
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in present])
        groups = {}
        for gradient, variable in zip(gradients, variables, strict=True):
            optimizer = owners[id(variable)]
            if optimizer is not self.optimizer and gradient is not None:
                gradient = tf.convert_to_tensor(gradient) * unscale
                gradient = tf.where(finite, gradient, tf.zeros_like(gradient))
            groups.setdefault(id(optimizer), (optimizer, []))[1].append(
                (gradient, variable))
        for optimizer, pairs in groups.values():
            optimizer.apply_gradients(pairs)

    def build_optimizer(self):
        """Builds the model's optimizer on the variables it trains, before a
        checkpoint is restored into it (Keras would build it on all of them
        and then refuse a checkpoint that holds fewer slots)."""
        if self.optimizer is None or self.optimizer.built:
            return
        owners = self.variable_optimizers()
        with self.distribute_strategy.scope():
            self.optimizer.build([v for v in self.trainable_variables
                                  if owners[id(v)] is self.optimizer])

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.build_optimizer()

    def fit(self, x=None, *args, callbacks=None, heldout_data=None, **kwargs):
        """Keras' `fit`. Data in an order of its own epoch (`tf_mtl.data`)
        follows `fit`'s epoch, so a resumed run sees the same batches. A
        model with a part fitted on held-out data (`takes_heldout_data`)
        takes that data as `heldout_data`, a `tf.data.Dataset` cycled
        through alongside `x`."""
        from tf_mtl.data import order_callbacks

        if self.takes_heldout_data() != (heldout_data is not None):
            raise ValueError(
                "This model fits its bi-level part (a bi-level SafeSharing's gates, "
                "Auto-Lambda's weights) on `heldout_data`: pass fit(x, heldout_data=...)."
                if heldout_data is None else
                "`heldout_data` is for a model with a bi-level part (a bi-level "
                "SafeSharing, the AutoLambda weighting); this one has none.")
        if heldout_data is not None:
            if not isinstance(x, tf.data.Dataset) or not isinstance(heldout_data, tf.data.Dataset):
                raise ValueError("With `heldout_data`, `x` and `heldout_data` must be "
                                 f"tf.data.Datasets. Received: {type(x).__name__} and "
                                 f"{type(heldout_data).__name__}")
            x = tf.data.Dataset.zip((x, heldout_data.repeat()))
        self.build_optimizer()
        if self.weighting is not None:  # first: a checkpoint at an epoch's end sees it
            callbacks = [weightings.EpochCallback(self.weighting)] + list(callbacks or [])
        callbacks = list(callbacks or []) + order_callbacks(x)
        return super().fit(x, *args, callbacks=callbacks, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3 (3.15; keras-team/keras#19246) learns the data's shapes by
        # averaging the first distributed batch over the replicas, which
        # fails when they hold different numbers of rows (a global batch not
        # divisible by the replicas, or a short last batch). One replica's
        # rows have the shapes it needs.
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v,
                    next(batches))
                break
            iterator = None
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


def _scaled(y_pred, sample_weight, scale, split):
    """The sample weights of each output times a row of `scale`: row t for
    output t (`split`), else row 0 for all."""
    outputs = keras.tree.flatten(y_pred)
    if sample_weight is None:
        weights = [None] * len(outputs)
    elif keras.tree.is_nested(sample_weight):
        weights = keras.tree.flatten(sample_weight)
    else:
        weights = [sample_weight] * len(outputs)
    scaled = []
    for t, weight in enumerate(weights):
        row = scale[t if split else 0]
        if weight is not None:
            weight = tf.cast(weight, row.dtype)
            row = weight * tf.reshape(row, tf.concat([tf.shape(row), tf.ones(
                [tf.rank(weight) - 1], tf.int32)], 0))
        scaled.append(row)
    return keras.tree.pack_sequence_as(y_pred, scaled)


def worker_logs(logs):
    """A step's logs as `fit` can reduce them on every strategy.

    Keras 3 (3.15) reduces the logs of a multi-worker step with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on the scalars
    every step returns (tensorflow/tensorflow#72388): there they get an axis
    of one element per replica, over which the reduction means as it does
    elsewhere.
    """
    strategy = tf.distribute.get_strategy()
    if not (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and _workers(strategy) > 1):
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}


def _workers(strategy):
    """The processes of a multi-worker cluster (its chief and workers)."""
    jobs = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, ())) for job in ("chief", "worker"))


@keras.saving.register_keras_serializable(package="tf_mtl")
class Model(ConditionedTraining, keras.Model):
    """A `keras.Model` whose task-conditioned layers train in full.

    Use it as `keras.Model`: functional, `tf_mtl.Model(inputs, outputs)`, or
    subclassed, `class MyModel(tf_mtl.Model)`; `compile` and `fit` as usual.
    See `ConditionedTraining` for what its training step adds.

    Example:

    >>> x = keras.Input((8,))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> h = tf_mtl.layers.ProgressiveMask(num_tasks=2)(keras.layers.Dense(4)(x), task_ids)
    >>> model = tf_mtl.Model([x, task_ids], keras.layers.Dense(3)(h))
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    """

    @property
    def task_names(self):
        """The tasks a weighting or an aggregator balances: the model's
        outputs, by name (a dict output's keys)."""
        if not isinstance(self, Functional):
            raise ValueError(
                "A weighting or an aggregator balances the outputs of a functional "
                "tf_mtl.Model(inputs, outputs), one task each; a subclassed model does "
                "not declare its outputs. Build it functionally, or as a "
                "tf_mtl.MultiTaskModel.")
        if isinstance(self.output, dict):
            return tuple("/".join(map(str, path))
                         for path, _ in keras.tree.flatten_with_path(self.output))
        return tuple(self.output_names)

    @property
    def num_tasks(self):
        return len(self.task_names)

    def __new__(cls, *args, **kwargs):
        functional = len(args) == 2 or "outputs" in kwargs
        if cls is Model and functional:
            return super().__new__(ConditionedFunctional)
        return super().__new__(cls, *args, **kwargs)


@keras.saving.register_keras_serializable(package="tf_mtl")
class ConditionedFunctional(Model, Functional):
    """What `tf_mtl.Model(inputs, outputs)` makes: a Keras functional model
    with the training step of `ConditionedTraining`."""
