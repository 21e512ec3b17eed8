"""Backbones built from blocks with conditioning sites.

A *site* is the point of a block right after normalisation and before the
activation of one convolution or dense layer: the place where a method puts
its task-conditioned layer (an MPPS mask, a roaming partition). The Maximum
Roaming reference code masks there, and for a Bernoulli mask it is the same as
masking the neuron's output. A backbone is a list of layers; `sites(backbone)`
lists its sites in forward order and `Block.condition` fills one.

Blocks are called as `block(x, task_ids, training=..., route=route)` and
return `(x, task_ids)`. Rows without a task yet (`task_ids` None) enter the
routed part at the first site that needs task ids, through
`route(x) -> (x, task_ids)` (tiling a jointly labelled batch, or the data's
own task ids), so the convolution and normalisation before it run once for
all tasks. From there on, normalisation uses each task's own batch
statistics (`TaskBatchNormalization`): the routed rows of a task compute
what that task's own pass would.
"""

import keras

from tf_mtl.layers.base import apply_conditioned
from tf_mtl.layers.task_batch_norm import TaskBatchNormalization


def _norm():
    # Keras' default momentum 0.99 leaves a third of the initial statistics
    # after 100 steps: too slow for runs of a few hundred steps per epoch.
    return TaskBatchNormalization(momentum=0.9)


@keras.saving.register_keras_serializable(package="tf_mtl")
class Block(keras.layers.Layer):
    """A backbone layer holding conditioning sites.

    Subclasses create their sublayers in `__init__`, declare the channels of
    each site in `site_channels`, and route every site through `self._site`.
    """

    site_channels = ()

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conditioned = {}

    def condition(self, site, layer):
        """Puts the task-conditioned `layer` at site number `site`."""
        if not 0 <= site < len(self.site_channels):
            raise ValueError(
                f"Block {self.name!r} has {len(self.site_channels)} sites. "
                f"Received: site={site}"
            )
        if not layer.built:
            # Conditioned layers hold per-channel state: build it now, so the
            # optimizer sees it even though inference never calls the layer.
            layer.build((None, self.site_channels[site]))
        self.conditioned[str(site)] = layer

    def routes_tasks(self, training):
        return any(l.routes_tasks(training) for l in self.conditioned.values())

    def conditioned_layers(self):
        return list(self.conditioned.values())

    def _site(self, site, x, task_ids, training, route):
        layer = self.conditioned.get(str(site))
        if layer is None:
            return x, task_ids
        return apply_conditioned(layer, x, task_ids, training, route)

    def get_config(self):
        return {
            **super().get_config(),
            "conditioned": {site: keras.saving.serialize_keras_object(layer)
                            for site, layer in self.conditioned.items()},
        }

    def build_from_config(self, config):
        # Blocks build their sublayers at their first call (the model's
        # construction), not from a saved input shape.
        pass

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        conditioned = config.pop("conditioned", {})
        block = cls(**config)
        for site, layer in sorted(conditioned.items()):
            block.condition(int(site), keras.saving.deserialize_keras_object(layer))
        return block


@keras.saving.register_keras_serializable(package="tf_mtl")
class ConvUnit(Block):
    """Conv2D -> BatchNorm -> [site] -> activation -> optional max-pool."""

    def __init__(self, filters, kernel_size=3, strides=1, padding="same",
                 pool_size=None, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.pool_size = pool_size
        self.activation_name = activation
        self.conv = keras.layers.Conv2D(
            filters, kernel_size, strides=strides, padding=padding, use_bias=False
        )
        self.norm = _norm()
        self.activation = keras.layers.Activation(activation)
        self.pool = keras.layers.MaxPooling2D(pool_size) if pool_size else None

    @property
    def site_channels(self):
        return (self.filters,)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "strides": self.strides,
                "padding": self.padding, "pool_size": self.pool_size,
                "activation": self.activation_name}

    def call(self, x, task_ids=None, training=None, route=None):
        x = self.norm(self.conv(x), task_ids, training=training)
        x, task_ids = self._site(0, x, task_ids, training, route)
        x = self.activation(x)
        return (self.pool(x) if self.pool is not None else x), task_ids


