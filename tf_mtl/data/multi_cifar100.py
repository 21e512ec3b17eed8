"""Multi-CIFAR100: CIFAR-100 as 20 five-way classification tasks.

Every CIFAR-100 class (fine label) belongs to one of 20 superclasses (coarse
labels), five classes each. Task t is superclass t: its examples are the
images of its five classes, and an image's label within the task is the
rank of its fine label among those five (in increasing fine-label order,
which is the alphabetical order of the class names). Every image belongs to
one task: the data are not jointly labelled, elements are
`(image, task_id, label)`.

This is the setting of Auto-Lambda (Liu et al., 2022), which MPPS follows
("split into 20 sub-tasks following [36]"); what it does is read from its
code, github.com/lorenmt/auto-lambda:

* Tasks (`CIFAR100MTL`, create_dataset.py): the superclass of an image is
  CIFAR-100's official one, looked up from its fine label
  (`FINE_TO_COARSE`); the in-task label is
  `np.unique(fine_labels, return_inverse=True)[1]` within the superclass,
  the rank above. tfds's `coarse_label` agrees with the lookup on the real
  data; only the fine label is read here, as there.
* Splits (trainer_cifar.py): training on all 50,000 training images
  (2,500 per task); after each epoch, evaluation on the 10,000 test images
  (500 per task), reporting the best test accuracy. There is no validation
  split. Here `train` is CIFAR-100's training split, and `validation` and
  `test` are both its test split.
* Preprocessing (trainer_cifar.py): training images are padded by 4 black
  pixels on each side and cropped back to 32x32 at a random offset
  (torchvision `RandomCrop(32, padding=4)`), then flipped left-right with
  probability 1/2 (`RandomHorizontalFlip`). Every image is then scaled to
  [0, 1] and standardised per channel with Auto-Lambda's constants
  (`Normalize(CIFAR100_MEAN, CIFAR100_STD)`); test images are not
  augmented. Images are float32 `(32, 32, 3)`.

One difference: each Auto-Lambda step draws a batch of 32 images from every
task (640 in all); here a batch of `batch_size` is drawn from the pooled
training split, so a task has `batch_size / 20` images of a batch on
average (the tasks have equal sizes).

The order of the training split and the crops and flips of epoch e are
stateless random functions of (seed, e): a resumed run sees the images of
an uninterrupted one (`ordering.per_epoch`).
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_mtl.data import _utils
from tf_mtl.data import ordering
from tf_mtl.data.base import MultiTaskData

# CIFAR-100's superclasses, in coarse-label order (tfds's coarse label
# names, with '-' made '_' so that they are identifiers).
TASK_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers",
    "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores",
    "large_man_made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals",
    "non_insect_invertebrates", "people", "reptiles", "small_mammals",
    "trees", "vehicles_1", "vehicles_2",
)
TASK_NUM_CLASSES = {name: 5 for name in TASK_NAMES}

# The superclass of each fine label (Auto-Lambda's `coarse_labels`).
FINE_TO_COARSE = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
], np.int32)

# The rank of each fine label among the fine labels of its superclass.
FINE_TO_LABEL = np.array(
    [np.sum(FINE_TO_COARSE[:fine] == coarse) for fine, coarse in enumerate(FINE_TO_COARSE)],
    np.int32)

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

IMAGE_SIZE = 32
PAD = 4


def load_multi_cifar100(data_dir=None, batch_size=128, seed=0, limit=None,
                        download=False):
    """Loads Multi-CIFAR100 from TensorFlow Datasets' `cifar100`.

    Args:
        data_dir: tfds data folder (None: tfds's default, `~/tensorflow_datasets`).
        batch_size: Number of examples per batch.
        seed: Seed of the training order and augmentation, which in epoch e
            are functions of (seed, e) alone.
        limit: If set, keeps the first `limit` examples of each split (in
            tfds's order).
        download: Whether tfds may download CIFAR-100 when it is not in
            `data_dir`.

    Returns:
        A `MultiTaskData` not jointly labelled, with elements
        `(image, task_id, label)`: standardised float32 images
        `(batch, 32, 32, 3)`, int32 task ids in [0, 20) (indices into
        `TASK_NAMES`) and int32 labels in [0, 5). `train` is CIFAR-100's
        training split, augmented; `validation` and `test` are both its test
        split (Auto-Lambda's protocol, see the module docstring).
    """
    _utils.check_int("batch_size", batch_size, 1)
    if limit is not None:
        _utils.check_int("limit", limit, 1)
    train = _read_split("train", data_dir, download, limit)
    test = _test_dataset(*_read_split("test", data_dir, download, limit), batch_size)
    return MultiTaskData(
        train=_train_dataset(*train, batch_size, seed),
        validation=test,
        test=test,
        task_classes=dict(TASK_NUM_CLASSES),
        jointly_labelled=False,
    )


def _read_split(split, data_dir, download, limit):
    """`(uint8 images, task_ids, labels)` of a tfds split, in tfds's order."""
    dataset = tfds.load("cifar100", split=split, data_dir=data_dir,
                        download=download, shuffle_files=False)
    dataset = dataset.map(lambda example: (example["image"], example["label"]))
    if limit is not None:
        dataset = dataset.take(limit)
    batches = list(dataset.batch(10_000).as_numpy_iterator())
    images = np.concatenate([images for images, _ in batches])
    fine = np.concatenate([fine for _, fine in batches])
    return images, FINE_TO_COARSE[fine], FINE_TO_LABEL[fine]


def _standardise(images):
    images = tf.cast(images, tf.float32) / 255.0
    return (images - CIFAR100_MEAN) / CIFAR100_STD


def _test_dataset(images, task_ids, labels, batch_size):
    return (tf.data.Dataset.from_tensor_slices((images, task_ids, labels))
            .batch(batch_size)
            .map(lambda x, t, y: (_standardise(x), t, y))
            .prefetch(tf.data.AUTOTUNE))


def _train_dataset(images, task_ids, labels, batch_size, seed):
    count = len(labels)
    images, task_ids, labels = map(tf.convert_to_tensor, (images, task_ids, labels))

    def epoch_batches(epoch):
        key = tf.stack([tf.constant(seed, tf.int64), epoch])
        order_key, augment_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        order = tf.random.experimental.stateless_shuffle(tf.range(count), seed=order_key)
        # Row n: example n's crop offsets and flip in this epoch, whatever
        # the batch it falls in.
        draws = tf.random.stateless_uniform([count, 3], seed=augment_key)

        def gather(rows):
            augmented = _augment(tf.gather(images, rows), tf.gather(draws, rows))
            return (_standardise(augmented), tf.gather(task_ids, rows),
                    tf.gather(labels, rows))

        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size).map(gather)

    batches = -(-count // batch_size)
    return (ordering.per_epoch(epoch_batches)
            .apply(tf.data.experimental.assert_cardinality(batches))  # fit's steps
            .prefetch(tf.data.AUTOTUNE))


def _augment(images, draws):
    """Random crop of the images padded by `PAD` black pixels, and random
    flip; `draws` holds one row of three uniform [0, 1) draws per image."""
    padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
    offsets = tf.cast(draws[:, :2] * (2 * PAD + 1), tf.int32)
    window = tf.range(IMAGE_SIZE)
    rows = offsets[:, :1] + window
    columns = offsets[:, 1:] + window
    # Flipping a crop is reading its columns backwards.
    columns = tf.where(draws[:, 2:] < 0.5, tf.reverse(columns, [1]), columns)
    crops = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(crops, columns, axis=2, batch_dims=1)
