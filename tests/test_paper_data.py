"""Loaders of the papers' datasets: NYUv2 and Cityscapes (with Auto-Lambda's
part labels) from MTAN's `.npy` layout (generated here, tiny),
Multi-CIFAR100 and CelebA through tfds's mock data (nothing is
downloaded)."""

import importlib
import os
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_mtl import tasks as task_specs
from tf_mtl.data import celeba
from tf_mtl.data import multi_cifar100
from tf_mtl.data import nyuv2_cityscapes
from tf_mtl.data import ordering

HEIGHT, WIDTH = 8, 12


def _epoch(dataset, epoch):
    """The batches `dataset` yields in `epoch`, as numpy."""
    [order] = ordering.order_callbacks(dataset)
    order.epoch_variable.assign(epoch)
    return list(dataset.as_numpy_iterator())


def _concat(batches):
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts), *batches)


# --- NYUv2 and Cityscapes ---------------------------------------------------


def _write_split(root, split, count, rng, num_classes, normals, depth_shape,
                 part_classes=None):
    """Writes `count` random examples in MTAN's layout, with part labels of
    `part_classes` classes if set; returns them."""
    examples = []
    for index in range(count):
        known = rng.random((HEIGHT, WIDTH)) > 0.2
        example = {
            "image": rng.random((HEIGHT, WIDTH, 3)).astype(np.float32),
            # MTAN stores class ids as floats.
            "label": rng.integers(-1, num_classes, (HEIGHT, WIDTH)).astype(np.float64),
            "depth": (rng.random((HEIGHT, WIDTH)) * known).astype(np.float32)
            .reshape(depth_shape),
        }
        if normals:
            normal = rng.normal(size=(HEIGHT, WIDTH, 3))
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            example["normal"] = (normal * known[..., None]).astype(np.float32)
        if part_classes:
            example["part_seg"] = rng.integers(-1, part_classes, (HEIGHT, WIDTH))
        for folder, array in example.items():
            os.makedirs(root / split / folder, exist_ok=True)
            np.save(root / split / folder / f"{index}.npy", array)
        examples.append(example)
    return examples


@pytest.fixture
def nyuv2(tmp_path):
    """`(data_dir, {split: [example dict]})` of a tiny NYUv2."""
    rng = np.random.default_rng(0)
    splits = {
        split: _write_split(tmp_path, split, count, rng, 13, True, (HEIGHT, WIDTH))
        for split, count in (("train", 5), ("val", 3))
    }
    return tmp_path, splits


def _check_matches_files(images, labels, examples, indices):
    """The batches hold `examples[i]` for i in `indices`, in that order."""
    np.testing.assert_array_equal(images, [examples[i]["image"] for i in indices])
    np.testing.assert_array_equal(
        labels["semantic"], [examples[i]["label"].astype(np.int32) for i in indices])
    np.testing.assert_array_equal(
        labels["depth"], [examples[i]["depth"].reshape(HEIGHT, WIDTH, 1) for i in indices])
    if "normal" in examples[0]:
        np.testing.assert_array_equal(labels["normal"], [examples[i]["normal"] for i in indices])
    if "part_seg" in examples[0]:
        np.testing.assert_array_equal(labels["part"], [examples[i]["part_seg"] for i in indices])
    assert len(labels) == len(examples[0]) - 1


def _indices(images, examples):
    """The index of the example of each image."""
    keys = [e["image"][0, 0, 0] for e in examples]
    return [keys.index(image[0, 0, 0]) for image in images]


