"""FashionGroups: Fashion-MNIST split into three tasks by kind of item.

Multi-CIFAR100 turns CIFAR-100 into 20 tasks, one per coarse class, each
example belonging to exactly one task (the CIFAR-MTL setting of Rosenbaum et
al., 2018, "Routing Networks"). FashionGroups does the same with
Fashion-MNIST: each image belongs to one of three tasks according to its
class, and its label is the index of its class within that task. Unlike
MultiFashion, an example carries a label for its own task only (the dataset
is not jointly labelled), and the tasks have different sizes.
"""

import numpy as np

from tf_mtl.data import fashion_mnist

TASK_NAMES = ("tops", "footwear", "other")

# The Fashion-MNIST classes of each task, in the order of their in-task label.
TASK_CLASSES = (
    (0, 2, 4, 6),  # T-shirt/top, Pullover, Coat, Shirt.
    (5, 7, 9),  # Sandal, Sneaker, Ankle boot.
    (1, 3, 8),  # Trouser, Dress, Bag.
)

TASK_NUM_CLASSES = {
    name: len(classes) for name, classes in zip(TASK_NAMES, TASK_CLASSES)
}

_NUM_CLASSES = len(fashion_mnist.CLASS_NAMES)
_CLASS_TO_TASK = np.empty(_NUM_CLASSES, np.int32)
_CLASS_TO_LABEL = np.empty(_NUM_CLASSES, np.int32)
for _task_id, _classes in enumerate(TASK_CLASSES):
    _CLASS_TO_TASK[list(_classes)] = _task_id
    _CLASS_TO_LABEL[list(_classes)] = np.arange(len(_classes))


def make_fashion_groups(images, labels):
    """Builds FashionGroups examples from Fashion-MNIST images.

    Args:
        images: uint8 array of shape `(N, 28, 28)`.
        labels: Integer array of shape `(N,)`, Fashion-MNIST classes in
            [0, 10).

    Returns:
        `(x, task_ids, y)`: float32 images in [0, 1] of shape
        `(N, 28, 28, 1)`, int32 task ids in [0, 3) of shape `(N,)` (indices
        into `TASK_NAMES`), and int32 labels of shape `(N,)`, the index of
        each image's class within `TASK_CLASSES[task_id]`.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            "Expected `images` of shape (N, 28, 28) and `labels` of shape "
            f"(N,). Received `images` of shape {images.shape} and `labels` "
            f"of shape {labels.shape}."
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < _NUM_CLASSES:
        raise ValueError(
            "Expected `labels` to be Fashion-MNIST classes in "
            f"[0, {_NUM_CLASSES}). "
            f"Received values in [{labels.min()}, {labels.max()}]."
        )
    return (
        fashion_mnist.scale_images(images),
        _CLASS_TO_TASK[labels],
        _CLASS_TO_LABEL[labels],
    )
