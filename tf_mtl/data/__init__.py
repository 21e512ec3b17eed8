"""Multi-task datasets as `tf.data` pipelines.

`load(name)` returns the training, validation and test splits of a multi-task
dataset, batched and ready for `model.fit`, together with its tasks and their
numbers of classes. The datasets come in two structures:

* Jointly labelled (`"multifashion"`, `"multifashion_texture"`,
  `"fashion_scenes"`, `"synthetic"`, `"nyuv2"`, `"cityscapes"`,
  `"celeba"`): every example has a label for every task. Elements are
  `(image, {task_name: label})`.
* Not jointly labelled (`"fashion_groups"`, `"fashion_domains"`,
  `"synthetic_groups"`, `"multi_cifar100"`): every example belongs to one
  task. Elements are `(image, task_id, label)`, where `task_id` is the
  position of the task in `MultiTaskData.task_classes`.

Images of the Fashion-MNIST data sets are float32 `(28, 28, 1)` in [0, 1]
(FashionScenes: `(32, 32, 1)`; plus the unclipped texture in
`"multifashion_texture"`); class ids and task ids are int32 (a batch
dimension comes first). Their arrays are built in memory with numpy, then
sliced by `tf.data.Dataset.from_tensor_slices`; the papers' data sets are
read by their modules (`nyuv2_cityscapes`, `multi_cifar100`, `celeba`).
The training split is gathered in an order that is a function of the seed
and the epoch alone, so a resumed run sees the batches of an uninterrupted
one (`ordering`: `fit` of a tf_mtl model follows the epoch by itself, other
models take `callbacks=order_callbacks(train)`).
"""

import functools
import importlib
import typing

import numpy as np
import tensorflow as tf

from tf_mtl import tasks as task_specs
from tf_mtl.data import _utils
from tf_mtl.data.base import MultiTaskData
from tf_mtl.data import fashion_domains
from tf_mtl.data import fashion_groups
from tf_mtl.data import fashion_mnist
from tf_mtl.data import fashion_scenes
from tf_mtl.data import multifashion
from tf_mtl.data import multifashion_texture
from tf_mtl.data import ordering
from tf_mtl.data import synthetic
from tf_mtl.data.fashion_mnist import load_fashion_mnist
from tf_mtl.data.ordering import EpochOrder, epoch_shuffled, order_callbacks

__all__ = ["MultiTaskData", "load", "load_fashion_mnist", "task_counts",
           "EpochOrder", "epoch_shuffled", "order_callbacks"]

# Split sizes of the synthetic datasets, and their tasks.
SYNTHETIC_SPLIT_SIZES = {"train": 256, "validation": 64, "test": 64}
SYNTHETIC_NUM_TASKS = 2
SYNTHETIC_NUM_CLASSES = 3


def _slice(arrays, start, stop):
    """Slices every array of a nested structure of arrays."""
    return tf.nest.map_structure(lambda array: array[start:stop], arrays)


def _fashion_splits(seed, fashion, limit):
    data = fashion()
    splits = fashion_mnist.split_fashion_mnist(data, seed)
    return {name: _slice(arrays, 0, limit) for name, arrays in splits.items()}


def _seeded_builder(make):
    """Builds each Fashion-MNIST split with `make(images, labels, seed)`."""
    def build(seed, fashion, limit):
        splits = _fashion_splits(seed, fashion, limit)
        # One draw per split, so that MultiFashion partners stay within their split.
        split_seeds = np.random.SeedSequence(seed).spawn(len(splits))
        return {
            name: make(images, labels, split_seed)
            for (name, (images, labels)), split_seed in zip(
                splits.items(), split_seeds
            )
        }

    return build


def _build_fashion_scenes(seed, fashion, limit):
    # Three Fashion-MNIST images make one scene: `limit` counts scenes.
    build = _seeded_builder(fashion_scenes.make_fashion_scenes)
    return build(seed, fashion, limit and limit * fashion_scenes.ITEMS)


def _build_fashion_groups(seed, fashion, limit):
    splits = _fashion_splits(seed, fashion, limit)
    return {
        name: fashion_groups.make_fashion_groups(images, labels)
        for name, (images, labels) in splits.items()
    }


def _synthetic_builder(make):
    """Returns a builder that cuts one pool of `make` examples into splits.

    The splits share the pool's class patterns, so what is learned on the
    training split carries over to the others.
    """

    def build(seed, fashion, limit):
        del fashion  # Synthetic data is made, not read.
        pool = make(
            sum(SYNTHETIC_SPLIT_SIZES.values()),
            SYNTHETIC_NUM_TASKS,
            SYNTHETIC_NUM_CLASSES,
            seed,
        )
        splits = {}
        start = 0
        for name, size in SYNTHETIC_SPLIT_SIZES.items():
            splits[name] = _slice(pool, start, start + min(size, limit or size))
            start += size
        return splits

    return build


