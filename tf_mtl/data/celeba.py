"""CelebA as 8 tasks of facial attributes (Maximum Roaming's setting).

CelebA (Liu et al., 2015) gives each of its 202,599 aligned face images 40
binary attributes. Maximum Roaming (Pascal et al., 2021: "Datasets",
Appendix B and its Table 5) groups them into 8 tasks of spatially or
semantically related attributes; a task predicts all its attributes, from
one linear layer, with the binary cross-entropy averaged over them. `GROUPS`
holds the groups, their attributes in the order of the reference code's
`task_groups` (github.com/lucaspascal/Maximum-Roaming-Mutli-Task-Learning,
celeba/train_*.py, which indexes the official attribute list; that order is
Table 5's). Each group is one `tasks.binary_attributes` task here, scored by the
accuracy over its attributes and examples. (The paper reports precision,
recall and F-score averaged over the 40 attributes.)

Data: TensorFlow Datasets' `celeb_a`, the aligned and cropped 218x178
images with the official partition, whose train, validation and test splits
(162,770 / 19,867 / 19,962 images) are the splits here. The paper reports
results on the validation split. Images are resized to `image_size`, by
default 64x64 as Appendix B states ("all input images are resized to
(64 x 64 x 3)"; the reference code's `transforms.Resize(64)` keeps the
aspect ratio instead, giving 78x64: pass `image_size=(78, 64)` for it),
bilinearly with antialiasing, and scaled to [0, 1], as the reference code's
`ToTensor`: no normalisation and no augmentation, as there. Labels are
float32 0/1.

Training order. The training split is streamed from the tfds files, not
held in memory (2 GB even as 64x64 uint8 images). The reference
code reshuffles the whole split every epoch; a stream cannot be permuted at
random, so epoch e reads it thus, every draw a stateless random function of
(seed, e): the split in its tfds file order (fixed; tfds shuffled the
examples when it wrote the files) is rotated by a random offset (its first
`offset` examples, skipped still encoded, move to its end), cut into
windows of `shuffle_window` consecutive examples, and each window is
permuted at random. So every epoch sees every example once, in an order
that is a function of (seed, e) and the files alone: a resumed run reads
the batches of an uninterrupted one (`ordering.per_epoch`). The windows act
as a shuffle buffer of that size; `Dataset.shuffle` itself cannot promise
this, its seeds depending on the iterators made before and the global
seed. A window holds still-encoded JPEGs (about 7 kB each), so the default
20,000 costs about 140 MB; a split of at most `shuffle_window` examples is
permuted whole.
"""

import functools

import tensorflow as tf
import tensorflow_datasets as tfds

from tf_mtl import tasks as task_specs
from tf_mtl.data import _utils
from tf_mtl.data import ordering
from tf_mtl.data.base import MultiTaskData

# Each task's tfds attribute names (Maximum Roaming, Table 5).
GROUPS = {
    "global": ("Attractive", "Blurry", "Chubby", "Double_Chin", "Heavy_Makeup",
               "Male", "Oval_Face", "Pale_Skin", "Young"),
    "eyes": ("Bags_Under_Eyes", "Eyeglasses", "Narrow_Eyes", "Arched_Eyebrows",
             "Bushy_Eyebrows"),
    "hair": ("Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair",
             "Gray_Hair", "Receding_Hairline", "Straight_Hair", "Wavy_Hair"),
    "mouth": ("Big_Lips", "Mouth_Slightly_Open", "Smiling", "Wearing_Lipstick"),
    "nose": ("Big_Nose", "Pointy_Nose"),
    "beard": ("5_o_Clock_Shadow", "Goatee", "Mustache", "No_Beard", "Sideburns"),
    "cheeks": ("High_Cheekbones", "Rosy_Cheeks"),
    "wearings": ("Wearing_Earrings", "Wearing_Hat", "Wearing_Necklace",
                 "Wearing_Necktie"),
}

_ATTRIBUTES = tuple(name for group in GROUPS.values() for name in group)
_GROUP_SIZES = [len(group) for group in GROUPS.values()]


