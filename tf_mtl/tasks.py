"""Task specifications: what a multi-task model predicts and how it is scored."""

import dataclasses
import functools
import inspect
import re
from typing import Callable, Sequence

import keras

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
    loss_weight: float = 1.0
    config: dict = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                "Task `name` must be letters, digits and '_' starting with a "
                f"letter. Received: name={self.name!r}"
            )
        if not self.loss_weight > 0:
            raise ValueError(
                f"Task {self.name!r}: `loss_weight` must be > 0. "
                f"Received: loss_weight={self.loss_weight}"
            )


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
