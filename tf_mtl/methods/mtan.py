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
batch normalisation and ReLU, pooled to p^(j)'s resolution. The paper attends
convolution blocks: layers after the last attended block (pooling,
flattening, a LeNet's dense block) run, shared, on each task's attended
features a^_t, which the task's head then reads; weightless layers between
attended blocks act on the attended features as on the shared ones. With
`attend_dense`, dense blocks are attended too, with dense layers for the
convolutions (for a network of dense blocks only).
"""

import keras

from tf_mtl.backbones import NORM_MOMENTUM, WEIGHTLESS, Block, DenseUnit, run_layers
from tf_mtl.layers.per_task import PerTaskBatchNormalization, PerTaskConv2D, PerTaskDense
from tf_mtl.layers.routes import DataRouted
from tf_mtl.layers.task_batch_norm import TaskBatchNormalization
from tf_mtl.methods.method import Method
from tf_mtl.model import MultiTaskModel
from tf_mtl.routing import routing_option


@keras.saving.register_keras_serializable(package="tf_mtl")
class AttentionNetwork(Block):
    """MTAN's shared network and its task attention modules (module
    docstring). The shared network runs once on the batch's rows; the
    attention modules on the routed rows, each task's through its own g and
    h (`tf_mtl.layers.PerTask*`), and f with each task's own batch and
    moving statistics (`TaskBatchNormalization(num_tasks=T)`).

    Args:
        shared: the shared network, a list of layers (`Block`s and weightless
            layers, e.g. `tf_mtl.backbones.lenet()`); every convolution block
            carries an attention module.
        num_tasks: T.
        attend_dense: dense blocks (`DenseUnit`) carry one too.
    """

    def __init__(self, shared, num_tasks, attend_dense=False, **kwargs):
        super().__init__(**kwargs)
        self.shared = list(shared)
        self.attended_tasks = int(num_tasks)
        self.attend_dense = bool(attend_dense)
        for layer in self.shared:
            if not isinstance(layer, (Block, *WEIGHTLESS)) or isinstance(layer, Block) and (
                    layer.num_tasks or layer.conditioned):
                raise ValueError(
                    "MTAN's shared network is made of shared blocks without "
                    f"conditioned sites and weightless layers. Received: {layer!r}")
        blocks = [l for l in self.shared if self._attends(l)]
        if not blocks:
            raise ValueError("MTAN's shared network needs a convolution block to attend "
                             "(or attend_dense=True for dense blocks).")
        self.modules = [self._module(block, j) for j, block in enumerate(blocks)]
        self._last_attended = max(i for i, l in enumerate(self.shared) if self._attends(l))

    def _attends(self, layer):
        return isinstance(layer, Block) and (self.attend_dense
                                             or not isinstance(layer, DenseUnit))

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
                 TaskBatchNormalization(t, momentum=NORM_MOMENTUM),
                 keras.layers.Activation("relu")]
        return f, g, h

    def routes_tasks(self, training):
        return True

    def conditioned_layers(self):
        return []

    def keep_task_statistics(self, num_tasks):
        # The shared network's rows have no task (their statistics serve
        # every task alike); f's are routed, and its own from construction.
        pass

    def call(self, x, task_ids=None, training=None, route=None):
        if task_ids is None and route is None:
            return super().call(x, training=training)  # refused: it routes
        enter = route if task_ids is None else DataRouted(task_ids)
        modules = iter(self.modules)
        attended = None  # a^_t of the last block, on the routed rows
        for i, layer in enumerate(self.shared):
            if not self._attends(layer):
                if i < self._last_attended:  # the shared features an attended block reads
                    x = _run([layer], x, None, training)
                if attended is not None:
                    attended = _run([layer], attended, task_ids, training)
                continue
            if not layer.built:  # run by stages, not called: build it as a call would
                layer.build(x.shape)
            state = layer.run_until(1, x, training)  # what its first site sees
            x, _ = layer.run_from(1, state, None, training, route)
            (u, task_ids), (p, _) = enter(_pooled(state[0], x, layer)), enter(x)
            f, g, h = next(modules)
            if f is not None:
                pooled = _pooled(_run(f, attended, task_ids, training), p, layer)
                u = keras.ops.concatenate([u, pooled], axis=-1)
            attended = _run(h, _run(g, u, task_ids, training), task_ids, training) * p
        return attended, task_ids

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.attended_tasks,
                "attend_dense": self.attend_dense,
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


def attention_network(backbone, tasks, input_shape, jointly_labelled=True,
                      attend_dense=False, **kwargs):
    """An MTAN model: `backbone` (a list of layers) as the shared network,
    an attention module per task on each of its convolution blocks (and
    dense ones with `attend_dense`, see `AttentionNetwork`).

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
    return MultiTaskModel([AttentionNetwork(backbone, len(tasks), attend_dense, name="mtan")],
                          tasks, input_shape, jointly_labelled, **kwargs)


def from_flags(flag_values, backbone, tasks, input_shape, jointly_labelled, epochs):
    """The model and callbacks of `train.py --method=mtan`."""
    return attention_network(backbone(), tasks, input_shape, jointly_labelled,
                             **routing_option(flag_values.routing)), []


METHODS = (Method("mtan", "Multi-Task Attention Network", from_flags),)
