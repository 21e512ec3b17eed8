"""Tests of `tf_mtl.data`.

Most tests run on tiny arrays made here. The tests marked `real_data` read
the Fashion-MNIST files of Debian's `dataset-fashion-mnist` package and are
skipped where they are missing.
"""

import gzip
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import data
from tf_mtl.data import fashion_groups
from tf_mtl.data import fashion_mnist
from tf_mtl.data import multifashion
from tf_mtl.data import multifashion_texture
from tf_mtl.data import synthetic

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

IDX_TYPE_CODES = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path, array):
    """Writes `array` (uint8, big-endian int32 or float32) as an IDX file."""
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype], array.ndim])
    header += np.array(array.shape, ">u4").tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def has_real_data():
    return all(
        os.path.isfile(os.path.join(fashion_mnist.DEFAULT_DATA_DIR, name))
        or os.path.isfile(
            os.path.join(fashion_mnist.DEFAULT_DATA_DIR, name + ".gz")
        )
        for name in IDX_NAMES
    )


skip_without_real_data = pytest.mark.skipif(
    not has_real_data(),
    reason=f"No Fashion-MNIST files in {fashion_mnist.DEFAULT_DATA_DIR}.",
)


def constant_images(values):
    """Returns uint8 images (N, 28, 28), image k filled with `values[k]`."""
    values = np.asarray(values, np.uint8)
    return np.broadcast_to(values[:, None, None], (len(values), 28, 28))


# --- IDX files and load_fashion_mnist -------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["u1", ">i4"])
def test_read_idx_round_trip(tmp_path, suffix, dtype):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(dtype)
    path = tmp_path / f"array-idx3{suffix}"
    write_idx(path, array)

    result = fashion_mnist.read_idx(path)

    np.testing.assert_array_equal(result, array)
    assert result.dtype == np.dtype(dtype).newbyteorder("=")


def test_read_idx_rejects_bad_magic_number(tmp_path):
    path = tmp_path / "bad-idx1"
    path.write_bytes(b"\x01\x00\x08\x01" + bytes(8))

    with pytest.raises(ValueError, match="magic number.*'01000801'"):
        fashion_mnist.read_idx(path)


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "short-idx1"
    write_idx(path, np.arange(5, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-1])

    with pytest.raises(ValueError, match="truncated file of 12 bytes"):
        fashion_mnist.read_idx(path)


def test_load_fashion_mnist_reads_gz_and_plain_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(256, size=(7, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(10, size=7),
        "t10k-images-idx3-ubyte": rng.integers(256, size=(3, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(10, size=3),
    }
    for name, array in arrays.items():
        write_idx(tmp_path / name, array.astype(np.uint8))

    (x_train, y_train), (x_test, y_test) = data.load_fashion_mnist(tmp_path)

    expected = list(arrays.values())
    for result, array, dtype in zip(
        (x_train, y_train, x_test, y_test), expected, ("u1", "i8") * 2
    ):
        np.testing.assert_array_equal(result, array)
        assert result.dtype == dtype


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.5, 300.0])
def test_float_idx_images_must_be_pixels(tmp_path, bad):
    images = np.zeros((3, 28, 28), ">f4")
    images[2, 5, 5] = bad
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: image 2 holds values "
                                         "that are not pixels"):
        data.load_fashion_mnist(tmp_path)
    images[2, 5, 5] = 255.0  # whole numbers in [0, 255] are read as pixels
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    assert data.load_fashion_mnist(tmp_path)[0][0][2, 5, 5] == 255


def test_missing_data_fails_at_once_and_names_the_ways_to_get_it(tmp_path, monkeypatch):
    # No download unless asked for: tensorflow_datasets is not even imported.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        data.load("multifashion", data_dir=str(missing))
    message = str(error.value)
    assert f"{missing} does not exist" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data_dir=" in message and "--download" in message
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_fashion_mnist(tmp_path)  # a folder without the files


def test_failed_download_names_both_ways_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(FileNotFoundError) as error:
        data.load_fashion_mnist(tmp_path, download=True)
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "could not download" in message


def test_load_fashion_mnist_downloads_from_tfds_when_asked(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    with tfds.testing.mock_data(
        num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        (x_train, y_train), (x_test, y_test) = data.load_fashion_mnist(tmp_path,
                                                                       download=True)

    for images, labels in ((x_train, y_train), (x_test, y_test)):
        assert images.shape == (5, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (5,) and labels.dtype == np.int64
        assert np.all((labels >= 0) & (labels < 10))


def test_split_fashion_mnist_is_a_seeded_partition():
    count = fashion_mnist.VALIDATION_SIZE + 50
    ids = np.arange(count)
    test = (np.arange(4), np.arange(4))

    splits = fashion_mnist.split_fashion_mnist(((ids, ids), test), seed=1)

    train, validation = splits["train"][0], splits["validation"][0]
    assert len(train) == 50
    assert len(validation) == fashion_mnist.VALIDATION_SIZE
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train, validation])), ids
    )
    np.testing.assert_array_equal(splits["train"][1], train)
    assert splits["test"] is test
    again = fashion_mnist.split_fashion_mnist(((ids, ids), test), seed=1)
    other = fashion_mnist.split_fashion_mnist(((ids, ids), test), seed=2)
    np.testing.assert_array_equal(again["train"][0], train)
    assert not np.array_equal(other["train"][0], train)


