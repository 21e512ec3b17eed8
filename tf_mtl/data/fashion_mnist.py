"""Fashion-MNIST loading, from local IDX files or from TensorFlow Datasets.

The multi-task datasets of this package are built from Fashion-MNIST. The
machines this library runs on often have no network, so the images are read
first from the IDX files that Debian's `dataset-fashion-mnist` package
installs (or any folder holding the four official files, gzipped or not).
Only when those files are missing does loading fall back to TensorFlow
Datasets, which needs a network the first time.

This module also splits the official training set into a training and a
validation split, the same way for every dataset built on top of it.
"""

import gzip
import math
import os

import numpy as np

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

VALIDATION_SIZE = 10_000

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Number of examples converted at a time from TensorFlow Datasets to numpy.
_TFDS_CHUNK_SIZE = 10_000

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path):
    """Reads an IDX file (the format of the MNIST family) into a numpy array.

    An IDX file starts with a magic number `0x0000TTDD`, where `TT` codes the
    element type and `DD` the number of dimensions, followed by the size of
    each dimension as a big-endian uint32, then the data in row-major order.

    Args:
        path: Path of the file. A path ending in `.gz` is decompressed.

    Returns:
        A numpy array with the shape and element type stored in the file.

    Raises:
        ValueError: If the magic number is not a valid IDX one, or the file
            holds fewer bytes than its header announces.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        content = f.read()
    magic = content[:4]
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES:
        raise ValueError(
            "Expected an IDX file starting with a magic number 0x0000TTDD "
            f"with a type code TT in {', '.join(map(hex, _IDX_DTYPES))}. "
            f"Received a file starting with {magic.hex()!r}: {path}"
        )
    dtype = _IDX_DTYPES[magic[2]]
    ndim = magic[3]
    header_size = 4 + 4 * ndim
    if len(content) >= header_size:
        shape = tuple(np.frombuffer(content, ">u4", ndim, offset=4).tolist())
        count = math.prod(shape)
        if len(content) >= header_size + count * dtype.itemsize:
            data = np.frombuffer(content, dtype, count, offset=header_size)
            return data.reshape(shape).astype(dtype.newbyteorder("="))
    raise ValueError(
        f"Expected an IDX file holding the {ndim} dimension sizes and the "
        f"data that its header announces. Received a truncated file of "
        f"{len(content)} bytes: {path}"
    )


def _find_idx_file(data_dir, name):
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"The folder {data_dir} does not exist.")
    for candidate in (name + ".gz", name):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Expected {name} or {name}.gz in {data_dir}; found neither."
    )


def _load_idx_dir(data_dir):
    splits = []
    for images_name, labels_name in _IDX_FILES.values():
        images = read_idx(_find_idx_file(data_dir, images_name))
        labels = read_idx(_find_idx_file(data_dir, labels_name))
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"Expected images of shape (N, 28, 28) and labels of shape "
                f"(N,) in {data_dir}. Received images of shape "
                f"{images.shape} and labels of shape {labels.shape}."
            )
        splits.append((_as_pixels(images, os.path.join(data_dir, images_name)),
                       labels.astype(np.int64)))
    return tuple(splits)


def _as_pixels(images, path):
    """The images as uint8; an IDX file may hold floats, which must be
    whole numbers in [0, 255] to be Fashion-MNIST pixels."""
    if images.dtype == np.uint8:
        return images
    flat = images.reshape(len(images), -1)
    bad = ~np.all(np.isfinite(flat) & (flat >= 0) & (flat <= 255) & (flat == np.round(flat)), 1)
    if bad.any():
        raise ValueError(
            f"{path}: image {int(np.flatnonzero(bad)[0])} holds values that are not "
            "pixels (NaN, Inf, fractions or values outside [0, 255]).")
    return images.astype(np.uint8)


def _load_tfds():
    import tensorflow_datasets as tfds

    splits = tfds.load(
        "fashion_mnist", split=list(_IDX_FILES), as_supervised=True
    )
    result = []
    for dataset in splits:
        batches = list(tfds.as_numpy(dataset.batch(_TFDS_CHUNK_SIZE)))
        images = np.concatenate([images for images, _ in batches])
        labels = np.concatenate([labels for _, labels in batches])
        result.append(
            (images[..., 0].astype(np.uint8), labels.astype(np.int64))
        )
    return tuple(result)


def load_fashion_mnist(data_dir=None, download=False):
    """Loads the official Fashion-MNIST training and test sets.

    Reads the four IDX files (`train-images-idx3-ubyte`, ...; gzipped or
    not) from `data_dir`. With `download`, when they are not there, takes
    the dataset from `tensorflow_datasets` instead, which downloads it the
    first time (into `~/tensorflow_datasets`).

    Args:
        data_dir: Folder holding the IDX files. Defaults to
            `DEFAULT_DATA_DIR`, where Debian's `dataset-fashion-mnist`
            package installs them.
        download: Whether to fall back to TensorFlow Datasets.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images of shape
        `(N, 28, 28)` and int64 labels in `[0, 10)` of shape `(N,)`, with
        N = 60,000 for training and 10,000 for test.

    Raises:
        FileNotFoundError: If the IDX files are missing (and, with
            `download`, `tensorflow_datasets` cannot provide the data
            either).
    """
    data_dir = DEFAULT_DATA_DIR if data_dir is None else data_dir
    try:
        return _load_idx_dir(data_dir)
    except FileNotFoundError as idx_error:
        help = ("To get the data, install the IDX files with `apt-get install "
                "dataset-fashion-mnist` or point `--data_dir=` / `data_dir` to a "
                "folder holding them")
        if not download:
            raise FileNotFoundError(
                f"Fashion-MNIST could not be loaded. {idx_error} {help}, or allow "
                "TensorFlow Datasets to download them (`--download` / "
                "`download=True`; needs a network).") from None
        try:
            return _load_tfds()
        except Exception as tfds_error:
            raise FileNotFoundError(
                f"Fashion-MNIST could not be loaded. {idx_error} {help}. "
                "TensorFlow Datasets could not download them either: "
                f"{type(tfds_error).__name__}: {tfds_error}"
            ) from tfds_error


def split_fashion_mnist(data, seed=0):
    """Splits Fashion-MNIST into training, validation and test splits.

    The validation split is the last `VALIDATION_SIZE` examples of a seeded
    permutation of the official training set, and the training split the
    rest; the test split is the official test set, unchanged. Every dataset
    of this package uses this function, so that their splits agree.

    Args:
        data: `((x_train, y_train), (x_test, y_test))`, as returned by
            `load_fashion_mnist`.
        seed: Seed of the permutation of the official training set.

    Returns:
        A dict mapping `"train"`, `"validation"` and `"test"` to
        `(images, labels)` pairs.
    """
    (x_train, y_train), test = data
    if len(x_train) <= VALIDATION_SIZE:
        raise ValueError(
            f"Expected more than {VALIDATION_SIZE} official training "
            f"examples in `data`. Received {len(x_train)}."
        )
    order = np.random.default_rng(seed).permutation(len(x_train))
    train, validation = order[:-VALIDATION_SIZE], order[-VALIDATION_SIZE:]
    return {
        "train": (x_train[train], y_train[train]),
        "validation": (x_train[validation], y_train[validation]),
        "test": test,
    }


def scale_images(images):
    """Converts uint8 images `(N, H, W)` to float32 `(N, H, W, 1)` in [0, 1]."""
    return images.astype(np.float32)[..., np.newaxis] / 255.0