def test_nyuv2_splits_tasks_and_values(nyuv2):
    data_dir, files = nyuv2
    data = nyuv2_cityscapes.load_nyuv2(data_dir, batch_size=2)

    assert data.jointly_labelled
    assert data.task_classes == {"semantic": 13, "depth": None, "normal": None}
    semantic, depth, normal = data.tasks
    assert semantic.get_config() == task_specs.segmentation(
        "semantic", 13, (HEIGHT, WIDTH), ignore_label=-1).get_config()
    assert (semantic.label_shape, semantic.classes, semantic.ignore_label) == (
        (HEIGHT, WIDTH), 13, -1)
    assert depth.get_config() == task_specs.depth("depth", (HEIGHT, WIDTH)).get_config()
    assert depth.label_shape == (HEIGHT, WIDTH, 1)
    assert normal.get_config() == task_specs.surface_normals(
        "normal", (HEIGHT, WIDTH)).get_config()
    assert data.train.element_spec == (
        tf.TensorSpec((None, HEIGHT, WIDTH, 3), tf.float32),
        {"semantic": tf.TensorSpec((None, HEIGHT, WIDTH), tf.int32),
         "depth": tf.TensorSpec((None, HEIGHT, WIDTH, 1), tf.float32),
         "normal": tf.TensorSpec((None, HEIGHT, WIDTH, 3), tf.float32)})

    # `val` is both held-out splits, read in file order.
    assert data.validation is data.test
    batches = list(data.test.as_numpy_iterator())
    assert [len(images) for images, _ in batches] == [2, 1]
    _check_matches_files(*_concat(batches), files["val"], [0, 1, 2])

    # An epoch reads every training example once, its labels with its image.
    assert int(data.train.cardinality()) == 3
    images, labels = _concat(_epoch(data.train, 0))
    indices = _indices(images, files["train"])
    assert sorted(indices) == [0, 1, 2, 3, 4]
    _check_matches_files(images, labels, files["train"], indices)


def test_nyuv2_reads_without_parsing_headers_in_the_map_threads(nyuv2, monkeypatch):
    """NumPy parses a `.npy` header with `ast`, which races across tf.data's map
    threads in CPython 3.11: headers are parsed once, while loading."""
    data_dir, files = nyuv2
    np.save(data_dir / "val" / "image" / "0.npy", np.asfortranarray(files["val"][0]["image"]))
    data = nyuv2_cityscapes.load_nyuv2(data_dir, batch_size=2)

    def refuse(*args, **kwargs):
        raise AssertionError("np.load called while reading batches")

    monkeypatch.setattr(np, "load", refuse)
    _check_matches_files(*_concat(list(data.test.as_numpy_iterator())), files["val"], [0, 1, 2])


def test_nyuv2_training_order_is_a_function_of_seed_and_epoch(nyuv2):
    data_dir, files = nyuv2

    def order(data, epoch):
        return _indices(_concat(_epoch(data.train, epoch))[0], files["train"])

    first = nyuv2_cityscapes.load_nyuv2(data_dir, batch_size=2, seed=3)
    resumed = nyuv2_cityscapes.load_nyuv2(data_dir, batch_size=2, seed=3)
    assert order(first, 0) != order(first, 1)
    assert order(resumed, 1) == order(first, 1)
    assert order(resumed, 0) == order(first, 0)
    assert order(first, 0) == list(
        tf.random.experimental.stateless_shuffle(tf.range(5, dtype=tf.int64), seed=[3, 0]))


def test_nyuv2_holds_out_training_images_never_the_validation_ones(nyuv2):
    # Its validation split is its test split: bi-level parts fit on
    # training images held out (MultiTaskData.with_heldout).
    data_dir, files = nyuv2
    data = nyuv2_cityscapes.load_nyuv2(data_dir, batch_size=2, seed=1).with_heldout(0.4)
    trained = _indices(_concat(_epoch(data.train, 0))[0], files["train"])
    held = _indices(_concat(list(data.heldout.as_numpy_iterator()))[0], files["train"])
    assert len(held) == 2 and sorted(trained + held) == list(range(5))
    again = nyuv2_cityscapes.load_nyuv2(data_dir, batch_size=2, seed=1).with_heldout(0.4)
    assert _indices(_concat(list(again.heldout.as_numpy_iterator()))[0], files["train"]) == held


def test_nyuv2_limit_keeps_the_first_examples(nyuv2):
    data_dir, files = nyuv2
    data = nyuv2_cityscapes.load_nyuv2(data_dir, batch_size=4, limit=2)
    _check_matches_files(*_concat(list(data.test.as_numpy_iterator())), files["val"], [0, 1])
    images, _ = _concat(_epoch(data.train, 0))
    assert sorted(_indices(images, files["train"])) == [0, 1]