# --- MultiFashion ----------------------------------------------------------


def test_multifashion_places_left_item_top_left():
    values = np.arange(1, 21) * 12  # Image k is filled with values[k].
    labels = np.arange(20)[::-1]

    x, y = multifashion.make_multifashion(
        constant_images(values), labels, seed=0
    )

    assert x.shape == (20, 28, 28, 1) and x.dtype == np.float32
    assert set(y) == {"left", "right"}
    assert all(label.dtype == np.int32 for label in y.values())
    image_of = labels.tolist().index  # The image index of a class.
    # The top-left corner shows only the left item, the bottom-right corner
    # only the right one, and the overlap the brighter of the two.
    left_values = values[[image_of(c) for c in y["left"]]]
    right_values = values[[image_of(c) for c in y["right"]]]
    np.testing.assert_allclose(x[:, 0, 0, 0], left_values / 255, atol=1e-6)
    np.testing.assert_allclose(x[:, -1, -1, 0], right_values / 255, atol=1e-6)
    np.testing.assert_allclose(
        x[:, 14, 14, 0], np.maximum(left_values, right_values) / 255, atol=1e-6
    )
    np.testing.assert_array_equal(y["left"], labels)
    assert np.all(y["left"] != y["right"])  # Never paired with itself.


def test_multifashion_is_deterministic_given_a_seed():
    rng = np.random.default_rng(0)
    images = rng.integers(256, size=(20, 28, 28)).astype(np.uint8)
    labels = np.arange(20)

    x, y = multifashion.make_multifashion(images, labels, seed=3)
    x_again, y_again = multifashion.make_multifashion(images, labels, seed=3)
    x_other, y_other = multifashion.make_multifashion(images, labels, seed=4)

    np.testing.assert_array_equal(x, x_again)
    np.testing.assert_array_equal(y["right"], y_again["right"])
    assert not np.array_equal(y["right"], y_other["right"])
    assert not np.array_equal(x, x_other)
    assert 0.0 <= x.min() and x.max() <= 1.0


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((3, 28, 27), np.uint8), np.zeros(3), "`images` of shape"),
        (np.zeros((1, 28, 28), np.uint8), np.zeros(1), "at least 2 `images`"),
        (np.zeros((3, 28, 28), np.uint8), np.zeros(2), "`labels` of shape"),
    ],
)
def test_multifashion_rejects_bad_arguments(images, labels, match):
    with pytest.raises(ValueError, match=match):
        multifashion.make_multifashion(images, labels)


# --- MultiFashion + texture ------------------------------------------------


def test_texture_noise_lies_in_its_band_only():
    bands = np.repeat(np.arange(multifashion_texture.NUM_BANDS), 5)
    noise = multifashion_texture.band_noise(bands, seed=0)
    power = np.abs(np.fft.fft2(noise)) ** 2
    masks = multifashion_texture.band_masks()
    for k in range(multifashion_texture.NUM_BANDS):
        inside = (power[bands == k] * masks[k]).sum()
        np.testing.assert_allclose(inside, power[bands == k].sum(), rtol=1e-6)
    np.testing.assert_allclose(noise.std(axis=(1, 2)), 1.0, rtol=1e-5)
    # Filtered in chunks to bound memory: the same textures.
    chunked = multifashion_texture.band_noise(bands, seed=0, chunk=3)
    np.testing.assert_allclose(chunked, noise, rtol=1e-6, atol=1e-6)


def test_multifashion_texture_adds_an_independent_band_label():
    rng = np.random.default_rng(0)
    images = rng.integers(256, size=(400, 28, 28)).astype(np.uint8)
    labels = rng.integers(10, size=400)

    x, y = multifashion_texture.make_multifashion_texture(images, labels, seed=1,
                                                          amplitude=0.2)
    x_again, _ = multifashion_texture.make_multifashion_texture(images, labels, seed=1,
                                                                amplitude=0.2)
    plain, _ = multifashion_texture.make_multifashion_texture(images, labels, seed=1,
                                                              amplitude=0.0)

    np.testing.assert_array_equal(x, x_again)
    assert set(y) == {"left", "right", "texture"} and y["texture"].dtype == np.int32
    counts = np.bincount(y["texture"], minlength=multifashion_texture.NUM_BANDS)
    assert counts.min() > 70  # about 100 each: uniform
    np.testing.assert_allclose((x - plain).std(axis=(1, 2, 3)), 0.2, rtol=1e-4)
    # The texture's band is what the added noise's spectrum says.
    power = np.abs(np.fft.fft2((x - plain)[..., 0])) ** 2
    energy = np.einsum("nij,kij->nk", power, multifashion_texture.band_masks())
    np.testing.assert_array_equal(energy.argmax(1), y["texture"])
    with pytest.raises(ValueError, match="amplitude"):
        multifashion_texture.make_multifashion_texture(images, labels, amplitude=-1)


