"""How a training step's batch crosses the task-routed part (DESIGN.md,
task-routed batches; the routes are `tf_mtl.layers.routes`), and the
gradients each way yields (`tf_mtl.task_gradients`).

- `"tiled"`: one pass over the T x B tiled rows, `Tiled(T)`, or over the
  rows as the data routes them, `DataRouted` (`one_pass_gradients`).
- `"sequential"`: the stem once, then one forward-backward pass of the
  routed part and head per task, `Tiled([t])`, gradients accumulated
  (`sequential_gradients`): the same FLOPs, activation memory close to hard
  sharing.
"""

import functools

import keras
import tensorflow as tf

from tf_mtl.backbones import Block, run_layers
from tf_mtl.layers.base import TaskAware, TaskConditioned, objective_scope
from tf_mtl.layers.routes import Tiled
from tf_mtl.layers.task_batch_norm import TaskBatchNormalization
from tf_mtl.task_gradients import (
    RepresentationTap, StepGradients, accumulate, flatten, parameter_gradients, scatter,
    unflatten)

ROUTINGS = ("tiled", "sequential")


def routing_option(routing):
    """`{"routing": routing}` for a builder, or `{}` (None: the builder's
    own default)."""
    return {} if routing is None else {"routing": routing}


def first_routed_layer(backbone, training):
    """The index of the first backbone layer that routes tasks, or None."""
    return next((i for i, layer in enumerate(backbone) if routes_tasks(layer, training)), None)


def routes_tasks(layer, training):
    return isinstance(layer, (Block, TaskAware)) and layer.routes_tasks(training)


def check_routed_part(backbone):
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


def one_pass_gradients(model, x, task_ids, labels, weights, per_task):
    """The step's gradients from one pass over every task's rows.

    With `per_task`, the Jacobian of the weighted task losses on the part
    `model.aggregate_on` names: on the representation from the same
    backward pass, on the parameters by `model.per_task_gradients`.
    """
    variables = model.step_variables()
    scale = model.optimizer.scale_loss
    with tf.GradientTape(persistent=per_task) as tape:
        tap = RepresentationTap(model.num_tasks, tape) \
            if per_task and model.aggregate_on == "representation" else None
        task_losses, rest, named = model.forward_objective(x, task_ids, labels, weights, tap)
        weighted = weights * task_losses
        objective = tf.reduce_sum(weighted) + rest
        # Scaled on the tape (mixed precision): `tape.gradient` differentiates
        # only what it recorded.
        scaled, scaled_tasks, scaled_rest = scale(objective), scale(weighted), scale(rest)
        scaled_tasks = (scaled_tasks, tf.unstack(scaled_tasks) if per_task else None)
    step = functools.partial(StepGradients, objective, task_losses, named=named,
                             rows=tf.shape(x)[0])
    if not per_task:
        return step(tape.gradient(scaled, variables))
    if tap is not None:
        gradients = tape.gradient(scaled, tap.routed + variables)
        entered = len(tap.routed)

        def backward(update):
            if not tap.sources:  # nothing shared (a per-task twin)
                return [None] * len(variables)
            return tape.gradient(tap.sources, variables,
                                 output_gradients=unflatten(update, tap.sources))

        return step(gradients[entered:], tap.jacobian(gradients[:entered]), backward)
    return step(*parameter_gradients(tape, variables, model.shared_variable_indices(), scaled,
                                     scaled_rest, scaled_tasks, model.per_task_gradients))


def sequential_gradients(model, x, labels, first, weights, per_task):
    """The step's gradients with one forward-backward pass of the routed
    part per task (`routing="sequential"`).

    The stem, everything before the point where rows enter the routed part
    (inside backbone layer `first` when that is a block entered at a site,
    `Block.shared_stages`), runs once; its gradients come from the tasks'
    summed gradients of its
    output, or, with `per_task`, from their aggregate (on the
    representation: the stem's output; on the parameters: one backward pass
    of the stem per task).
    """
    backbone, variables = model.backbone, model.step_variables()
    block = backbone[first]
    shared_stages = block.shared_stages(True) if isinstance(block, Block) else 0
    on_parameters = per_task and model.aggregate_on == "parameters"
    scale = model.optimizer.scale_loss
    with tf.GradientTape(persistent=on_parameters) as stem_tape:
        stem, _ = run_layers(backbone[:first], x, None, True)  # nothing routes
        stem = block.run_until(shared_stages, stem, True) if shared_stages else (stem,)
    shared = model.shared_variable_indices() if on_parameters else []
    stem_grads = [tf.zeros_like(s) for s in stem]
    accumulated = [tf.zeros_like(v) for v in variables]
    rows_of_tasks = []  # per task: its gradient of the aggregated part
    batch = tf.shape(x)[0]
    no_rows = tf.zeros([0], tf.int32)
    objective, task_losses, named = 0.0, 0.0, {}
    for t, task in enumerate(model.tasks):
        # Task t starts once task t - 1 is done: its activations can go.
        with tf.control_dependencies(stem_grads + accumulated + rows_of_tasks):
            inputs = [tf.identity(s) for s in stem]
        route = Tiled([t])
        with tf.GradientTape(persistent=per_task) as tape:
            tape.watch(inputs)
            with objective_scope() as scope, route.scope():
                if shared_stages:
                    features, task_ids = block.run_from(shared_stages, inputs, None, True,
                                                        route)
                    suffix = backbone[first + 1:]
                else:
                    (features,), task_ids, suffix = inputs, None, backbone[first:]
                features, task_ids = run_layers(suffix, features, route, True, task_ids)
            pred = model.heads[task.name](features, training=True)
            losses = [tf.zeros([0])] * model.num_tasks
            losses[t] = model.task_loss(task, labels[task.name], pred)
            rows = [no_rows] * model.num_tasks
            rows[t] = tf.range(batch)
            pass_losses, rest = model.split_objective(
                losses, rows, task_ids, scope, weights, regularized=t == 0)
            weighted = weights[t] * pass_losses[t]
            scaled_task, scaled_rest = scale(weighted), scale(rest)
            scaled = scaled_task + scaled_rest
        if per_task:
            grads = tape.gradient(scaled_task, inputs + variables)
            accumulated = accumulate(accumulated, tape.gradient(scaled_rest, variables))
            task_grads, grads = grads[:len(inputs)], grads[len(inputs):]
            if on_parameters:
                grads = accumulate(grads, stem_tape.gradient(
                    list(stem), variables, output_gradients=task_grads))
                rows_of_tasks.append(flatten([grads[i] for i in shared],
                                             [variables[i] for i in shared]))
                grads = [None if i in shared else g for i, g in enumerate(grads)]
            else:
                rows_of_tasks.append(flatten(task_grads, inputs))
        else:
            grads = tape.gradient(scaled, inputs + variables)
            stem_grads = accumulate(stem_grads, grads[:len(inputs)])
            grads = grads[len(inputs):]
        accumulated = accumulate(accumulated, grads)
        objective += weighted + rest
        task_losses += pass_losses
        for name, value in scope.named.items():
            named[name] = named.get(name, 0.0) + value
    step = functools.partial(StepGradients, objective, task_losses, named=named, rows=batch)
    if not per_task:
        return step(accumulate(accumulated, stem_tape.gradient(
            list(stem), variables, output_gradients=stem_grads)))
    if on_parameters:
        return step(accumulated, tf.stack(rows_of_tasks),
                    lambda update: scatter(update, variables, shared))
    return step(accumulated, tf.stack(rows_of_tasks), lambda update: stem_tape.gradient(
        list(stem), variables, output_gradients=unflatten(update, stem)))
