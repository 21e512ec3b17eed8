"""The backbones of the papers' own experiments: ResNet-18/34/50 (dilated
for dense prediction, MPPS and Safe MTL), VGG-16 (Multi-CIFAR100) and SegNet
(Maximum Roaming's and MTAN's dense experiments).

Built from the blocks of `tf_mtl.backbones.blocks`, so every convolution has
its site and every backbone its per-task twin (`num_tasks`). Weights start
from Keras' initialisers: nothing is downloaded.
"""

import keras
import tensorflow as tf

from tf_mtl.backbones.blocks import (
    Block, BottleneckUnit, ConvUnit, ResidualUnit, _apply, scaled)

_RESNET_BLOCKS = {18: (ResidualUnit, (2, 2, 2, 2)), 34: (ResidualUnit, (3, 4, 6, 3)),
                  50: (BottleneckUnit, (3, 4, 6, 3))}


def _resnet(depth, width, output_stride, num_tasks, passing, kernel_regularizer):
    """ResNet-`depth` of He et al. (2016): a 7x7 stride-2 stem and 3x3
    stride-2 max-pooling, then four stages of 64, 128, 256, 512 channels
    (times `width`), the last three starting at stride 2.

    `output_stride` None: global average pooling ends it (classification).
    8 or 16: no pooling, and the stages that would bring the resolution
    below 1/`output_stride` are dilated instead of strided (DeepLab, Chen et
    al. 2017, sec. 3.1), each dilating twice as much as the one before; the
    output is the feature map, for a `DenseHead` (with ASPP) per task.
    """
    if output_stride not in (None, 8, 16):
        raise ValueError(f"`output_stride` must be None, 8 or 16. "
                         f"Received: output_stride={output_stride}")
    block, counts = _RESNET_BLOCKS[depth]
    per_task = {"num_tasks": num_tasks, "passing": passing,
                "kernel_regularizer": kernel_regularizer}
    layers = [ConvUnit(scaled(64, width), 7, strides=2, pool_size=3, pool_strides=2,
                       **per_task)]
    stride, dilation = 4, 1
    for stage, (channels, count) in enumerate(zip((64, 128, 256, 512), counts)):
        strides = 1
        if stage > 0:
            if output_stride is not None and stride >= output_stride:
                dilation *= 2
            else:
                strides, stride = 2, stride * 2
        for index in range(count):
            layers.append(block(scaled(channels, width), strides if index == 0 else 1,
                                dilation_rate=dilation, **per_task))
    if output_stride is None:
        layers.append(keras.layers.GlobalAveragePooling2D())
    return layers


def resnet18(width=1.0, output_stride=None, num_tasks=None, passing=None,
             kernel_regularizer=None):
    """ResNet-18 (basic blocks 2-2-2-2; see `_resnet` for the arguments)."""
    return _resnet(18, width, output_stride, num_tasks, passing, kernel_regularizer)


def resnet34(width=1.0, output_stride=None, num_tasks=None, passing=None,
             kernel_regularizer=None):
    """ResNet-34 (basic blocks 3-4-6-3; see `_resnet` for the arguments)."""
    return _resnet(34, width, output_stride, num_tasks, passing, kernel_regularizer)


def resnet50(width=1.0, output_stride=None, num_tasks=None, passing=None,
             kernel_regularizer=None):
    """ResNet-50 (bottleneck blocks 3-4-6-3, 2048 output channels; see
    `_resnet` for the arguments)."""
    return _resnet(50, width, output_stride, num_tasks, passing, kernel_regularizer)


_VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16(width=1.0, num_tasks=None, passing=None, kernel_regularizer=None):
    """VGG-16 with batch normalisation (Simonyan & Zisserman 2015, config D),
    the Multi-CIFAR100 backbone of Auto-Lambda and MPPS's appendix: thirteen
    3x3 convolutions in five stages, each stage ending in 2x2 max-pooling,
    then flattened (512 features on 32x32 inputs). 13 sites.
    """
    per_task = {"num_tasks": num_tasks, "passing": passing,
                "kernel_regularizer": kernel_regularizer}
    layers = []
    for stage in _VGG16:
        for index, channels in enumerate(stage):
            pool = 2 if index == len(stage) - 1 else None
            layers.append(ConvUnit(scaled(channels, width), 3, pool_size=pool, **per_task))
    return layers + [keras.layers.Flatten()]