# --- FashionGroups ---------------------------------------------------------


def test_fashion_groups_maps_every_class_to_its_task_and_index():
    classes = np.arange(10)

    x, task_ids, labels = fashion_groups.make_fashion_groups(
        constant_images(classes * 20), classes
    )

    # T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker,
    # Bag, Ankle boot.
    np.testing.assert_array_equal(task_ids, [0, 2, 0, 2, 0, 1, 0, 1, 2, 1])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 0, 3, 1, 2, 2])
    assert task_ids.dtype == labels.dtype == np.int32
    assert x.shape == (10, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 5, 5, 0], classes * 20 / 255)
    assert fashion_groups.TASK_NAMES == ("tops", "footwear", "other")


def test_fashion_groups_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"classes in \[0, 10\).*\[0, 10\]"):
        fashion_groups.make_fashion_groups(
            constant_images([0, 0]), np.array([0, 10])
        )


# --- Synthetic data --------------------------------------------------------


def nearest_centroid_accuracy(x, y):
    """Fits class means on the first half, scores the second half."""
    x = x.reshape(len(x), -1)
    half = len(x) // 2
    classes = np.unique(y[:half])
    means = np.stack([x[:half][y[:half] == c].mean(0) for c in classes])
    distances = ((x[half:, None] - means[None]) ** 2).sum(-1)
    return np.mean(classes[distances.argmin(1)] == y[half:])


def test_synthetic_is_learnable_and_deterministic():
    x, y = synthetic.make_synthetic(300, num_tasks=3, num_classes=4, seed=1)
    x_again, _ = synthetic.make_synthetic(300, 3, 4, seed=1)
    x_other, _ = synthetic.make_synthetic(300, 3, 4, seed=2)

    assert x.shape == (300, 28, 28, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert list(y) == ["task_0", "task_1", "task_2"]
    for labels in y.values():
        assert labels.dtype == np.int32
        assert set(labels.tolist()) == {0, 1, 2, 3}
        assert nearest_centroid_accuracy(x, labels) > 0.9
    np.testing.assert_array_equal(x, x_again)
    assert not np.array_equal(x, x_other)


def test_synthetic_groups_is_learnable():
    x, task_ids, labels = synthetic.make_synthetic_groups(
        400, num_tasks=2, num_classes=3, seed=0
    )

    assert x.shape == (400, 28, 28, 1) and x.dtype == np.float32
    assert task_ids.dtype == labels.dtype == np.int32
    assert set(task_ids.tolist()) == {0, 1}
    for task in range(2):
        in_task = task_ids == task
        assert nearest_centroid_accuracy(x[in_task], labels[in_task]) > 0.9


def test_synthetic_rejects_a_single_task():
    with pytest.raises(ValueError, match="`num_tasks`.*>= 2.*num_tasks=1"):
        synthetic.make_synthetic(num_tasks=1)


# --- load and task_counts --------------------------------------------------


def test_load_synthetic_structure_batch_size_and_limit():
    result = data.load("synthetic", batch_size=32, limit=40)

    assert result.task_classes == {"task_0": 3, "task_1": 3}
    assert result.jointly_labelled
    image_spec, label_specs = result.train.element_spec
    assert image_spec == tf.TensorSpec((None, 28, 28, 1), tf.float32)
    assert label_specs == {
        name: tf.TensorSpec((None,), tf.int32) for name in result.task_classes
    }
    for split in (result.train, result.validation, result.test):
        sizes = [len(images) for images, _ in split]
        assert sizes == [32, 8]


def test_load_shuffles_train_only_with_a_seed():
    first = data.load("synthetic_groups", batch_size=512, seed=5)
    second = data.load("synthetic_groups", batch_size=512, seed=5)

    def task_ids(dataset):
        return next(iter(dataset))[1].numpy()

    assert first.jointly_labelled is False
    assert len(first.train.element_spec) == 3
    epoch_1 = task_ids(first.train)
    np.testing.assert_array_equal(epoch_1, task_ids(first.train))  # the same epoch
    data.order_callbacks(first.train)[0].on_epoch_begin(1)
    assert not np.array_equal(epoch_1, task_ids(first.train))  # reshuffled by epoch
    np.testing.assert_array_equal(epoch_1, task_ids(second.train))
    np.testing.assert_array_equal(
        task_ids(first.validation), task_ids(first.validation)
    )
    assert len(epoch_1) == data.SYNTHETIC_SPLIT_SIZES["train"]


def test_with_heldout_carves_a_seeded_part_of_the_training_split():
    whole = data.load("synthetic", batch_size=512, seed=2)
    images = lambda split: np.concatenate([x.numpy() for x, _ in split]).reshape(-1, 784)
    carved = whole.with_heldout(0.25)
    trained, held = images(carved.train), images(carved.heldout)
    assert (len(trained), len(held)) == (192, 64)
    rows = lambda a: {r.tobytes() for r in a}
    assert rows(trained) | rows(held) == rows(images(whole.train))
    assert not rows(trained) & rows(held)
    assert rows(images(data.load("synthetic", seed=2).with_heldout(0.25).heldout)) == rows(held)
    np.testing.assert_array_equal(images(carved.validation), images(whole.validation))
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\)"):
        whole.with_heldout(1.0)
    with pytest.raises(ValueError, match="cannot carve"):
        data.MultiTaskData(whole.train, whole.validation, whole.test, whole.task_classes,
                           True).with_heldout(0.2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "mnist"}, "`name` to be one of .*'synthetic'.*name='mnist'"),
        ({"batch_size": 0}, "`batch_size`.*>= 1.*batch_size=0"),
        ({"limit": 0}, "`limit`.*>= 1.*limit=0"),
    ],
)
def test_load_rejects_bad_arguments(kwargs, match):
    kwargs = {"name": "synthetic", **kwargs}
    with pytest.raises(ValueError, match=match):
        data.load(**kwargs)


