"""Multi-Task Attention Network: Liu, Johns and Davison, "End-to-End
Multi-Task Learning with Attention" (CVPR 2019), section 3.

A shared network (the *global feature pool*: any backbone definition) runs
once on the batch; each task reads it through soft attention masks, one per
block j of the shared network (eq. 1):

    a_t^(1) = h_t^(1)(g_t^(1)(u^(1))),
    a_t^(j) = h_t^(j)(g_t^(j)([u^(j); f^(j)(a^_t^(j-1))])),   j >= 2,
    a^_t^(j) = a_t^(j) * p^(j),

where u^(j) is the output of the block's first layer (after its
normalisation if it has one, before the activation: the block's first site; max-pooled to
p^(j)'s resolution in a block that pools after it), p^(j) the block's
output, g and h task-specific 1x1 convolutions with batch
normalisation (ReLU, then sigmoid), and f^(j) a shared 3x3 convolution with
batch normalisation and ReLU, pooled to p^(j)'s resolution. Dense blocks
take dense layers for the convolutions. The task's head reads a^_t of the
last block. Weightless layers between blocks (pooling, flattening) act on
the attended features as on the shared ones.
"""

import keras

from tf_mtl.backbones import NORM_MOMENTUM, WEIGHTLESS, Block, DenseUnit, run_layers
from tf_mtl.layers.per_task import PerTaskBatchNormalization, PerTaskConv2D, PerTaskDense
from tf_mtl.layers.task_batch_norm import TaskBatchNormalization
from tf_mtl.model import MultiTaskModel
from tf_mtl.routing import routing_option


@keras.saving.register_keras_serializable(package="tf_mtl")
class AttentionNetwork(Block):
    """MTAN's shared network and its task attention modules (module
    docstring). The shared network runs once on the batch's rows; the
    attention modules on the routed rows, each task's through its own g and
    h (`tf_mtl.layers.PerTask*`), and f with each task's own batch
    statistics (`TaskBatchNormalization`).

    Args:
        shared: the shared network, a list of layers (`Block`s and weightless
            layers, e.g. `tf_mtl.backbones.lenet()`); every block carries
            an attention module.
        num_tasks: T.
    """

    def __init__(self, shared, num_tasks, **kwargs):
        super().__init__(**kwargs)
        self.shared = list(shared)
        self.attended_tasks = int(num_tasks)
        for layer in self.shared:
            if not isinstance(layer, (Block, *WEIGHTLESS)) or isinstance(layer, Block) and (
                    layer.num_tasks or layer.conditioned):
                raise ValueError(
                    "MTAN's shared network is made of shared blocks without "
                    f"conditioned sites and weightless layers. Received: {layer!r}")
        blocks = [l for l in self.shared if isinstance(l, Block)]
        if not blocks:
            raise ValueError("MTAN's shared network needs at least one block to attend.")
        self.modules = [self._module(block, j) for j, block in enumerate(blocks)]

    def _module(self, block, j):
        """(f, g, h) of block j: f is None for the first block."""
        t, channels = self.attended_tasks, block.site_channels[-1]
        dense = isinstance(block, DenseUnit)
        per_task = (lambda: PerTaskDense(t, channels, use_bias=False)) if dense else (
            lambda: PerTaskConv2D(t, channels, 1, use_bias=False))
        norm = lambda: PerTaskBatchNormalization(t, momentum=NORM_MOMENTUM)
        g = [per_task(), norm(), keras.layers.Activation("relu")]
        h = [per_task(), norm(), keras.layers.Activation("sigmoid")]
        f = None
        if j > 0:
            f = [keras.layers.Dense(channels, use_bias=False) if dense else
                 keras.layers.Conv2D(channels, 3, padding="same", use_bias=False),
                 TaskBatchNormalization(momentum=NORM_MOMENTUM), keras.layers.Activation("relu")]
        return f, g, h

    def routes_tasks(self, training):
        return True

    def conditioned_layers(self):
        return []

    def call(self, x, task_ids=None, training=None, route=None):
        enter = route if task_ids is None else (lambda rows: (rows, task_ids))
        modules = iter(self.modules)
        attended = None  # a^_t of the last block, on the routed rows
        for layer in self.shared:
            if not isinstance(layer, Block):
                x = layer(x, training=training)
                attended = None if attended is None else layer(attended, training=training)
                continue
            if not layer.built:  # run by stages, not called: build it as a call would
                layer.build(x.shape)
            state = layer.run_until(0, x, training)
            x, _ = layer.run_from(0, state, None, training, route)
            (u, task_ids), (p, _) = enter(_pooled(state[0], x, layer)), enter(x)
            f, g, h = next(modules)
            if f is not None:
                pooled = _pooled(_run(f, attended, task_ids, training), p, layer)
                u = keras.ops.concatenate([u, pooled], axis=-1)
            attended = _run(h, _run(g, u, task_ids, training), task_ids, training) * p
        return attended, task_ids

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.attended_tasks,
                "shared": [keras.saving.serialize_keras_object(l) for l in self.shared]}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["shared"] = [keras.saving.deserialize_keras_object(l) for l in config["shared"]]
        for key in ("passing", "kernel_regularizer", "conditioned"):
            config.pop(key, None)
        return cls(**config)


def _run(layers, x, task_ids, training):
    return run_layers(layers, x, None, training, task_ids)[0]


def _pooled(features, like, block):
    """`features` max-pooled to the resolution of `like`."""
    if len(like.shape) == 2:
        return features
    size, target = tuple(features.shape[1:3]), tuple(like.shape[1:3])
    if None in size + target or any(s % t for s, t in zip(size, target)):
        raise ValueError(
            f"MTAN pools features of size {size} to the resolution {target} of "
            f"block {block.name!r}'s output: each must be known and divide it.")
    pool = tuple(s // t for s, t in zip(size, target))
    return keras.ops.max_pool(features, pool) if pool != (1, 1) else features


def attention_network(backbone, tasks, input_shape, jointly_labelled=True, **kwargs):
    """An MTAN model: `backbone` (a list of layers) as the shared network,
    an attention module per task on each of its blocks.

    Tiled routing only: the attention modules serve every task from one
    run of the shared network, which one pass per task would repeat.

    Args:
        backbone: the shared network, e.g. `tf_mtl.backbones.lenet()`.
        tasks, input_shape, jointly_labelled: see `MultiTaskModel`.
        **kwargs: of `MultiTaskModel` (`heads`).

    Example:

    >>> from tf_mtl import backbones, methods, tasks
    >>> heads = [tasks.classification("a", 10), tasks.classification("b", 10)]
    >>> model = methods.attention_network(backbones.lenet(0.5), heads, (28, 28, 1))
    """
    if kwargs.get("routing", "tiled") != "tiled":
        raise ValueError(
            "MTAN runs its shared network once for every task: routing must be "
            f"'tiled'. Received: routing={kwargs['routing']!r}")
    return MultiTaskModel([AttentionNetwork(backbone, len(tasks), name="mtan")], tasks,
                          input_shape, jointly_labelled, **kwargs)


def from_flags(flag_values, backbone, tasks, input_shape, jointly_labelled, epochs):
    """The model and callbacks of `train.py --method=mtan`."""
    return attention_network(backbone(), tasks, input_shape, jointly_labelled,
                             **routing_option(flag_values.routing)), []