def load_celeba(data_dir=None, batch_size=256, seed=0, limit=None, download=False,
                image_size=(64, 64), shuffle_window=20_000):
    """Loads CelebA's 8 attribute groups from TensorFlow Datasets' `celeb_a`.

    Args:
        data_dir: tfds data folder (None: tfds's default, `~/tensorflow_datasets`).
        batch_size: Number of examples per batch (the paper's: 256).
        seed: Seed of the training order, which in epoch e is a function of
            (seed, e) alone.
        limit: If set, keeps the first `limit` examples of each split (in
            tfds's order).
        download: Whether tfds may download CelebA when it is not in
            `data_dir`.
        image_size: `(height, width)` the images are resized to.
        shuffle_window: Number of consecutive training examples permuted
            together (see the module docstring).

    Returns:
        A jointly labelled `MultiTaskData` with elements
        `(image, {group: labels})`: float32 images in [0, 1] of shape
        `(batch, *image_size, 3)` and, for each group of `GROUPS`, float32
        0/1 labels `(batch, len(GROUPS[group]))`, its attributes in order.
        Its tasks are `tasks.binary_attributes(group, len(GROUPS[group]))`.
    """
    _utils.check_int("batch_size", batch_size, 1)
    if limit is not None:
        _utils.check_int("limit", limit, 1)
    _utils.check_int("shuffle_window", shuffle_window, 1)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(
            f"Expected `image_size` to be (height, width). Received: image_size={image_size!r}")
    for extent in image_size:
        _utils.check_int("image_size", extent, 1)
    image_size = tuple(image_size)
    splits = {split: _examples(split, data_dir, download, limit)
              for split in ("train", "validation", "test")}
    decode = functools.partial(_decode, image_size=image_size)
    return MultiTaskData(
        train=_train(splits["train"], decode, batch_size, seed, shuffle_window),
        validation=_in_order(splits["validation"], decode, batch_size),
        test=_in_order(splits["test"], decode, batch_size),
        task_classes={name: None for name in GROUPS},
        jointly_labelled=True,
        tasks=tuple(task_specs.binary_attributes(name, len(group)) for name, group in GROUPS.items()),
    )


def _examples(split, data_dir, download, limit):
    """`(JPEG bytes, bool attributes in GROUPS order)` of a split, in tfds's order."""
    dataset = tfds.load("celeb_a", split=split, data_dir=data_dir, download=download,
                        shuffle_files=False,
                        decoders={"image": tfds.decode.SkipDecoding()})
    dataset = dataset.map(lambda example: (
        example["image"],
        tf.stack([example["attributes"][name] for name in _ATTRIBUTES])))
    return dataset if limit is None else dataset.take(limit)


def _decode(jpeg, attributes, image_size):
    image = tf.image.convert_image_dtype(tf.io.decode_jpeg(jpeg, channels=3), tf.float32)
    image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
    labels = tf.split(tf.cast(attributes, tf.float32), _GROUP_SIZES)
    return image, dict(zip(GROUPS, labels))


def _in_order(examples, decode, batch_size):
    return (examples.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def _train(examples, decode, batch_size, seed, window):
    """Batches of `examples` in the rotated, windowed order of epoch e drawn
    from (seed, e) (see the module docstring)."""
    count = int(examples.cardinality())

    def epoch_examples(epoch):
        key = tf.stack([tf.constant(seed, tf.int64), epoch])
        offset_key, window_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        offset = tf.random.stateless_uniform(
            [], seed=offset_key, minval=0, maxval=count, dtype=tf.int64)
        rotated = examples.skip(offset).concatenate(examples.take(offset))
        return rotated.batch(window).enumerate().flat_map(
            lambda index, window_examples: _permuted(
                window_examples, tf.random.experimental.stateless_fold_in(window_key, index)))

    batches = -(-count // batch_size)
    return (ordering.per_epoch(epoch_examples)
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
            .apply(tf.data.experimental.assert_cardinality(batches))  # fit's steps
            .prefetch(tf.data.AUTOTUNE))


def _permuted(examples, key):
    """The examples of a batch, one by one, in a random order drawn from `key`."""
    size = tf.shape(examples[1], out_type=tf.int64)[0]
    order = tf.random.experimental.stateless_shuffle(tf.range(size), seed=key)
    return tf.data.Dataset.from_tensor_slices(
        tf.nest.map_structure(lambda a: tf.gather(a, order), examples))
