"""What every loader of `tf_mtl.data` returns."""

import dataclasses
import typing

import tensorflow as tf

from tf_mtl import tasks as task_specs


@dataclasses.dataclass(frozen=True)
class MultiTaskData:
    """The splits of a multi-task dataset and the description of its tasks.

    Attributes:
        train: Training split, batched, in the order of its (seed, epoch):
            see `ordering` (models of tf_mtl follow `fit`'s epoch by
            themselves; a plain Keras model takes `order_callbacks(train)`).
        validation: Validation split, batched, in a fixed order.
        test: Test split, batched, in a fixed order.
        task_classes: Ordered dict mapping each task name to its number of
            classes (None for a task whose labels are not class ids). The order defines the task ids of datasets that are not
            jointly labelled.
        jointly_labelled: Whether every example has a label for every task
            (elements `(image, {task_name: label})`) or for its own task only
            (elements `(image, task_id, label)`).
        tasks: The `tf_mtl.Task` of each task, in the order of
            `task_classes` (default: a `tasks.classification` per entry).
        heldout: Held-out examples carved from the training split
            (`with_heldout`), batched, in a fixed order; None until carved.
        carve: `carve(fraction) -> (train, heldout)`, how the loader carves
            them (None: it cannot).
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    task_classes: dict
    jointly_labelled: bool
    tasks: tuple = None
    heldout: tf.data.Dataset = None
    carve: typing.Callable = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.tasks is None:
            object.__setattr__(self, "tasks", tuple(
                task_specs.classification(name, classes)
                for name, classes in self.task_classes.items()))
        if [t.name for t in self.tasks] != list(self.task_classes):
            raise ValueError(
                f"`tasks` {[t.name for t in self.tasks]} must be those of "
                f"`task_classes` {list(self.task_classes)}, in its order.")

    def with_heldout(self, fraction):
        """The data with a seeded `fraction` of the training examples moved
        to `heldout`, for what is fitted on held-out data (bi-level Safe
        MTL's gates, Auto-Lambda's weights) and must not see the validation
        split, which selects the reported epoch, nor the test split (on
        NYUv2 and Cityscapes the same images). Safe MTL's reference code
        carves 20 %."""
        if self.carve is None:
            raise ValueError("this data set's loader cannot carve held-out examples "
                             "from its training split.")
        train, heldout = self.carve(fraction)
        return dataclasses.replace(self, train=train, heldout=heldout)