@keras.saving.register_keras_serializable(package="tf_mtl")
class SegNet(Block):
    """SegNet (Badrinarayanan et al. 2017) as MTAN's dense experiments use it
    (Maximum Roaming's NYUv2 backbone): an encoder of five VGG-16 stages
    (`stage_channels`), each ending in 2x2 max-pooling that remembers where
    each maximum was, and a mirrored decoder whose stages start by putting
    every value back where its maximum came from (max-unpooling) - then
    their 3x3 convolutions, the last of a stage moving to the next stage's
    channels. Every convolution is Conv -> BatchNorm -> [site] -> ReLU: 26
    sites. The output is the full-resolution map of `stage_channels[0]`
    channels; inputs need sides divisible by 32.

    The pooling positions ride along with the feature map in the block's
    state, so routed rows carry their own.
    """

    def __init__(self, stage_channels=(64, 128, 256, 512, 512), num_tasks=None,
                 **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.stage_channels = tuple(int(c) for c in stage_channels)
        depths = [2 if i < 2 else 3 for i in range(len(self.stage_channels))]
        # (channels, pool after it, unpool before it) of each convolution.
        encoder = [(c, i == d - 1, False)
                   for c, d in zip(self.stage_channels, depths) for i in range(d)]
        decoder = []
        for stage in reversed(range(len(self.stage_channels))):
            target = self.stage_channels[max(stage - 1, 0)]
            decoder += [(self.stage_channels[stage], False, i == 0)
                        for i in range(depths[stage] - 1)]
            decoder.append((target, False, depths[stage] == 1))
        self.plan = encoder + decoder
        self.convs = [self._conv(c, 3) for c, _, _ in self.plan]
        self.norms = [self._norm() for _ in self.plan]

    @property
    def site_channels(self):
        return tuple(c for c, _, _ in self.plan)

    @property
    def site_layers(self):
        return tuple(self.convs)

    def stages(self):
        return [self._stage(i) for i in range(len(self.plan) + 1)]

    def _stage(self, index):
        """Finishes unit `index - 1` (ReLU, pooling), starts unit `index`
        (unpooling, convolution, normalisation)."""
        def stage(state, task_ids, training):
            x, positions = state[0], list(state[1:])
            if index > 0:
                x = keras.ops.relu(x)
                if self.plan[index - 1][1]:
                    x, argmax = tf.nn.max_pool_with_argmax(x, 2, 2, "VALID")
                    positions.append(argmax)
            if index == len(self.plan):
                return (x,)
            if self.plan[index][2]:
                x = _unpool(x, positions.pop())
            x = self.norms[index](_apply(self.convs[index], x, task_ids, training),
                                  task_ids, training=training)
            return (x, *positions)

        return stage

    def get_config(self):
        return {**super().get_config(), "stage_channels": self.stage_channels}


def _unpool(x, argmax):
    """Max-unpooling: each value of `x` to the position its maximum came
    from in the 2x larger map (`argmax` of `tf.nn.max_pool_with_argmax`,
    indices within each image), zeros elsewhere."""
    batch, height, width, channels = tf.unstack(tf.shape(x))
    size = 4 * height * width * channels
    flat = tf.reshape(argmax, [batch, -1]) + tf.cast(
        tf.range(batch)[:, None] * size, argmax.dtype)
    values = tf.scatter_nd(tf.reshape(flat, [-1, 1]), tf.reshape(x, [-1]),
                           tf.cast([batch * size], argmax.dtype))
    return tf.reshape(values, [batch, 2 * height, 2 * width, channels])


def segnet(width=1.0, num_tasks=None, passing=None, kernel_regularizer=None):
    """SegNet's encoder-decoder (`SegNet`) with 64, 128, 256, 512, 512
    channels times `width`."""
    channels = [scaled(c, width) for c in (64, 128, 256, 512, 512)]
    return [SegNet(channels, num_tasks=num_tasks, passing=passing,
                   kernel_regularizer=kernel_regularizer)]
