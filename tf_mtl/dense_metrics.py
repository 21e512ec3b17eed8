"""Streaming metrics of dense prediction, exact over a whole split.

Each metric accumulates sums (a confusion matrix, totals and counts, a
histogram of angle errors) in float64 Keras metric variables, which
`tf.distribute` sums over replicas on read: the result over a split is the
one a single pass over all its pixels computes, whatever the batching or the
number of devices. Only valid pixels count: labels equal to `ignore_label`
(segmentation), zero depth, all-zero normals (the NYUv2 and Cityscapes
conventions of MTAN's preprocessed data).

    >>> miou = MeanIoU(num_classes=2)
    >>> miou.update_state(numpy.array([[0, 1, -1]]),
    ...                   numpy.array([[[1., 0.], [1., 0.], [0., 1.]]]))
    >>> float(miou.result())   # class 0: 1/2, class 1: 0/1
    0.25
"""

import keras
import numpy as np
import tensorflow as tf


def valid_depth(y_true):
    """Pixels with a depth label: `(batch, H, W)` booleans of `(batch, H, W, 1)`."""
    return tf.not_equal(y_true[..., 0], 0)


def valid_normals(y_true):
    """Pixels with a normal label: not all three components zero."""
    return tf.reduce_any(tf.not_equal(y_true, 0), axis=-1)


def normal_cosines(y_true, y_pred):
    """Cosine between the predicted normal (normalised here) and the unit
    label, per pixel: `(batch, H, W)`."""
    y_pred = tf.math.l2_normalize(tf.cast(y_pred, tf.float32), axis=-1)
    return tf.reduce_sum(y_pred * tf.cast(y_true, tf.float32), axis=-1)


def angle_errors(y_true, y_pred):
    """Angle in degrees between the predicted normal and the label, per
    pixel: `(batch, H, W)`."""
    cosine = normal_cosines(y_true, y_pred)
    return tf.acos(tf.clip_by_value(cosine, -1.0, 1.0)) * (180.0 / np.pi)


class _Accumulator(keras.metrics.Metric):
    """A metric made of float64 sums, zeroed by `reset_state`."""

    def _sum(self, name, shape=()):
        return self.add_variable(shape, "zeros", dtype="float64", name=name)

    def reset_state(self):
        for variable in self.variables:
            variable.assign(tf.zeros(variable.shape, variable.dtype))