def test_task_counts_batched_and_unbatched():
    _, task_ids, _ = synthetic.make_synthetic_groups(30, seed=0)
    expected = np.bincount(task_ids, minlength=3)
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.zeros((30, 1)), task_ids, task_ids)
    )

    for batched in (dataset, dataset.batch(8)):
        counts = data.task_counts(batched, num_tasks=3)
        np.testing.assert_array_equal(counts, expected)
        assert counts.dtype == np.int64
    assert counts[2] == 0


def test_task_counts_rejects_bad_datasets():
    joint = data.load("synthetic", limit=4).train
    with pytest.raises(ValueError, match="`dataset` elements"):
        data.task_counts(joint, num_tasks=2)
    groups = data.load("synthetic_groups").train
    with pytest.raises(ValueError, match=r"task ids in \[0, 1\)"):
        data.task_counts(groups, num_tasks=1)


# --- Real Fashion-MNIST ----------------------------------------------------


@pytest.mark.real_data
@skip_without_real_data
def test_real_fashion_mnist():
    (x_train, y_train), (x_test, y_test) = data.load_fashion_mnist()

    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)


@pytest.mark.real_data
@skip_without_real_data
@pytest.mark.parametrize("name", ["multifashion", "fashion_groups", "multifashion_texture",
                                  "fashion_domains"])
def test_real_load(name):
    result = data.load(name, batch_size=64, limit=100)

    for split in (result.train, result.validation, result.test):
        assert sum(len(batch[0]) for batch in split) == 100
    images = next(iter(result.test))[0].numpy()
    assert images.shape == (64, 28, 28, 1)
    if name != "multifashion_texture":  # its texture is not clipped
        assert 0.0 <= images.min() and images.max() <= 1.0
    assert images.max() > 0.5
    assert result.jointly_labelled == (name not in ("fashion_groups", "fashion_domains"))


# --- FashionDomains ----------------------------------------------------------


def test_fashion_domains_transform_each_domain_and_keep_the_class():
    from tf_mtl.data import fashion_domains

    rng = np.random.default_rng(0)
    images = rng.integers(256, size=(200, 28, 28)).astype(np.uint8)
    labels = rng.integers(10, size=200)
    x, domains, y = fashion_domains.make_fashion_domains(images, labels, seed=3)
    assert x.shape == (200, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(y, labels)
    assert np.bincount(domains, minlength=4).min() > 20  # every domain has data
    plain = images / 255.0
    expected = {"upright": plain, "rotated": np.rot90(plain, axes=(1, 2)),
                "inverted": 1.0 - plain, "flipped": plain[:, ::-1]}
    for index, name in enumerate(fashion_domains.DOMAIN_NAMES):
        rows = domains == index
        np.testing.assert_allclose(x[rows, ..., 0], expected[name][rows], atol=1e-6)
    again = fashion_domains.make_fashion_domains(images, labels, seed=3)
    np.testing.assert_array_equal(again[1], domains)
    with pytest.raises(ValueError, match="images"):
        fashion_domains.make_fashion_domains(images[0], labels)
