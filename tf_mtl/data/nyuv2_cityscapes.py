"""NYUv2 and Cityscapes scene understanding, as preprocessed by MTAN, and
Cityscapes with part segmentation after Auto-Lambda.

MTAN (Liu, Johns and Davison, 2019, github.com/lorenmt/mtan) distributes
both datasets resized and stored as one `.npy` array per example and label;
LibMTL, Maximum Roaming and MPPS train on these same files. On disk:

    {data_dir}/
        train/
            image/0.npy, 1.npy, ..., {N-1}.npy   float (H, W, 3) in [0, 1]
            label/{i}.npy    (H, W) class ids (float or int), -1 = unlabelled
            depth/{i}.npy    float (H, W) or (H, W, 1), 0 = unknown
            normal/{i}.npy   float (H, W, 3) unit normals, all zero = unknown
            part_seg/{i}.npy (H, W) part class ids, -1 = unlabelled
                             (Cityscapes only, optional: see below)
        val/
            the same folders

File `{i}.npy` of every folder belongs to example i. NYUv2 (795 training
and 654 val examples at 288x384) has the first four folders: 13-class
semantic segmentation, depth and surface normals. Cityscapes (2975 and 500
examples at 128x256) has no `normal` folder: 7-class semantic segmentation
(MTAN's README also mentions 2- and 19-class labels: put 19-class ones in
`label` and pass `num_classes=19`) and depth, which for Cityscapes is
MTAN's inverse depth: the dataset's disparity, >= 0 (a user's check of
the download, lorenmt/mtan issue #25), 0 taken as unknown. LibMTL's
`examples/cityscapes/create_dataset.py` reads MTAN's 7-class files from
`label/` and `depth/`; the folder names inside MTAN's download itself
were not verified.

Cityscapes in MPPS (section 4.1: "10-class semantic segmentation (SemSeg),
disparity (inverse depth, Disp) estimation, and 10-class part segmentation
(PartSeg)"; it credits MTAN for the preprocessed data, but MTAN's has no
parts) is Auto-Lambda's setting (Liu, James, Davison and Johns, 2022,
github.com/lorenmt/auto-lambda, read at its latest commit, bdba636).
Verified there:

- Auto-Lambda's code reads no `.npy` files (its README's Dropbox download
  was not inspected; the README says it follows MTAN's preprocessing).
  Its `dataset/cityscapes_preprocess.py` resizes Cityscapes to 256x512
  into `{split}/image/{i}.png`, `{split}/seg/{i}.png` (Cityscapes label
  ids), `{split}/part_seg/{i}.tif` (panoptic-parts ids) and
  `{split}/depth/{i}.png` (raw 16-bit disparity), splits `train` and `val`. `create_dataset.py`'s `CityScapes` maps the
  labels while reading them:
  - `seg` (`map_seg_label`): the 19 Cityscapes training classes, 0..18;
    -1, ignored, elsewhere. Its README: "19 Class Segmentation + 10 Class
    Part Segmentation + Disparity (Inverse Depth) Estimation".
  - `part_seg` (`map_part_seg_label`): 10 classes; 0 is background, a
    class like the others (in the loss and the mIoU), 1-4 human and rider
    torso, head, arms and legs, 5-9 car, truck and bus windows, wheels,
    lights, license plate and chassis. The loss ignores -1, which only
    the padding of its augmentation writes, and its Cityscapes crops
    (256x256 of 256x512, scale 1) need none: every pixel has a class.
  - `depth` holds disparity (`map_disparity`): a raw value p > 0 becomes
    (p - 1) / 1024, an unknown one (0) becomes -1; the loss (`utils.py`,
    `compute_loss`) is L1 over the pixels that are not -1, so disparity 0
    (infinitely far, such as the sky) is a target there.
  - Images become `2 * image - 1`, in [-1, 1]; training images are
    random 256x256 crops, randomly flipped (`trainer_dense.py`).

This module reads none of those PNG and TIFF files. Converted to the
layout above, Auto-Lambda's setting loads with `num_classes=19`: its `seg`
mapped into `label`, its 10 part classes into `part_seg` (then the data
set gains the task `part`), and its disparity into `depth`, which keeps
the task name `depth` and its loss, L1 over nonzero pixels. Unknown
disparity must therefore be stored as 0, not as Auto-Lambda's -1, which
would be a target; Cityscapes loading rejects negative depth for that
reason. Unlike Auto-Lambda, this ignores the pixels of disparity exactly 0.
Neither repository has a script writing `.npy` files (MTAN's were
distributed ready-made); none is provided here.

Not verified anywhere: MPPS's 10 semantic classes, which appear in neither
Auto-Lambda's code (19) nor MTAN's README (2, 7 or 19). `num_classes=10`
reads such labels if made, but the verified setting of the three tasks has
19.

Splits: the papers train on `train` and report results on `val` (MTAN;
Maximum Roaming, Appendix B: "evaluated on the validation split furnished
by (Liu, Johns, and Davison 2019)"; MPPS through LibMTL, whose `test` mode
reads `val`; Auto-Lambda's `CityScapes(train=False)`). There is no other
held-out split, so `val` is both the `validation` and the `test` split
here.

Images are fed as stored, in [0, 1] (MTAN and LibMTL normalise nothing),
without augmentation: "all baselines and MTAN did NOT apply data
augmentation" (LibMTL, examples/nyu/create_dataset.py, whose optional
random scale and flip are not reproduced, nor are Auto-Lambda's).

The files are read from disk batch by batch: NYUv2 at full size is about
5 GB of float32 arrays. The training split's order in epoch e is
`epoch_shuffled(np.arange(N), batch_size, seed)`'s, a function of (seed, e)
alone, so a resumed run reads the batches of an uninterrupted one. Loading
checks the layout, every file's shape and dtype (from the `.npy` headers),
every label and part label file's values and, for Cityscapes, that no
disparity is negative, so a bad file fails here, named, not in the middle
of training.
"""