class _Dataset(typing.NamedTuple):
    """What `load` needs to know of a dataset.

    `build(seed, fashion, limit)` returns a dict mapping each split name to
    the nested structure of numpy arrays of the split's examples; `fashion()`
    reads Fashion-MNIST (`load_fashion_mnist`).
    """

    build: typing.Callable
    task_classes: dict
    jointly_labelled: bool
    tasks: tuple = None  # default: a classification per task


_SYNTHETIC_TASK_CLASSES = {
    name: SYNTHETIC_NUM_CLASSES
    for name in synthetic.task_names(SYNTHETIC_NUM_TASKS)
}

_DATASETS = {
    "multifashion": _Dataset(
        _seeded_builder(multifashion.make_multifashion),
        multifashion.TASK_NUM_CLASSES,
        True,
    ),
    "multifashion_texture": _Dataset(
        _seeded_builder(multifashion_texture.make_multifashion_texture),
        multifashion_texture.TASK_NUM_CLASSES,
        True,
    ),
    "fashion_groups": _Dataset(
        _build_fashion_groups, fashion_groups.TASK_NUM_CLASSES, False
    ),
    "fashion_domains": _Dataset(
        _seeded_builder(fashion_domains.make_fashion_domains),
        fashion_domains.TASK_NUM_CLASSES,
        False,
    ),
    "fashion_scenes": _Dataset(
        _build_fashion_scenes,
        {"semantic": fashion_scenes.NUM_CLASSES, "depth": None, "normal": None},
        True,
        (task_specs.segmentation("semantic", fashion_scenes.NUM_CLASSES,
                                 (fashion_scenes.SIZE,) * 2),
         task_specs.depth("depth", (fashion_scenes.SIZE,) * 2),
         task_specs.surface_normals("normal", (fashion_scenes.SIZE,) * 2)),
    ),
    "synthetic": _Dataset(
        _synthetic_builder(synthetic.make_synthetic),
        _SYNTHETIC_TASK_CLASSES,
        True,
    ),
    "synthetic_groups": _Dataset(
        _synthetic_builder(synthetic.make_synthetic_groups),
        _SYNTHETIC_TASK_CLASSES,
        False,
    ),
}


# The papers' data sets, read from --data_dir or TensorFlow Datasets:
# `(module, function, takes download)`; imported when asked for, as
# tensorflow_datasets is slow to import.
_PAPER_DATASETS = {
    "nyuv2": ("nyuv2_cityscapes", "load_nyuv2", False),
    "cityscapes": ("nyuv2_cityscapes", "load_cityscapes", False),
    "multi_cifar100": ("multi_cifar100", "load_multi_cifar100", True),
    "celeba": ("celeba", "load_celeba", True),
}


def _load_paper_dataset(name, batch_size, seed, data_dir, limit, download, options):
    module, function, downloads = _PAPER_DATASETS[name]
    if download and not downloads:
        raise ValueError(f"{name!r} cannot be downloaded: put its preprocessed .npy "
                         "files under `data_dir` (see the README).")
    if data_dir is None and not downloads:
        raise ValueError(f"{name!r} is read from `data_dir`, its preprocessed .npy "
                         "folder (see the README). Received: data_dir=None")
    load_split = getattr(importlib.import_module(f"tf_mtl.data.{module}"), function)
    if downloads:
        options = {**options, "download": download}
    return load_split(data_dir=data_dir, batch_size=batch_size, seed=seed, limit=limit,
                      **options)