@keras.saving.register_keras_serializable(package="tf_mtl")
class DenseUnit(Block):
    """Dense -> [site] -> activation."""

    def __init__(self, units, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.activation_name = activation
        self.dense = keras.layers.Dense(units)
        self.activation = keras.layers.Activation(activation)

    @property
    def site_channels(self):
        return (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "activation": self.activation_name}

    def call(self, x, task_ids=None, training=None, route=None):
        x, task_ids = self._site(0, self.dense(x), task_ids, training, route)
        return self.activation(x), task_ids


@keras.saving.register_keras_serializable(package="tf_mtl")
class ResidualUnit(Block):
    """A basic ResNet block (He et al. 2016) with a site after each of its
    two convolutions' normalisation; the projection shortcut has no site.
    """

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides
        conv = lambda s: keras.layers.Conv2D(
            filters, 3, strides=s, padding="same", use_bias=False
        )
        self.conv1, self.norm1 = conv(strides), _norm()
        self.conv2, self.norm2 = conv(1), _norm()
        self.shortcut = None

    @property
    def site_channels(self):
        return (self.filters, self.filters)

    def build(self, input_shape):
        if self.strides != 1 or input_shape[-1] != self.filters:
            self.shortcut = [
                keras.layers.Conv2D(self.filters, 1, strides=self.strides,
                                    use_bias=False),
                _norm(),
            ]

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "strides": self.strides}

    def call(self, x, task_ids=None, training=None, route=None):
        skip = x
        if self.shortcut is not None:
            skip = self.shortcut[1](self.shortcut[0](x), task_ids, training=training)
        h = self.norm1(self.conv1(x), task_ids, training=training)
        h, ids = self._site(0, h, task_ids, training, route)
        h = self.norm2(self.conv2(keras.ops.relu(h)), ids, training=training)
        h, ids = self._site(1, h, ids, training, route)
        if task_ids is None and ids is not None:  # routed inside this block
            skip, _ = route(skip)
        return keras.ops.relu(h + skip), ids


def sites(backbone):
    """Every `(block, site, channels)` of a backbone, in forward order."""
    return [
        (block, site, channels)
        for block in backbone if isinstance(block, Block)
        for site, channels in enumerate(block.site_channels)
    ]


def _scaled(channels, width):
    if not width > 0:
        raise ValueError(f"`width` must be > 0. Received: width={width}")
    return max(1, round(channels * width))


def lenet(width=1.0):
    """LeNet-style CNN for 28x28 inputs (the MultiMNIST network of Sener &
    Koltun 2018 with batch normalisation): two 5x5 convolutions with 2x2
    max-pooling, then a dense layer. 3 sites; `width` scales every layer.
    """
    return [
        ConvUnit(_scaled(20, width), 5, padding="valid", pool_size=2),
        ConvUnit(_scaled(50, width), 5, padding="valid", pool_size=2),
        keras.layers.Flatten(),
        DenseUnit(_scaled(256, width)),
    ]


def resnet(width=1.0, blocks_per_stage=1):
    """A small ResNet: a 3x3 stem convolution, three stages of residual
    blocks (16, 32, 64 channels times `width`, the last two at stride 2) and
    global average pooling. With one block per stage it has 7 sites, the last
    6 being the block convolutions.
    """
    if int(blocks_per_stage) < 1:
        raise ValueError(
            f"`blocks_per_stage` must be >= 1. Received: {blocks_per_stage}"
        )
    layers = [ConvUnit(_scaled(16, width), 3)]
    for stage, channels in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            layers.append(ResidualUnit(_scaled(channels, width), strides))
    layers.append(keras.layers.GlobalAveragePooling2D())
    return layers


BACKBONES = {"lenet": lenet, "resnet": resnet}
