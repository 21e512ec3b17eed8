"""Task specifications: what a multi-task model predicts and how it is scored."""

import dataclasses
import functools
import inspect
import re
from typing import Callable, Sequence

import keras
import tensorflow as tf

from tf_mtl import dense_metrics
from tf_mtl.layers.dense_head import DenseHead

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Metric:
    """A task metric: a factory of fresh `keras.metrics.Metric`s and its direction.

    Args:
        name: key of the metric in the logs, after the task name (`left_accuracy`).
        build: `build(name)` returns a new stateful Keras metric of that name
            (one per model and task).
        higher_is_better: the sign C_t of MPPS eq. (5).
    """

    name: str
    build: Callable[[str], keras.metrics.Metric]
    higher_is_better: bool = True


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    Args:
        name: identifier used in the labels dict, the logs (`{name}_loss`) and
            the export signature. Letters, digits and `_`, starting with a letter.
        head: factory returning the task-specific head g_t (a Keras layer).
        loss: `loss(y_true, y_pred) -> per-example loss`, shape `(batch,)`.
        metrics: the task's `Metric`s.
        label_shape: shape of one example's label (`()` for a class id); the
            model checks the data against it before training.
        classes: the number of classes when a label is a class id (an
            integer in `[0, classes)`, checked before and during training);
            None for other labels.
        ignore_label: a class id outside `[0, classes)` that marks an
            unlabelled pixel or example (segmentation's -1), allowed in the
            labels and left out of the loss and metrics; None: none.
        loss_weight: the task's weight in the summed objective (MPPS eq. 1).
        config: how to make the task again, `{"factory": name, **arguments}`;
            set by the factories of this module (`task_factory`), and needed
            to save a model holding the task.
    """

    name: str
    head: Callable[[], keras.layers.Layer]
    loss: Callable
    metrics: Sequence[Metric] = ()
    label_shape: tuple = ()
    classes: int = None
    ignore_label: int = None
    loss_weight: float = 1.0
    config: dict = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                "Task `name` must be letters, digits and '_' starting with a "
                f"letter. Received: name={self.name!r}"
            )
        if self.ignore_label is not None and (
                self.classes is None or 0 <= self.ignore_label < self.classes):
            raise ValueError(
                f"Task {self.name!r}: `ignore_label` must be outside the class ids "
                f"[0, {self.classes}) of a task with classes. Received: "
                f"ignore_label={self.ignore_label}")
        if not self.loss_weight > 0:
            raise ValueError(
                f"Task {self.name!r}: `loss_weight` must be > 0. "
                f"Received: loss_weight={self.loss_weight}"
            )

    @property
    def dense(self):
        """Whether a label is a map, `(H, W, ...)`: a dense prediction task."""
        return len(self.label_shape) >= 2

    def out_of_range(self, labels):
        """Which `labels` (numpy or TensorFlow) are neither class ids of this
        task nor its `ignore_label`."""
        bad = (labels < 0) | (labels >= self.classes)
        return bad if self.ignore_label is None else bad & (labels != self.ignore_label)

    def get_config(self):
        if self.config is None:
            raise ValueError(
                f"Task {self.name!r} cannot be saved: it was not made by a "
                "registered factory. Decorate the function that makes it with "
                "`tf_mtl.tasks.task_factory`."
            )
        return dict(self.config)


_FACTORIES = {}


def task_factory(make):
    """Registers a function returning a `Task`, so the tasks it makes carry
    their `config` and a saved model can make them again (`from_config`)."""
    signature = inspect.signature(make)

    @functools.wraps(make)
    def factory(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        config = {k: v.item() if hasattr(v, "item") else v  # numpy scalars
                  for k, v in arguments.arguments.items()}
        return dataclasses.replace(make(*args, **kwargs),
                                   config={"factory": make.__name__, **config})

    _FACTORIES[make.__name__] = factory
    return factory


def from_config(config):
    """The `Task` a `Task.get_config()` describes."""
    config = dict(config)
    name = config.pop("factory", None)
    if name not in _FACTORIES:
        raise ValueError(
            f"Unknown task factory {name!r}; registered: {sorted(_FACTORIES)}."
        )
    return _FACTORIES[name](**config)


@task_factory
def classification(name, num_classes, loss_weight=1.0):
    """A classification task: a linear head on the features, softmax
    cross-entropy on its logits, and accuracy.

    >>> task = classification("left", num_classes=10)
    >>> tuple(task.head()(numpy.zeros((2, 8))).shape)
    (2, 10)
    """
    if int(num_classes) < 2:
        raise ValueError(
            f"Task {name!r}: `num_classes` must be >= 2. Received: {num_classes}"
        )

    def loss(y_true, logits):
        return keras.losses.sparse_categorical_crossentropy(
            y_true, logits, from_logits=True
        )

    return Task(
        name=name,
        head=lambda: keras.layers.Dense(num_classes, name=f"{name}_head"),
        loss=loss,
        metrics=(
            Metric("accuracy", keras.metrics.SparseCategoricalAccuracy),
        ),
        classes=int(num_classes),
        loss_weight=loss_weight,
    )


@task_factory
def binary_attributes(name, num_attributes, loss_weight=1.0):
    """A task of `num_attributes` binary attributes: a linear head of one
    logit per attribute, the sigmoid cross-entropy averaged over the
    attributes, and their accuracy (logit > 0 predicts 1) averaged over
    attributes and examples. Labels are float 0/1 of shape
    `(num_attributes,)`.

    >>> task = binary_attributes("mouth", num_attributes=4)
    >>> tuple(task.head()(numpy.zeros((2, 8))).shape)
    (2, 4)
    """
    if int(num_attributes) < 1:
        raise ValueError(
            f"Task {name!r}: `num_attributes` must be >= 1. Received: {num_attributes}")

    def loss(y_true, logits):
        return keras.losses.binary_crossentropy(
            tf.cast(y_true, tf.float32), tf.cast(logits, tf.float32), from_logits=True)

    return Task(
        name=name,
        head=lambda: keras.layers.Dense(num_attributes, name=f"{name}_head"),
        loss=loss,
        metrics=(Metric(
            "accuracy", functools.partial(keras.metrics.BinaryAccuracy, threshold=0.0)),),
        label_shape=(int(num_attributes),),
        loss_weight=loss_weight,
    )


def _pixel_mean(values, valid):
    """Per-example mean of `values` `(batch, H, W)` over its `valid` pixels
    (0 for an example without one): the dense tasks' per-example loss."""
    valid = tf.cast(valid, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(values * valid, axis=[1, 2]),
                                 tf.reduce_sum(valid, axis=[1, 2]))


def _dense_head(name, outputs, output_size, head_channels, aspp_rates):
    return lambda: DenseHead(outputs, output_size, head_channels, aspp_rates,
                             name=f"{name}_head")


@task_factory
def segmentation(name, num_classes, output_size, ignore_label=-1, head_channels=64,
                 aspp_rates=None, loss_weight=1.0):
    """Semantic segmentation: per-pixel class ids `(H, W)` (`ignore_label`
    where unlabelled), a `DenseHead` of `num_classes` logits, pixel-wise
    softmax cross-entropy averaged over each image's labelled pixels;
    mIoU and pixel accuracy over a split's labelled pixels (both higher is
    better).

    >>> task = segmentation("semantic", num_classes=13, output_size=(8, 8))
    >>> tuple(task.head()(numpy.zeros((2, 4, 4, 16), "float32")).shape)
    (2, 8, 8, 13)
    """
    if int(num_classes) < 2:
        raise ValueError(
            f"Task {name!r}: `num_classes` must be >= 2. Received: {num_classes}")

    def loss(y_true, logits):
        y_true = tf.cast(y_true, tf.int32)
        valid = tf.not_equal(y_true, ignore_label)
        cross_entropy = keras.losses.sparse_categorical_crossentropy(
            tf.where(valid, y_true, 0), tf.cast(logits, tf.float32), from_logits=True)
        return _pixel_mean(cross_entropy, valid)

    confusion = {"num_classes": num_classes, "ignore_label": ignore_label}
    return Task(
        name=name,
        head=_dense_head(name, num_classes, output_size, head_channels, aspp_rates),
        loss=loss,
        metrics=(
            Metric("miou", lambda n: dense_metrics.MeanIoU(**confusion, name=n)),
            Metric("pixel_accuracy",
                   lambda n: dense_metrics.PixelAccuracy(**confusion, name=n)),
        ),
        label_shape=tuple(output_size),
        classes=int(num_classes),
        ignore_label=int(ignore_label),
        loss_weight=loss_weight,
    )


def _masked_means(*quantities):
    return tuple(
        Metric(metric_name, lambda n, q=quantity: dense_metrics.MaskedMean(q, name=n),
               higher_is_better=quantity.startswith("within"))
        for metric_name, quantity in quantities)


@task_factory
def depth(name, output_size, head_channels=64, aspp_rates=None, loss_weight=1.0):
    """Depth estimation: per-pixel depth `(H, W, 1)` (0 where unknown), a
    `DenseHead` of one output, L1 loss averaged over each image's valid
    pixels; absolute and relative error over a split's valid pixels (both
    lower is better).

    >>> task = depth("depth", output_size=(8, 8))
    >>> [m.name for m in task.metrics]
    ['absolute_error', 'relative_error']
    """
    def loss(y_true, y_pred):
        y_true, y_pred = tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)
        return _pixel_mean(tf.abs(y_pred - y_true)[..., 0],
                           dense_metrics.valid_depth(y_true))

    return Task(
        name=name,
        head=_dense_head(name, 1, output_size, head_channels, aspp_rates),
        loss=loss,
        metrics=_masked_means(("absolute_error", "depth_absolute_error"),
                              ("relative_error", "depth_relative_error")),
        label_shape=(*output_size, 1),
        loss_weight=loss_weight,
    )