class _ConfusionMatrix(_Accumulator):
    """Accumulates `confusion[true, predicted]` over the pixels whose label is
    not `ignore_label`; predictions are the argmax of the logits."""

    def __init__(self, num_classes, ignore_label=-1, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        if int(num_classes) < 2:
            raise ValueError(f"`num_classes` must be >= 2. Received: {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.confusion = self._sum("confusion", (self.num_classes, self.num_classes))

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(f"{type(self).__name__} takes no `sample_weight`.")
        y_true = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        y_pred = tf.reshape(tf.argmax(y_pred, axis=-1, output_type=tf.int32), [-1])
        valid = tf.not_equal(y_true, self.ignore_label)
        self.confusion.assign_add(tf.math.confusion_matrix(
            tf.boolean_mask(y_true, valid), tf.boolean_mask(y_pred, valid),
            self.num_classes, dtype=tf.float64))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "ignore_label": self.ignore_label}


@keras.saving.register_keras_serializable(package="tf_mtl")
class MeanIoU(_ConfusionMatrix):
    """Mean intersection over union of segmentation, from the confusion matrix C:

        mIoU = mean over classes c with a pixel (labelled or predicted) of
               C[c, c] / (sum_k C[c, k] + sum_k C[k, c] - C[c, c]).

    Classes absent from both labels and predictions of the whole split do
    not count (their IoU is 0 / 0).
    """

    def result(self):
        true_positives = tf.linalg.diag_part(self.confusion)
        union = (tf.reduce_sum(self.confusion, 0) + tf.reduce_sum(self.confusion, 1)
                 - true_positives)
        present = union > 0
        iou = tf.boolean_mask(true_positives, present) / tf.boolean_mask(union, present)
        return tf.cast(tf.math.divide_no_nan(tf.reduce_sum(iou),
                                             tf.cast(tf.size(iou), tf.float64)),
                       tf.float32)


@keras.saving.register_keras_serializable(package="tf_mtl")
class PixelAccuracy(_ConfusionMatrix):
    """Share of labelled pixels whose class is predicted: trace(C) / sum(C)."""

    def result(self):
        return tf.cast(tf.math.divide_no_nan(tf.linalg.trace(self.confusion),
                                             tf.reduce_sum(self.confusion)), tf.float32)


@keras.saving.register_keras_serializable(package="tf_mtl")
class MaskedMean(_Accumulator):
    """Mean of a per-pixel quantity over the valid pixels of a whole split:
    `sum(value * valid) / sum(valid)`.

    Args:
        quantity: one of `QUANTITIES`: `"depth_absolute_error"`
            |d_hat - d|, `"depth_relative_error"` |d_hat - d| / d (valid:
            d != 0), `"angle_error"` (degrees), `"within_11.25"`,
            `"within_22.5"`, `"within_30"` (share of pixels whose angle error
            is below the threshold; valid: a nonzero normal).
    """

    QUANTITIES = ("depth_absolute_error", "depth_relative_error", "angle_error",
                  "within_11.25", "within_22.5", "within_30")

    def __init__(self, quantity, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        if quantity not in self.QUANTITIES:
            raise ValueError(f"`quantity` must be one of {self.QUANTITIES}. "
                             f"Received: quantity={quantity!r}")
        self.quantity = quantity
        self.total = self._sum("total")
        self.count = self._sum("count")

    def _values(self, y_true, y_pred):
        if self.quantity.startswith("depth"):
            y_true, y_pred = tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)
            valid = valid_depth(y_true)
            error = tf.abs(y_pred - y_true)[..., 0]
            if self.quantity == "depth_relative_error":
                error = tf.math.divide_no_nan(error, y_true[..., 0])
            return error, valid
        angles = angle_errors(y_true, y_pred)
        if self.quantity != "angle_error":
            angles = tf.cast(angles < float(self.quantity.split("_")[1]), tf.float32)
        return angles, valid_normals(y_true)

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError("MaskedMean takes no `sample_weight`.")
        values, valid = self._values(y_true, y_pred)
        self.total.assign_add(tf.reduce_sum(tf.cast(tf.boolean_mask(values, valid),
                                                    tf.float64)))
        self.count.assign_add(tf.reduce_sum(tf.cast(valid, tf.float64)))

    def result(self):
        return tf.cast(tf.math.divide_no_nan(self.total, self.count), tf.float32)

    def get_config(self):
        return {**super().get_config(), "quantity": self.quantity}


@keras.saving.register_keras_serializable(package="tf_mtl")
class MedianAngleError(_Accumulator):
    """Median angle error (degrees) of surface normals over the valid pixels
    of a whole split, from a histogram of `bins` equal bins on [0, 180]:
    the centre of the bin holding the median pixel, so within 90 / bins
    degrees of the exact median (0.005 degrees by default). A histogram
    rather than the pixels themselves keeps the state fixed in size and
    summable over replicas.
    """

    def __init__(self, bins=18000, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.bins = int(bins)
        if self.bins < 1:
            raise ValueError(f"`bins` must be >= 1. Received: bins={bins}")
        self.histogram = self._sum("histogram", (self.bins,))

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError("MedianAngleError takes no `sample_weight`.")
        angles = tf.boolean_mask(angle_errors(y_true, y_pred), valid_normals(y_true))
        index = tf.cast(tf.floor(angles * (self.bins / 180.0)), tf.int32)
        index = tf.clip_by_value(index, 0, self.bins - 1)
        self.histogram.assign_add(tf.cast(
            tf.math.bincount(index, minlength=self.bins, maxlength=self.bins),
            tf.float64))

    def result(self):
        cumulative = tf.cumsum(self.histogram)
        # The first bin whose cumulative count reaches half the pixels.
        median_bin = tf.reduce_sum(tf.cast(cumulative < cumulative[-1] / 2, tf.int32))
        median = (tf.cast(median_bin, tf.float32) + 0.5) * (180.0 / self.bins)
        return tf.where(cumulative[-1] > 0, median, 0.0)

    def get_config(self):
        return {**super().get_config(), "bins": self.bins}