import os
import re
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tf_mtl import tasks as task_specs
from tf_mtl.data import _utils
from tf_mtl.data import ordering
from tf_mtl.data.base import MultiTaskData

IGNORE_LABEL = -1
NYUV2_NUM_CLASSES = 13
CITYSCAPES_NUM_CLASSES = (7, 10, 19)
# Auto-Lambda's part classes: background and 9 parts of people and vehicles.
CITYSCAPES_PART_CLASSES = 10

# The task each label folder holds, in the order of the tasks.
_PART_FOLDER = "part_seg"
_TASK_OF_FOLDER = {"label": "semantic", "depth": "depth", "normal": "normal",
                   _PART_FOLDER: "part"}
_NYUV2_FOLDERS = ("image", "label", "depth", "normal")
_CITYSCAPES_FOLDERS = ("image", "label", "depth")
# Folders of class ids, read as int32 and checked against their classes.
_CLASS_FOLDERS = ("label", _PART_FOLDER)

# numpy dtype kinds each folder may hold: labels may be stored as floats.
_DTYPE_KINDS = {"image": "f", "label": "fiu", "depth": "f", "normal": "f",
                _PART_FOLDER: "fiu"}

# `{i}.npy` without leading zeros, so that every index has one file name.
_FILE_NAME = re.compile(r"^(0|[1-9][0-9]*)\.npy$")


def load_nyuv2(data_dir, batch_size=8, seed=0, limit=None):
    """Loads MTAN's NYUv2: semantic segmentation, depth and surface normals.

    Args:
        data_dir: Folder holding `train/` and `val/` in the layout of the
            module docstring, each with `image/`, `label/`, `depth/` and
            `normal/`.
        batch_size: Number of examples per batch.
        seed: Seed of the training order, which in epoch e is a function
            of (seed, e) alone.
        limit: If set, keeps the first `limit` examples of each split.

    Returns:
        A jointly labelled `MultiTaskData` with elements
        `(image, {"semantic": ..., "depth": ..., "normal": ...})`: float32
        images `(batch, H, W, 3)`, int32 class ids `(batch, H, W)` (-1 where
        unlabelled), float32 depth `(batch, H, W, 1)` and normals
        `(batch, H, W, 3)`. Its tasks are `tasks.segmentation("semantic",
        13, (H, W))`, `tasks.depth("depth", (H, W))` and
        `tasks.surface_normals("normal", (H, W))` at the images' size (H, W).
        `validation` and `test` are both the `val` folder.

    Raises:
        FileNotFoundError: If `data_dir`, a split or a folder is missing or
            a folder holds no file.
        ValueError: If the files of a folder are not numbered 0..N-1, the
            folders of a split hold different numbers of files, a file's
            shape or dtype is not the expected one (all the images of both
            splits share the size of the first), or a label is neither a
            class id in [0, 13) nor -1.
    """
    return _load(data_dir, _NYUV2_FOLDERS, {"label": NYUV2_NUM_CLASSES},
                 batch_size, seed, limit)