def test_cityscapes_19_classes_and_depth_with_a_channel(tmp_path):
    rng = np.random.default_rng(1)
    files = {split: _write_split(tmp_path, split, count, rng, 19, False, (HEIGHT, WIDTH, 1))
             for split, count in (("train", 3), ("val", 2))}
    data = nyuv2_cityscapes.load_cityscapes(tmp_path, batch_size=2, num_classes=19)
    assert data.task_classes == {"semantic": 19, "depth": None}
    assert [t.config["factory"] for t in data.tasks] == ["segmentation", "depth"]
    _check_matches_files(*_concat(list(data.test.as_numpy_iterator())), files["val"], [0, 1])

    # The same files hold class ids up to 18, too many for 7 classes.
    with pytest.raises(ValueError, match=r"label/\d\.npy' holds the label \d+\.0; "
                                         r"expected class ids 0\.\.6"):
        nyuv2_cityscapes.load_cityscapes(tmp_path)
    with pytest.raises(ValueError, match=r"num_classes=8"):
        nyuv2_cityscapes.load_cityscapes(tmp_path, num_classes=8)


@pytest.fixture
def cityscapes_parts(tmp_path):
    """`(data_dir, {split: [example dict]})` of a tiny Cityscapes in
    Auto-Lambda's setting: 10 semantic and 10 part classes, disparity."""
    rng = np.random.default_rng(2)
    splits = {
        split: _write_split(tmp_path, split, count, rng, 10, False, (HEIGHT, WIDTH),
                            part_classes=10)
        for split, count in (("train", 5), ("val", 3))
    }
    return tmp_path, splits


def test_cityscapes_part_task_shapes_values_and_specs(cityscapes_parts):
    data_dir, files = cityscapes_parts
    # part_seg=None finds the folders of both splits.
    data = nyuv2_cityscapes.load_cityscapes(data_dir, batch_size=2, num_classes=10)

    assert data.jointly_labelled
    assert data.task_classes == {"semantic": 10, "depth": None, "part": 10}
    semantic, depth, part = data.tasks
    assert semantic.get_config() == task_specs.segmentation(
        "semantic", 10, (HEIGHT, WIDTH), ignore_label=-1).get_config()
    assert depth.get_config() == task_specs.depth("depth", (HEIGHT, WIDTH)).get_config()
    assert part.get_config() == task_specs.segmentation(
        "part", 10, (HEIGHT, WIDTH), ignore_label=-1).get_config()
    assert (part.label_shape, part.classes, part.ignore_label) == ((HEIGHT, WIDTH), 10, -1)
    assert data.train.element_spec == (
        tf.TensorSpec((None, HEIGHT, WIDTH, 3), tf.float32),
        {"semantic": tf.TensorSpec((None, HEIGHT, WIDTH), tf.int32),
         "depth": tf.TensorSpec((None, HEIGHT, WIDTH, 1), tf.float32),
         "part": tf.TensorSpec((None, HEIGHT, WIDTH), tf.int32)})

    assert data.validation is data.test
    batches = list(data.test.as_numpy_iterator())
    assert [len(images) for images, _ in batches] == [2, 1]
    _check_matches_files(*_concat(batches), files["val"], [0, 1, 2])
    images, labels = _concat(_epoch(data.train, 0))
    indices = _indices(images, files["train"])
    assert sorted(indices) == [0, 1, 2, 3, 4]
    _check_matches_files(images, labels, files["train"], indices)
    # Every part class and the ignore label occur, read as stored.
    assert set(np.unique(labels["part"])) == set(range(-1, 10))

    # `limit` cuts the part folders with the others.
    limited = nyuv2_cityscapes.load_cityscapes(data_dir, batch_size=4, limit=2,
                                               num_classes=10, part_seg=True)
    _check_matches_files(*_concat(list(limited.test.as_numpy_iterator())),
                         files["val"], [0, 1])


def test_cityscapes_part_seg_argument(cityscapes_parts):
    data_dir, files = cityscapes_parts
    ignored = nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=10, part_seg=False)
    assert ignored.task_classes == {"semantic": 10, "depth": None}
    assert set(ignored.train.element_spec[1]) == {"semantic", "depth"}

    more = nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=19, part_classes=12)
    assert more.task_classes == {"semantic": 19, "depth": None, "part": 12}
    assert more.tasks[-1].get_config() == task_specs.segmentation(
        "part", 12, (HEIGHT, WIDTH), ignore_label=-1).get_config()

    for value in ("yes", 1, 0):
        with pytest.raises(ValueError, match=f"Received: part_seg={value!r}"):
            nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=10, part_seg=value)
    for value in (1, 10.0, True):
        with pytest.raises(ValueError, match=f"part_classes={value!r}"):
            nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=10, part_classes=value)


