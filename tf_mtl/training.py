"""Training task-conditioned layers in any Keras model.

A conditioned layer may add terms of its own to the objective (an MPPS mask:
eq. 3's KL and the score-function surrogate) and train some variables with an
optimizer of its own (Phi by plain SGD). `ConditionedTraining` is the one
mechanism that honours both, for `MultiTaskModel` and for a user's model:

    model = tf_mtl.Model(inputs, outputs)          # functional
    class MyModel(tf_mtl.Model): ...               # subclassed

then the usual `compile(optimizer, loss)` and `fit`.
"""

import keras
import tensorflow as tf

from tf_mtl._keras import Functional, flatten_layers
from tf_mtl.layers.base import TaskConditioned, objective_scope


def conditioned_layers(model):
    """The task-conditioned layers of any Keras model or layer, in the order
    they were added."""
    found = []
    for layer in flatten_layers(model, include_self=False):
        if isinstance(layer, TaskConditioned) and all(layer is not f for f in found):
            found.append(layer)
    return found


class ConditionedTraining:
    """Mixin of `keras.Model` that trains task-conditioned layers in full.

    Its `train_step` is Keras' with two additions:

    - the conditioned layers' own objective terms (`TaskConditioned.
      objective_terms`) join the compiled loss. They need each row's loss:
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
    optimizer's state (`compile_from_config` builds the model's optimizer on
    the variables it owns).
    """

    @property
    def conditioned_layers(self):
        """The task-conditioned layers of this model."""
        return conditioned_layers(self)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        rows = tf.shape(tf.nest.flatten(x)[0])[0]
        scale = tf.ones([rows])
        with tf.GradientTape() as tape:
            with objective_scope() as scope:
                y_pred = self(x, training=True)
            with tf.GradientTape() as rows_tape:
                rows_tape.watch(scale)
                weights = scale if sample_weight is None else tf.nest.map_structure(
                    lambda w: tf.cast(w, scale.dtype) * scale, sample_weight)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=weights,
                                         training=True)
            if scope.records:
                loss += self._conditioned_terms(
                    scope, rows_tape.gradient(loss, scale), sample_weight, rows)
            self._loss_tracker.update_state(loss * _replicas(), sample_weight=rows)
            scaled = self.optimizer.scale_loss(loss)
        self.apply_conditioned_gradients(tape.gradient(scaled, self.trainable_variables))
        return worker_logs(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    def test_step(self, data):
        return worker_logs(super().test_step(data))

    def _conditioned_terms(self, scope, contributions, sample_weight, rows):
        """The layers' terms, from each row's share `w_i * loss_i` of the loss."""
        if contributions is None:
            contributions = tf.zeros([rows])
        row_weights = tf.ones([rows])
        if sample_weight is not None:
            flat = tf.nest.flatten(sample_weight)
            row_weights = tf.reshape(tf.cast(flat[0], tf.float32), [rows])
        # Keras' loss is this replica's batch mean over the replicas' count.
        row_weights /= tf.cast(rows, tf.float32) * _replicas()
        row_losses = tf.math.divide_no_nan(tf.stop_gradient(contributions), row_weights)
        return scope.terms(row_losses, row_weights)

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

    def fit(self, x=None, *args, callbacks=None, **kwargs):
        """Keras' `fit`; data in an order of its own epoch (`tf_mtl.data`)
        follows `fit`'s epoch, so a resumed run sees the same batches."""
        from tf_mtl.data import order_callbacks

        self.build_optimizer()
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


def _replicas():
    return float(tf.distribute.get_strategy().num_replicas_in_sync)


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

    def __new__(cls, *args, **kwargs):
        functional = len(args) == 2 or "outputs" in kwargs
        if cls is Model and functional:
            return super().__new__(ConditionedFunctional)
        return super().__new__(cls, *args, **kwargs)


@keras.saving.register_keras_serializable(package="tf_mtl")
class ConditionedFunctional(Model, Functional):
    """What `tf_mtl.Model(inputs, outputs)` makes: a Keras functional model
    with the training step of `ConditionedTraining`."""