def load_cityscapes(data_dir, batch_size=8, seed=0, limit=None, num_classes=7,
                    part_seg=None, part_classes=CITYSCAPES_PART_CLASSES):
    """Loads Cityscapes: semantic segmentation, depth and maybe parts.

    Args:
        data_dir: Folder holding `train/` and `val/` in the layout of the
            module docstring, each with `image/`, `label/` and `depth/`
            (disparity, >= 0, 0 where unknown) and maybe `part_seg/`.
        batch_size: Number of examples per batch.
        seed: Seed of the training order, which in epoch e is a function
            of (seed, e) alone.
        limit: If set, keeps the first `limit` examples of each split.
        num_classes: The semantic classes of `label/`: 7 (MTAN's and
            LibMTL's labels), 10 (MPPS's count, not verified) or 19 (the
            19 Cityscapes training classes, as in MTAN's 19-class labels
            and Auto-Lambda's).
        part_seg: Whether to load the part labels of `part_seg/`: `None`
            loads them when both splits have the folder, `True` requires
            it, `False` ignores it.
        part_classes: The part classes of `part_seg/`, an integer >= 2;
            Auto-Lambda's 10 (background and 9 parts) by default.

    Returns:
        A jointly labelled `MultiTaskData` with elements
        `(image, {"semantic": ..., "depth": ...})`, typed as `load_nyuv2`'s,
        and tasks `tasks.segmentation("semantic", num_classes, (H, W))` and
        `tasks.depth("depth", (H, W))`. With part labels, the elements'
        dict has a third entry, `"part"`: int32 part class ids
        `(batch, H, W)` (-1 where unlabelled), of the third task,
        `tasks.segmentation("part", part_classes, (H, W))`. `validation`
        and `test` are both the `val` folder.

    Raises:
        FileNotFoundError: As `load_nyuv2`; also if `part_seg=True` and a
            split has no `part_seg/` folder, or `part_seg=None` and only one
            split has it.
        ValueError: As `load_nyuv2` (for `part_seg/` too, its part ids in
            [0, part_classes) or -1), if a disparity is negative, or if
            `num_classes` is not 7, 10 or 19, `part_seg` not `None`, `True`
            or `False`, or `part_classes` not an integer >= 2.
    """
    if num_classes not in CITYSCAPES_NUM_CLASSES:
        raise ValueError(
            f"Expected `num_classes` in {CITYSCAPES_NUM_CLASSES}. "
            f"Received: num_classes={num_classes!r}")
    if part_seg is not None and not isinstance(part_seg, bool):
        raise ValueError(
            f"Expected `part_seg` to be None, True or False. "
            f"Received: part_seg={part_seg!r}")
    _utils.check_int("part_classes", part_classes, 2)
    folders, classes = _CITYSCAPES_FOLDERS, {"label": num_classes}
    if _uses_part_seg(os.fspath(data_dir), part_seg):
        folders += (_PART_FOLDER,)
        classes[_PART_FOLDER] = part_classes
    # Disparity is >= 0 with 0 for unknown; a negative value is most likely
    # Auto-Lambda's -1 for unknown, which the depth loss, ignoring only
    # zeros, would take for a target.
    return _load(data_dir, folders, classes, batch_size, seed, limit,
                 nonnegative_depth=True)


def _uses_part_seg(data_dir, part_seg):
    """Whether to load `part_seg/`; raises if it is required and missing."""
    if part_seg is False:
        return False
    # A missing split or data_dir is for `_load` to report.
    split_dirs = [os.path.join(data_dir, split) for split in ("train", "val")]
    folders = [os.path.join(split_dir, _PART_FOLDER)
               for split_dir in split_dirs if os.path.isdir(split_dir)]
    found = [folder for folder in folders if os.path.isdir(folder)]
    if part_seg is None and not found:
        return False
    for folder in folders:
        if folder not in found:
            reason = ("part_seg=True requires part labels in both splits" if part_seg
                      else f"{found[0]!r} exists, so the part task would lack a split; "
                           "pass part_seg=False to load without part labels")
            raise FileNotFoundError(
                f"Missing folder {folder!r}: expected files 0.npy, 1.npy, ... of "
                f"part class ids in it ({reason}).")
    return True