def _to_dataset(arrays, batch_size):
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load(name, batch_size=128, seed=0, data_dir=None, limit=None, download=False,
         **options):
    """Loads a multi-task dataset as batched `tf.data` pipelines.

    Args:
        name: One of `"multifashion"` (two jointly labelled tasks, the
            classes of two overlapping Fashion-MNIST items),
            `"fashion_groups"` (three tasks, groups of Fashion-MNIST
            classes, not jointly labelled), `"multifashion_texture"`
            (MultiFashion plus a third, unrelated task: the frequency band
            of a noise texture added to each image, jointly labelled),
            `"fashion_domains"` (one 10-class task in four domains, each a
            transformation of the images: PPNet's distributed scenario),
            `"fashion_scenes"` (dense prediction: segmentation, depth and
            surface normals of scenes of three items, jointly labelled;
            `limit` counts scenes),
            `"synthetic"` and
            `"synthetic_groups"` (tiny learnable datasets for tests, of
            each structure); the papers' data sets, which this machine
            cannot download: `"nyuv2"` and `"cityscapes"` (MTAN's
            preprocessed `.npy` folder in `data_dir`:
            `nyuv2_cityscapes`), `"multi_cifar100"` (`multi_cifar100`)
            and `"celeba"` (`celeba`), through TensorFlow Datasets.
        batch_size: Number of examples per batch.
        seed: Seed of everything random: the validation split and the
            MultiFashion partners (Fashion-MNIST datasets), the examples
            (synthetic datasets) and the order of the training examples,
            which in epoch e is a function of (seed, e) alone, so a resumed
            run sees the batches an uninterrupted one sees.
        data_dir: Folder holding the Fashion-MNIST IDX files (see
            `load_fashion_mnist`), NYUv2's or Cityscapes' `.npy` folder, or
            the TensorFlow Datasets folder of Multi-CIFAR100 and CelebA.
            Unused by the synthetic datasets.
        download: Whether Fashion-MNIST, CIFAR-100 or CelebA may be
            downloaded by TensorFlow Datasets when not found.
        limit: If set, keeps at most `limit` examples per split, for fast
            runs. MultiFashion partners are then drawn among the kept
            examples.
        **options: further arguments of a paper data set's loader (e.g.
            `num_classes` of `nyuv2_cityscapes.load_cityscapes`).

    Returns:
        A `MultiTaskData`. Splits of the Fashion-MNIST datasets: the
        validation split is 10,000 images of the official training set, the
        training split its other 50,000 images, the test split the official
        test set.

    Raises:
        ValueError: If `name` is unknown, or `batch_size` or `limit` is not
            a positive integer.
        FileNotFoundError: If a Fashion-MNIST dataset is asked for and
            Fashion-MNIST cannot be found (see `load_fashion_mnist`), or a
            paper's data set is not where `data_dir` says.
    """
    if name not in _DATASETS and name not in _PAPER_DATASETS:
        raise ValueError(
            f"Expected `name` to be one of {sorted(_DATASETS) + sorted(_PAPER_DATASETS)}. "
            f"Received: name={name!r}"
        )
    _utils.check_int("batch_size", batch_size, 1)
    if limit is not None:
        _utils.check_int("limit", limit, 1)
    if name in _PAPER_DATASETS:
        return _load_paper_dataset(name, batch_size, seed, data_dir, limit, download,
                                   options)
    if options:
        raise ValueError(f"{name!r} takes no further options. Received: {options}")
    spec = _DATASETS[name]
    fashion = functools.partial(fashion_mnist.load_fashion_mnist, data_dir, download)
    splits = spec.build(seed, fashion, limit)
    train = splits["train"]

    def carve(fraction):
        rows = _utils.heldout_split(len(tf.nest.flatten(train)[0]), fraction, seed)
        kept, held = (tf.nest.map_structure(lambda a: a[r], train) for r in rows)
        return ordering.epoch_shuffled(kept, batch_size, seed), _to_dataset(held, batch_size)

    return MultiTaskData(
        train=ordering.epoch_shuffled(train, batch_size, seed),
        validation=_to_dataset(splits["validation"], batch_size),
        test=_to_dataset(splits["test"], batch_size),
        task_classes=dict(spec.task_classes),
        jointly_labelled=spec.jointly_labelled,
        tasks=spec.tasks,
        carve=carve,
    )


def task_counts(dataset, num_tasks):
    """Counts the examples of each task in a dataset not jointly labelled.

    Losses of such datasets are often weighted by the share `N_t / N` of
    each task. This makes one pass over `dataset`, keeping only task ids.

    Args:
        dataset: A `tf.data.Dataset` of `(image, task_id, label)` elements,
            batched or not.
        num_tasks: Number of tasks; task ids must lie in `[0, num_tasks)`.

    Returns:
        An int64 numpy array of shape `(num_tasks,)`: the number of examples
        of each task.
    """
    _utils.check_int("num_tasks", num_tasks, 1)
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) != 3:
        raise ValueError(
            "Expected `dataset` elements `(image, task_id, label)`. "
            f"Received elements of structure {spec}."
        )
    task_ids = dataset.map(
        lambda image, task_id, label: tf.reshape(task_id, [-1])
    )
    ids = np.concatenate([np.zeros(0, np.int64), *task_ids.as_numpy_iterator()])
    if ids.size and not 0 <= ids.min() <= ids.max() < num_tasks:
        raise ValueError(
            f"Expected task ids in [0, {num_tasks}) for num_tasks={num_tasks}. "
            f"Received task ids in [{ids.min()}, {ids.max()}]."
        )
    return np.bincount(ids, minlength=num_tasks).astype(np.int64)
