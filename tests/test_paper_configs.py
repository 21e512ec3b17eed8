"""Every paper flagfile of configs/ trains two steps through train.py on
generated data in its data set's exact format: its flags parse, its model
(the paper's backbone and heads) builds, trains, evaluates and saves.
Steps run eagerly and nothing is exported: tracing a ResNet-50 once per
config would take most of the suite's budget, and what is checked here is
the configuration (test_train and test_export check the export)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from absl.testing import flagsaver

import train

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32  # SegNet needs sides divisible by 32
SHRINK = ("--epochs=1", "--limit=2", "--batch_size=1", "--verbose=0",
          "--mpps_frozen_start=0", "--mpps_frozen_end=0", "--noexport")


def _write_npy(root, folders, classes):
    """Two examples per split in the `.npy` layout of MTAN and Auto-Lambda."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index in range(2):
            normal = rng.normal(size=(SIZE, SIZE, 3))
            arrays = {"image": rng.random((SIZE, SIZE, 3)),
                      "label": rng.integers(-1, classes, (SIZE, SIZE)),
                      "part_seg": rng.integers(-1, 10, (SIZE, SIZE)),
                      "depth": rng.random((SIZE, SIZE)),
                      "normal": normal / np.linalg.norm(normal, axis=-1, keepdims=True)}
            for folder in folders:
                os.makedirs(root / split / folder, exist_ok=True)
                np.save(root / split / folder / f"{index}.npy", arrays[folder].astype("float32"))
    return root


DATA = {
    "nyuv2": lambda path: _write_npy(path, ("image", "label", "depth", "normal"), 13),
    "cityscapes7": lambda path: _write_npy(path, ("image", "label", "depth"), 7),
    "cityscapes10": lambda path: _write_npy(path, ("image", "label", "part_seg", "depth"), 10),
    "tfds": lambda path: path,  # tfds.testing.mock_data makes the examples
}
CONFIGS = {
    "mpps_nyuv2": ("nyuv2", ["semantic", "depth", "normal"]),
    "mpps_cityscapes": ("cityscapes10", ["semantic", "part", "depth"]),
    "mpps_multi_cifar100": ("tfds", None),
    "mr_celeba": ("tfds", ["global", "eyes", "hair", "mouth", "nose", "beard", "cheeks",
                           "wearings"]),
    "mr_nyuv2": ("nyuv2", ["semantic", "depth", "normal"]),
    "smtl_nyuv2": ("nyuv2", ["semantic", "depth", "normal"]),
    "smtl_cityscapes": ("cityscapes7", ["semantic", "depth"]),
}


def test_every_paper_config_is_tested():
    datasets = ("nyuv2", "cityscapes", "multi_cifar100", "celeba")
    papers = {f[:-4] for f in os.listdir(os.path.join(ROOT, "configs"))
              if f.endswith(".cfg") and f[:-4].split("_", 1)[1] in datasets}
    assert papers == set(CONFIGS)


@pytest.fixture
def eager():
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_paper_config_trains_two_steps(config, tmp_path, eager):
    data, task_names = CONFIGS[config]
    width = 0.125 if config == "mr_celeba" else 0.0625
    data_dir = DATA[data](tmp_path / "data")
    out = tmp_path / "out"
    with flagsaver.flagsaver(), tfds.testing.mock_data(num_examples=2):
        FLAGS([
            "train.py", f"--flagfile={os.path.join(ROOT, 'configs', config + '.cfg')}",
            f"--data_dir={data_dir}", f"--output_dir={out}", f"--width={width}", *SHRINK])
        train.main([])
    with open(out / "history.json") as f:
        history = json.load(f)["history"]
    with open(out / "results.json") as f:
        results = json.load(f)
    assert len(history["loss"]) == 1 and np.isfinite(history["loss"][0])
    if task_names is not None:
        assert {k[:-len("_loss")] for k in results if k.endswith("_loss")} == {*task_names}
    assert all(np.isfinite(v) for v in results.values() if isinstance(v, float))
    assert (out / "model.keras").exists()