def _load(data_dir, folders, classes, batch_size, seed, limit, nonnegative_depth=False):
    """`classes` maps each folder of class ids to its number of classes."""
    _utils.check_int("batch_size", batch_size, 1)
    if limit is not None:
        _utils.check_int("limit", limit, 1)
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"Expected `data_dir` to be a folder holding train/ and val/. "
            f"Received: data_dir={data_dir!r}, which is not a folder.")
    splits = {split: _split_paths(data_dir, split, folders, limit)
              for split in ("train", "val")}
    first_image = splits["train"]["image"][0]
    size = _image_size(first_image)
    layouts = {}
    for split, paths in splits.items():
        layouts[split] = _check_headers(paths, size, first_image)
        for folder, num_classes in classes.items():
            _check_labels(paths[folder], num_classes)
        if nonnegative_depth:
            _check_nonnegative(paths["depth"])
    count = len(splits["train"]["image"])
    shuffled = lambda rows: _read(ordering.epoch_shuffled(rows, batch_size, seed),
                                  layouts["train"], size)
    in_order = lambda split, rows: _read(
        tf.data.Dataset.from_tensor_slices(rows).batch(batch_size), layouts[split], size)

    def carve(fraction):  # the validation split is the test split: hold out training images
        kept, held = _utils.heldout_split(count, fraction, seed)
        return shuffled(kept), in_order("train", held)

    val = in_order("val", np.arange(len(splits["val"]["image"])))
    tasks = _tasks(folders, classes, size)
    return MultiTaskData(
        train=shuffled(np.arange(count)),
        validation=val,
        test=val,
        task_classes={task.name: task.classes for task in tasks},
        jointly_labelled=True,
        tasks=tasks,
        carve=carve,
    )


def _split_paths(data_dir, split, folders, limit):
    """`{folder: [path of example 0, ...]}` of a split, cut to `limit`."""
    split_dir = os.path.join(data_dir, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"No `{split}` split in data_dir={data_dir!r}: expected the folder "
            f"{split_dir!r}, holding {', '.join(folders)}.")
    paths = {folder: _folder_paths(os.path.join(split_dir, folder)) for folder in folders}
    count = len(paths["image"])
    for folder, files in paths.items():
        if len(files) != count:
            raise ValueError(
                f"{os.path.join(split_dir, folder)!r} holds {len(files)} examples "
                f"but {os.path.join(split_dir, 'image')!r} holds {count}: every "
                "folder of a split needs one file per example.")
    return {folder: files[:limit] for folder, files in paths.items()}


def _folder_paths(folder):
    """The paths of `folder`'s files `0.npy` ... `{N-1}.npy`, in index order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Missing folder {folder!r}: expected files 0.npy, 1.npy, ... in it.")
    paths = {}
    for name in os.listdir(folder):
        match = _FILE_NAME.match(name)
        if match:
            paths[int(match.group(1))] = os.path.join(folder, name)
        elif name.endswith(".npy"):
            raise ValueError(
                f"Unexpected file {os.path.join(folder, name)!r}: expected the "
                "files of a folder to be named 0.npy, 1.npy, ... (no leading zeros).")
    if not paths:
        raise FileNotFoundError(f"No file 0.npy, 1.npy, ... in {folder!r}.")
    missing = sorted(set(range(len(paths))) - set(paths))
    if missing:
        raise ValueError(
            f"The files of {folder!r} are not numbered 0..{len(paths) - 1}: "
            f"{missing[0]}.npy is missing while {max(paths)}.npy exists.")
    return [paths[index] for index in range(len(paths))]


class _Layout(NamedTuple):
    """Where a `.npy` file's data lies, to read it without parsing its header again.

    NumPy parses a header with `ast.literal_eval`, which is not thread-safe in
    CPython 3.11 ("AST constructor recursion depth mismatch" when tf.data's map
    threads parse at once): headers are parsed once, here, and the threads only
    read bytes.
    """

    path: str
    offset: int
    shape: tuple
    dtype: np.dtype
    fortran_order: bool

    def read(self):
        count = int(np.prod(self.shape))
        data = np.fromfile(self.path, dtype=self.dtype, count=count, offset=self.offset)
        return data.reshape(self.shape, order="F" if self.fortran_order else "C")


def _header(path):
    """The `_Layout` of a `.npy` file, read without its data."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise ValueError(f"{path!r} is not a readable .npy file: {error}") from error
    fortran_order = array.flags.f_contiguous and not array.flags.c_contiguous
    return _Layout(path, array.offset, array.shape, array.dtype, fortran_order)


