"""A task's decoder for dense prediction: feature map -> per-pixel output."""

import keras
import tensorflow as tf

from tf_mtl.layers.task_batch_norm import NORM_MOMENTUM


@keras.saving.register_keras_serializable(package="tf_mtl")
class DenseHead(keras.layers.Layer):
    """The head g_t of a dense task: features `(batch, h, w, c)` to
    `(batch, H, W, outputs)` at the label's resolution `output_size`.

    Without `aspp_rates` it is MTAN's SegNet head: a 3x3 convolution to
    `channels`, ReLU, a 1x1 convolution to `outputs`. With them it is
    DeepLab-v3's head (Chen et al. 2017, sec. 3.3), the one MPPS and Safe MTL
    give each task: atrous spatial pyramid pooling - a 1x1 convolution, one
    3x3 convolution per rate dilated by it, and image pooling (global
    average, 1x1 convolution, upsampled), each batch-normalised and ReLU'd -
    concatenated, fused by a 1x1 convolution, then the 1x1 classifier. The
    output is upsampled bilinearly to `output_size`. The head runs on its
    own task's rows only, so its batch normalisation mixes no tasks.

    Example:

    >>> head = DenseHead(outputs=13, output_size=(32, 32), aspp_rates=(1, 2))
    >>> tuple(head(numpy.zeros((2, 8, 8, 16), "float32")).shape)
    (2, 32, 32, 13)
    """

    def __init__(self, outputs, output_size, channels=64, aspp_rates=None, **kwargs):
        super().__init__(**kwargs)
        self.outputs = int(outputs)
        if self.outputs < 1:
            raise ValueError(f"`outputs` must be >= 1. Received: outputs={outputs}")
        if len(output_size) != 2 or min(output_size) < 1:
            raise ValueError("`output_size` must be (height, width). "
                             f"Received: output_size={output_size}")
        self.output_size = tuple(int(s) for s in output_size)
        self.channels = int(channels)
        self.aspp_rates = tuple(int(r) for r in aspp_rates) if aspp_rates else None

        def unit(kernel_size, dilation=1):
            return [keras.layers.Conv2D(self.channels, kernel_size, padding="same",
                                        dilation_rate=dilation, use_bias=False),
                    keras.layers.BatchNormalization(momentum=NORM_MOMENTUM),
                    keras.layers.ReLU()]

        if self.aspp_rates:
            self.branches = [unit(1)] + [unit(3, rate) for rate in self.aspp_rates]
            self.pooling = unit(1)
            self.fuse = unit(1)
        else:
            self.fuse = [keras.layers.Conv2D(self.channels, 3, padding="same"),
                         keras.layers.ReLU()]
        self.classifier = keras.layers.Conv2D(self.outputs, 1)

    def call(self, x, training=None):
        run = lambda layers, h: _sequence(layers, h, training)
        if self.aspp_rates:
            pooled = run(self.pooling, keras.ops.mean(x, axis=(1, 2), keepdims=True))
            pooled = tf.broadcast_to(pooled, tf.concat([tf.shape(x)[:3],
                                                        [self.channels]], 0))
            x = keras.ops.concatenate([run(b, x) for b in self.branches] + [pooled], -1)
        y = self.classifier(run(self.fuse, x))
        return tf.cast(tf.image.resize(y, self.output_size), y.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.output_size, self.outputs)

    def get_config(self):
        return {**super().get_config(), "outputs": self.outputs,
                "output_size": self.output_size, "channels": self.channels,
                "aspp_rates": self.aspp_rates}


def _sequence(layers, x, training):
    for layer in layers:
        x = layer(x, training=training)
    return x
