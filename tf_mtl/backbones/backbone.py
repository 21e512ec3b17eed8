"""A backbone: a list of layers, how it runs on rows with and without tasks
(`tf_mtl.layers.routes`), and what it holds."""

import contextlib

import keras
import tensorflow as tf

from tf_mtl.backbones.blocks import Block
from tf_mtl.layers.base import TaskAware, apply_task_aware
from tf_mtl.layers.per_task import PerTaskLayer
from tf_mtl.layers.routes import Tiled


def run_layers(layers, x, route, training, task_ids=None):
    """Runs a backbone (a list of layers) on `x`; rows without a task yet
    (`task_ids` None) enter the routed part through `route`
    (`tf_mtl.layers.routes`) at the first layer that routes in this mode,
    the layers after traced in `route.scope()`. Returns the output and the
    task of each row once routed (None before)."""
    with route.scope() if route is not None else contextlib.nullcontext():
        for layer in layers:
            # A block given neither a route nor tasks is a plain layer.
            if isinstance(layer, Block) and (route is not None or task_ids is not None):
                x, task_ids = layer(x, task_ids, training=training, route=route)
            elif isinstance(layer, TaskAware):
                x, task_ids = apply_task_aware(layer, x, task_ids, training, route)
            else:
                x = layer(x, training=training)
    return x, task_ids


def run_routed(layers, x, route, training):
    """`run_layers` on rows without a task yet.

    A per-task twin (`is_per_task(layers)`) on tiled rows shares nothing
    between tasks, so it runs instead as one pass of B rows per task, each
    on `x` itself: the same values, without the split and concatenation of
    the T x B rows around every layer (what T separate models cost).
    """
    if route.tasks is None or not is_per_task(layers):
        return run_layers(layers, x, route, training)
    outputs = [run_layers(layers, x, Tiled([task]), training)[0] for task in route.tasks]
    task_ids = tf.constant(route.tasks, tf.int32)
    return tf.concat(outputs, axis=0), tf.repeat(task_ids, tf.shape(x)[0])


# Layers that hold no weight: a per-task twin may have them.
WEIGHTLESS = (keras.layers.Flatten, keras.layers.Activation, keras.layers.Dropout,
              keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
              keras.layers.GlobalAveragePooling2D, keras.layers.Reshape)


def is_per_task(layers):
    """Whether no weight of `layers` serves more than one task: per-task
    blocks without sites, per-task layers and weightless layers only."""
    def per_task(layer):
        if isinstance(layer, Block):
            return bool(layer.num_tasks) and not layer.conditioned
        return isinstance(layer, (PerTaskLayer, *WEIGHTLESS))

    layers = list(layers)
    return any(not isinstance(l, WEIGHTLESS) for l in layers) and all(map(per_task, layers))


def sites(backbone):
    """Every `(block, site, channels)` of a backbone, in forward order."""
    return [
        (block, site, channels)
        for block in backbone if isinstance(block, Block)
        for site, channels in enumerate(block.site_channels)
    ]
