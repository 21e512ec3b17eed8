"""The small backbones of the Fashion-MNIST experiments: LeNet and a small ResNet."""

import keras

from tf_mtl.backbones.blocks import ConvUnit, DenseUnit, ResidualUnit, scaled


def lenet(width=1.0, num_tasks=None, passing=None, kernel_regularizer=None):
    """LeNet-style CNN for 28x28 inputs (the MultiMNIST network of Sener &
    Koltun 2018 with batch normalisation): two 5x5 convolutions with 2x2
    max-pooling, then a dense layer. 3 sites; `width` scales every layer;
    `num_tasks` makes the per-task twin, `passing` (a `passing_spec`) its
    passed version, `kernel_regularizer` penalises its kernels.
    """
    per_task = {"num_tasks": num_tasks, "passing": passing,
                "kernel_regularizer": kernel_regularizer}
    return [
        ConvUnit(scaled(20, width), 5, padding="valid", pool_size=2, **per_task),
        ConvUnit(scaled(50, width), 5, padding="valid", pool_size=2, **per_task),
        keras.layers.Flatten(),
        DenseUnit(scaled(256, width), **per_task),
    ]


def resnet(width=1.0, blocks_per_stage=1, num_tasks=None, passing=None,
           kernel_regularizer=None, dense_prediction=False):
    """A small ResNet: a 3x3 stem convolution, three stages of residual
    blocks (16, 32, 64 channels times `width`, the last two at stride 2) and
    global average pooling. With one block per stage it has 7 sites, the last
    6 being the block convolutions. `num_tasks` makes the per-task twin,
    `passing` (a `passing_spec`) its passed version, `kernel_regularizer`
    penalises its kernels. `dense_prediction`: no pooling, the output is the
    feature map at a quarter of the input's resolution.
    """
    if int(blocks_per_stage) < 1:
        raise ValueError(
            f"`blocks_per_stage` must be >= 1. Received: {blocks_per_stage}"
        )
    per_task = {"num_tasks": num_tasks, "passing": passing,
                "kernel_regularizer": kernel_regularizer}
    layers = [ConvUnit(scaled(16, width), 3, **per_task)]
    for stage, channels in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            layers.append(ResidualUnit(scaled(channels, width), strides, **per_task))
    if not dense_prediction:
        layers.append(keras.layers.GlobalAveragePooling2D())
    return layers