def _image_size(path):
    shape = _header(path).shape
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(
            f"{path!r} holds an array of shape {shape}; expected an image of "
            "shape (height, width, 3).")
    return tuple(int(n) for n in shape[:2])


def _allowed_shapes(folder, size):
    return {
        "image": [(*size, 3)],
        "label": [size],
        "depth": [size, (*size, 1)],
        "normal": [(*size, 3)],
        _PART_FOLDER: [size],
    }[folder]


def _check_headers(paths, size, first_image):
    """`{folder: [_Layout of example 0, ...]}`, each checked against `size`."""
    layouts = {}
    for folder, files in paths.items():
        allowed = _allowed_shapes(folder, size)
        layouts[folder] = [_header(path) for path in files]
        for path, (_, _, shape, dtype, _) in zip(files, layouts[folder]):
            if shape not in allowed:
                raise ValueError(
                    f"{path!r} holds an array of shape {shape}; expected "
                    f"{' or '.join(map(str, allowed))}: {folder} arrays of the "
                    f"size {size} of the first image, {first_image!r}.")
            if dtype.kind not in _DTYPE_KINDS[folder]:
                raise ValueError(
                    f"{path!r} holds {dtype} values; expected "
                    f"{'numbers' if folder in _CLASS_FOLDERS else 'floats'}.")
    return layouts


def _check_labels(paths, num_classes):
    """Every label is a whole class id in [0, num_classes) or the ignore label."""
    for path in paths:
        labels = np.load(path)
        bad = labels[(labels != IGNORE_LABEL) & (
            (labels < 0) | (labels >= num_classes) | (labels != np.floor(labels)))]
        if bad.size:
            raise ValueError(
                f"{path!r} holds the label {bad.flat[0]}; expected class ids "
                f"0..{num_classes - 1}, or {IGNORE_LABEL} where unlabelled.")


def _check_nonnegative(paths):
    for path in paths:
        depth = np.load(path, mmap_mode="r")
        lowest = depth.min() if depth.size else 0
        if lowest < 0:
            raise ValueError(
                f"{path!r} holds the disparity {lowest}; expected values >= 0, "
                "0 where unknown: the depth loss ignores only zeros (store "
                "Auto-Lambda's -1 for unknown disparity as 0).")


def _read(indices, layouts, size):
    """Batches `(image, {task: label})` of the batches of example `indices`."""
    return (indices.map(_reader(layouts, size), num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def _reader(layouts, size):
    """A map from a batch of example indices to `(image, {task: label})`."""
    folders = tuple(layouts)
    shapes = {"image": (*size, 3), "label": size, "depth": (*size, 1), "normal": (*size, 3),
              _PART_FOLDER: size}
    dtypes = {folder: np.int32 if folder in _CLASS_FOLDERS else np.float32
              for folder in folders}

    def read_batch(indices):
        return [
            np.stack([layouts[folder][i].read().astype(dtypes[folder])
                      .reshape(shapes[folder]) for i in indices])
            for folder in folders
        ]

    def read(indices):
        arrays = tf.numpy_function(
            read_batch, [indices], [tf.as_dtype(dtypes[f]) for f in folders],
            stateful=False)
        for array, folder in zip(arrays, folders):
            array.set_shape((None, *shapes[folder]))
        image, *labels = arrays
        return image, {_TASK_OF_FOLDER[f]: label for f, label in zip(folders[1:], labels)}

    return read


def _tasks(folders, classes, size):
    tasks = [
        task_specs.segmentation("semantic", classes["label"], size, ignore_label=IGNORE_LABEL),
        task_specs.depth("depth", size),
    ]
    if "normal" in folders:
        tasks.append(task_specs.surface_normals("normal", size))
    if _PART_FOLDER in folders:
        tasks.append(task_specs.segmentation(
            _TASK_OF_FOLDER[_PART_FOLDER], classes[_PART_FOLDER], size,
            ignore_label=IGNORE_LABEL))
    return tuple(tasks)