@task_factory
def surface_normals(name, output_size, head_channels=64, aspp_rates=None,
                    loss_weight=1.0):
    """Surface normal estimation: per-pixel unit normals `(H, W, 3)` (all
    zero where unknown), a `DenseHead` of three outputs normalised to unit
    length, loss 1 - cosine similarity averaged over each image's valid
    pixels; over a split's valid pixels, the mean and median angle error
    (degrees, lower is better) and the share of pixels within 11.25, 22.5
    and 30 degrees (higher is better).

    >>> task = surface_normals("normal", output_size=(8, 8))
    >>> [m.name for m in task.metrics]
    ['mean_angle', 'median_angle', 'within_11_25', 'within_22_5', 'within_30']
    """
    def loss(y_true, y_pred):
        return _pixel_mean(1.0 - dense_metrics.normal_cosines(y_true, y_pred),
                           dense_metrics.valid_normals(y_true))

    return Task(
        name=name,
        head=_dense_head(name, 3, output_size, head_channels, aspp_rates),
        loss=loss,
        metrics=(
            *_masked_means(("mean_angle", "angle_error")),
            Metric("median_angle", lambda n: dense_metrics.MedianAngleError(name=n),
                   higher_is_better=False),
            *_masked_means(("within_11_25", "within_11.25"),
                           ("within_22_5", "within_22.5"), ("within_30", "within_30")),
        ),
        label_shape=(*output_size, 3),
        loss_weight=loss_weight,
    )