def test_cityscapes_missing_part_folder(cityscapes_parts):
    data_dir, _ = cityscapes_parts
    shutil.rmtree(data_dir / "val/part_seg")
    # Found in one split only: an incomplete copy, not a data set without parts.
    with pytest.raises(FileNotFoundError) as raised:
        nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=10)
    message = str(raised.value)
    assert f"Missing folder {str(data_dir / 'val/part_seg')!r}" in message
    assert str(data_dir / "train/part_seg") in message and "part_seg=False" in message

    shutil.rmtree(data_dir / "train/part_seg")
    without = nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=10)
    assert without.task_classes == {"semantic": 10, "depth": None}
    with pytest.raises(FileNotFoundError) as raised:
        nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=10, part_seg=True)
    message = str(raised.value)
    assert f"Missing folder {str(data_dir / 'train/part_seg')!r}" in message
    assert "part_seg=True requires part labels in both splits" in message

    # A missing split is still named as such, not as a missing part folder.
    os.mkdir(data_dir / "train/part_seg")
    for index in range(5):
        np.save(data_dir / f"train/part_seg/{index}.npy", _zeros(HEIGHT, WIDTH))
    shutil.rmtree(data_dir / "val")
    with pytest.raises(FileNotFoundError, match="No `val` split"):
        nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=10, part_seg=True)


def test_cityscapes_10_classes(cityscapes_parts):
    data_dir, _ = cityscapes_parts
    data = nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=19, part_seg=False)
    assert data.tasks[0].classes == 19
    np.save(data_dir / "train/label/1.npy", np.full((HEIGHT, WIDTH), 10.0))
    with pytest.raises(ValueError) as raised:
        nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=10)
    assert str(raised.value).startswith(
        f"{str(data_dir / 'train/label/1.npy')!r} holds the label 10.0; "
        "expected class ids 0..9, or -1 where unlabelled.")


def _saving(path, array):
    """A change of the tiny NYUv2: `array` saved as its file `path`."""
    return lambda root: np.save(root / path, array)


def _emptying(path):
    def empty(root):
        shutil.rmtree(root / path)
        os.mkdir(root / path)
    return empty


