"""Tiny synthetic multi-task datasets, for fast tests.

The Fashion-MNIST datasets take seconds to build and minutes to learn. The
synthetic ones are built in milliseconds and learned in a few steps, which
suits tests of models and training loops. Each (task, class) pair owns a
fixed random binary pattern, and an image is uniform noise plus the patterns
of its labels, so every label can be read from the image. Both structures of
this package are available: jointly labelled (`make_synthetic`, every image
has a label for every task) and not jointly labelled
(`make_synthetic_groups`, every image belongs to one task).
"""

import numpy as np

from tf_mtl.data import _utils

IMAGE_SHAPE = (28, 28, 1)


def task_names(num_tasks):
    """Returns the task names of the synthetic datasets: `task_0`, ...."""
    return tuple(f"task_{task}" for task in range(num_tasks))


def _draw_patterns(rng, num_examples, num_tasks, num_classes):
    """Checks the sizes, then draws one binary pattern per (task, class)."""
    _utils.check_int("num_examples", num_examples, 1)
    _utils.check_int("num_tasks", num_tasks, 2)
    _utils.check_int("num_classes", num_classes, 2)
    return rng.random((num_tasks, num_classes) + IMAGE_SHAPE) < 0.5


def _images(rng, signal):
    """Mixes a signal in [0, 1] with as much uniform noise."""
    noise = rng.random(signal.shape)
    return (0.5 * signal + 0.5 * noise).astype(np.float32)


def make_synthetic(num_examples=256, num_tasks=2, num_classes=3, seed=0):
    """Builds a jointly labelled synthetic dataset.

    Each image holds the mean of the patterns of its labels, one per task,
    plus noise.

    Args:
        num_examples: Number of examples.
        num_tasks: Number of tasks, at least 2.
        num_classes: Number of classes of every task, at least 2.
        seed: Seed of `np.random.default_rng`; the same seed gives the same
            patterns and examples.

    Returns:
        `(x, {task_name: y})`: float32 images in [0, 1] of shape
        `(num_examples, 28, 28, 1)`, and for each of `task_names(num_tasks)`
        int32 labels in `[0, num_classes)` of shape `(num_examples,)`.
    """
    rng = np.random.default_rng(seed)
    patterns = _draw_patterns(rng, num_examples, num_tasks, num_classes)
    labels = rng.integers(num_classes, size=(num_tasks, num_examples))
    tasks = np.arange(num_tasks)[:, np.newaxis]
    x = _images(rng, patterns[tasks, labels].mean(axis=0))
    return x, dict(zip(task_names(num_tasks), labels.astype(np.int32)))


def make_synthetic_groups(num_examples=256, num_tasks=2, num_classes=3, seed=0):
    """Builds a synthetic dataset that is not jointly labelled.

    Each image belongs to one task, drawn uniformly, and holds the pattern
    of its label in that task plus noise.

    Args:
        num_examples: Number of examples.
        num_tasks: Number of tasks, at least 2.
        num_classes: Number of classes of every task, at least 2.
        seed: Seed of `np.random.default_rng`; the same seed gives the same
            patterns and examples.

    Returns:
        `(x, task_ids, y)`: float32 images in [0, 1] of shape
        `(num_examples, 28, 28, 1)`, int32 task ids in `[0, num_tasks)` and
        int32 labels in `[0, num_classes)`, both of shape `(num_examples,)`.
    """
    rng = np.random.default_rng(seed)
    patterns = _draw_patterns(rng, num_examples, num_tasks, num_classes)
    task_ids = rng.integers(num_tasks, size=num_examples)
    labels = rng.integers(num_classes, size=num_examples)
    x = _images(rng, patterns[task_ids, labels])
    return x, task_ids.astype(np.int32), labels.astype(np.int32)