def _zeros(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


# Case: (change to the tiny NYUv2, error, the path its message names, a
# pattern of the message).
_BAD_LAYOUTS = {
    "no data_dir": (shutil.rmtree, FileNotFoundError, "", "not a folder"),
    "no split": (lambda root: shutil.rmtree(root / "val"),
                 FileNotFoundError, "val", "No `val` split"),
    "no task folder": (lambda root: shutil.rmtree(root / "train/normal"),
                       FileNotFoundError, "train/normal", "Missing folder"),
    "empty folder": (_emptying("val/depth"), FileNotFoundError, "val/depth", "No file 0.npy"),
    "index gap": (_saving("train/depth/6.npy", _zeros(HEIGHT, WIDTH)),
                  ValueError, "train/depth", "5.npy is missing while 6.npy exists"),
    "fewer files": (lambda root: os.remove(root / "val/label/2.npy"),
                    ValueError, "val/label", "holds 2 examples"),
    "leading zero": (_saving("val/image/01.npy", _zeros(HEIGHT, WIDTH, 3)),
                     ValueError, "val/image/01.npy", "no leading zeros"),
    "not an array": (lambda root: (root / "train/depth/3.npy").write_text("x"),
                     ValueError, "train/depth/3.npy", "not a readable .npy"),
    "image channels": (_saving("train/image/0.npy", _zeros(HEIGHT, WIDTH, 4)),
                       ValueError, "train/image/0.npy", r"\(8, 12, 4\); expected an image"),
    "image size": (_saving("val/image/1.npy", _zeros(HEIGHT, WIDTH + 1, 3)),
                   ValueError, "val/image/1.npy", r"\(8, 13, 3\); expected \(8, 12, 3\)"),
    "label rank": (_saving("train/label/2.npy", _zeros(HEIGHT, WIDTH, 1)),
                   ValueError, "train/label/2.npy", r"expected \(8, 12\):"),
    "normal channels": (_saving("val/normal/0.npy", _zeros(HEIGHT, WIDTH, 2)),
                        ValueError, "val/normal/0.npy", r"expected \(8, 12, 3\)"),
    "depth rank": (_saving("train/depth/1.npy", _zeros(HEIGHT, WIDTH, 2)),
                   ValueError, "train/depth/1.npy", r"expected \(8, 12\) or \(8, 12, 1\)"),
    "uint8 image": (_saving("val/image/2.npy", _zeros(HEIGHT, WIDTH, 3, dtype=np.uint8)),
                    ValueError, "val/image/2.npy", "uint8 values; expected floats"),
    "label too large": (_saving("val/label/0.npy", np.full((HEIGHT, WIDTH), 13.0)),
                        ValueError, "val/label/0.npy", "label 13.0; expected class ids 0..12"),
    "label below -1": (_saving("train/label/3.npy", np.full((HEIGHT, WIDTH), -2)),
                       ValueError, "train/label/3.npy", "label -2;"),
    "fractional label": (_saving("train/label/4.npy", np.full((HEIGHT, WIDTH), 2.5)),
                         ValueError, "train/label/4.npy", "label 2.5;"),
}


@pytest.mark.parametrize("case", sorted(_BAD_LAYOUTS))
def test_nyuv2_bad_layout_is_named(nyuv2, case):
    data_dir, _ = nyuv2
    change, error, path, message = _BAD_LAYOUTS[case]
    change(data_dir)
    with pytest.raises(error) as raised:
        nyuv2_cityscapes.load_nyuv2(data_dir)
    assert str(data_dir / path) in str(raised.value)
    assert re.search(message, str(raised.value))


# Case: (file of the tiny Cityscapes with parts, the array saved there, a
# pattern of the ValueError's message).
_BAD_PARTS = {
    "part too large": ("val/part_seg/2.npy", np.full((HEIGHT, WIDTH), 10),
                       "holds the label 10; expected class ids 0..9, or -1"),
    "part below -1": ("train/part_seg/0.npy", np.full((HEIGHT, WIDTH), -3.0),
                      "holds the label -3.0;"),
    "fractional part": ("train/part_seg/4.npy", np.full((HEIGHT, WIDTH), 0.5),
                        "holds the label 0.5;"),
    "part rank": ("val/part_seg/1.npy", _zeros(HEIGHT, WIDTH, 1, dtype=np.int64),
                  r"\(8, 12, 1\); expected \(8, 12\):"),
    "part dtype": ("val/part_seg/0.npy", _zeros(HEIGHT, WIDTH, dtype=bool),
                   "bool values; expected numbers"),
    # Auto-Lambda's -1 for unknown disparity, a target for the depth loss.
    "negative disparity": ("val/depth/1.npy", np.full((HEIGHT, WIDTH), -1.0, np.float32),
                           "holds the disparity -1.0; expected values >= 0, 0 where unknown"),
}


@pytest.mark.parametrize("case", sorted(_BAD_PARTS))
def test_cityscapes_bad_part_labels_and_disparity_are_named(cityscapes_parts, case):
    data_dir, _ = cityscapes_parts
    path, array, message = _BAD_PARTS[case]
    np.save(data_dir / path, array)
    with pytest.raises(ValueError) as raised:
        nyuv2_cityscapes.load_cityscapes(data_dir, num_classes=10)
    assert str(raised.value).startswith(repr(str(data_dir / path)))
    assert re.search(message, str(raised.value))


# --- Multi-CIFAR100 -------------------------------------------------------

# CIFAR-100's superclasses and their classes (the dataset's documentation).
_CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
# Fine labels number the class names in alphabetical order.
_FINE_NAMES = sorted(n for names in _CIFAR100_SUPERCLASSES.values() for n in names)


def _hand_task(fine):
    """(task id, in-task label) of a fine label, from the class names."""
    name = _FINE_NAMES[fine]
    for task, names in enumerate(_CIFAR100_SUPERCLASSES.values()):
        if name in names:
            indices = sorted(_FINE_NAMES.index(n) for n in names)
            return task, indices.index(fine)
    raise AssertionError(name)


def _standardised(images):
    return (images / 255.0 - np.array(multi_cifar100.CIFAR100_MEAN)) / np.array(
        multi_cifar100.CIFAR100_STD)


def _raw_cifar(split):
    examples = list(tfds.load("cifar100", split=split).as_numpy_iterator())
    return (np.stack([e["image"] for e in examples]),
            np.array([e["label"] for e in examples]))


def test_multi_cifar100_tasks_and_test_split():
    assert multi_cifar100.TASK_NAMES == tuple(
        name.replace("-", "_") for name in _CIFAR100_SUPERCLASSES)
    assert all(name.isidentifier() for name in multi_cifar100.TASK_NAMES)
    hand = np.array([_hand_task(fine) for fine in range(100)])
    np.testing.assert_array_equal(multi_cifar100.FINE_TO_COARSE, hand[:, 0])
    np.testing.assert_array_equal(multi_cifar100.FINE_TO_LABEL, hand[:, 1])

    with tfds.testing.mock_data(num_examples=20):
        data = multi_cifar100.load_multi_cifar100(batch_size=8)
        images, fine = _raw_cifar("test")
    assert not data.jointly_labelled
    assert data.task_classes == {name: 5 for name in multi_cifar100.TASK_NAMES}
    assert [t.config["factory"] for t in data.tasks] == ["classification"] * 20
    assert data.train.element_spec == (
        tf.TensorSpec((None, 32, 32, 3), tf.float32),
        tf.TensorSpec((None,), tf.int32), tf.TensorSpec((None,), tf.int32))
    assert data.validation is data.test
    x, task_ids, labels = _concat(list(data.test.as_numpy_iterator()))
    expected = np.array([_hand_task(f) for f in fine])
    np.testing.assert_array_equal(task_ids, expected[:, 0])
    np.testing.assert_array_equal(labels, expected[:, 1])
    np.testing.assert_allclose(x, _standardised(images), atol=1e-5)


def _crops_and_flips(image):
    """The 162 images RandomCrop(32, padding=4) and a flip can make."""
    padded = np.pad(image, [(4, 4), (4, 4), (0, 0)])
    crops = np.stack([padded[i:i + 32, j:j + 32] for i in range(9) for j in range(9)])
    return np.concatenate([crops, crops[:, :, ::-1]])


def test_multi_cifar100_augmentation_is_a_function_of_seed_and_epoch():
    with tfds.testing.mock_data(num_examples=12):
        first = multi_cifar100.load_multi_cifar100(batch_size=5, seed=1)
        resumed = multi_cifar100.load_multi_cifar100(batch_size=5, seed=1)
        images, fine = _raw_cifar("train")
    epochs = [_concat(_epoch(first.train, epoch)) for epoch in (0, 1)]
    for epoch, batches in enumerate(epochs):
        again = _concat(_epoch(resumed.train, epoch))
        for part, same in zip(batches, again):
            np.testing.assert_array_equal(part, same)
    assert not np.array_equal(epochs[0][0], epochs[1][0])

    # Every example once per epoch, cropped and flipped, with its task and label.
    candidates = np.stack([_crops_and_flips(image) for image in images])
    augmentations = []
    for x, task_ids, labels in epochs:
        pixels = np.round((x * multi_cifar100.CIFAR100_STD + multi_cifar100.CIFAR100_MEAN)
                          * 255).astype(np.uint8)
        matches = [np.argwhere((candidates == p).all(axis=(2, 3, 4)))[0] for p in pixels]
        sources = [source for source, _ in matches]
        assert sorted(sources) == list(range(len(images)))
        np.testing.assert_array_equal(
            np.stack([task_ids, labels], 1), [_hand_task(fine[s]) for s in sources])
        augmentations += [augmentation for _, augmentation in matches]
    # Both flipped (>= 81) and unflipped crops, not all centred (40, 121).
    assert min(augmentations) < 81 <= max(augmentations)
    assert set(augmentations) - {40, 121}


# --- CelebA -------------------------------------------------------------------

# The reference code's `task_groups` (Maximum Roaming, celeba/train_MR.py):
# indices into CelebA's official list of 40 attributes.
_REFERENCE_GROUPS = [
    [2, 10, 13, 14, 18, 20, 25, 26, 39], [3, 15, 23, 1, 12],
    [4, 5, 8, 9, 11, 17, 28, 32, 33], [6, 21, 31, 36], [7, 27],
    [0, 16, 22, 24, 30], [19, 29], [34, 35, 37, 38],
]


def test_celeba_groups_are_maximum_roamings():
    official = importlib.import_module(tfds.builder_cls("celeb_a").__module__).ATTR_HEADINGS
    assert list(celeba.GROUPS) == ["global", "eyes", "hair", "mouth", "nose", "beard",
                                   "cheeks", "wearings"]
    assert [list(group) for group in celeba.GROUPS.values()] == [
        [official[i] for i in indices] for indices in _REFERENCE_GROUPS]
    assert sorted(n for group in celeba.GROUPS.values() for n in group) == sorted(official)


def test_celeba_splits_labels_and_images():
    with tfds.testing.mock_data(num_examples=6):
        data = celeba.load_celeba(batch_size=4, image_size=(20, 16))
        raw = list(tfds.load("celeb_a", split="validation", decoders={
            "image": tfds.decode.SkipDecoding()}).as_numpy_iterator())
        decoded = [tfds.builder("celeb_a").info.features["image"].decode_example(e["image"])
                   for e in raw]
    assert data.jointly_labelled
    assert data.task_classes == {name: None for name in celeba.GROUPS}
    assert [(t.name, t.label_shape, t.classes, t.config["factory"]) for t in data.tasks] == [
        (name, (len(group),), None, "binary_attributes") for name, group in celeba.GROUPS.items()]
    assert data.train.element_spec == (
        tf.TensorSpec((None, 20, 16, 3), tf.float32),
        {name: tf.TensorSpec((None, len(group)), tf.float32)
         for name, group in celeba.GROUPS.items()})

    images, labels = _concat(list(data.validation.as_numpy_iterator()))
    for name, group in celeba.GROUPS.items():
        np.testing.assert_array_equal(
            labels[name], [[float(e["attributes"][a]) for a in group] for e in raw])
    # Mock JPEGs are random pixels: the check is of order, scale and resizing.
    expected = tf.image.resize(np.stack(decoded) / 255.0, (20, 16), antialias=True)
    np.testing.assert_allclose(images, expected, atol=1e-5)


def test_celeba_training_order_is_a_function_of_seed_and_epoch():
    with tfds.testing.mock_data(num_examples=7):
        first = celeba.load_celeba(batch_size=3, seed=2, image_size=(8, 8), shuffle_window=3)
        resumed = celeba.load_celeba(batch_size=3, seed=2, image_size=(8, 8), shuffle_window=3)
        raw = list(tfds.load("celeb_a", split="train").as_numpy_iterator())
        keys = [tuple(e["attributes"][a] for group in celeba.GROUPS.values() for a in group)
                for e in raw]
        assert len(set(keys)) == len(keys)  # the attributes identify the mock examples

        def order(data, epoch):
            _, labels = _concat(_epoch(data.train, epoch))
            rows = np.concatenate(list(labels.values()), axis=1).astype(bool)
            return [keys.index(tuple(row)) for row in rows]

        assert int(first.train.cardinality()) == 3
        orders = [order(first, epoch) for epoch in (0, 1)]
        assert order(resumed, 1) == orders[1]
    # Each epoch reads every example once, the two in different orders.
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(7))
    assert orders[0] != orders[1]


def test_binary_attributes_task():
    task = task_specs.binary_attributes("mouth", 2)
    assert task_specs.from_config(task.get_config()).label_shape == (2,)
    labels = np.array([[1.0, 1.0], [0.0, 1.0]], np.float32)
    logits = np.array([[1.0, -1.0], [-2.0, 3.0]], np.float32)
    expected = np.mean(np.maximum(logits, 0) - logits * labels
                       + np.log1p(np.exp(-np.abs(logits))), axis=1)
    np.testing.assert_allclose(task.loss(labels, logits), expected, rtol=1e-6)
    [accuracy] = task.metrics
    metric = accuracy.build("mouth_accuracy")
    metric.update_state(labels, logits)
    assert float(metric.result()) == 0.75  # 3 of the 4 attributes' signs are right
    assert isinstance(task.head(), keras.layers.Dense)
