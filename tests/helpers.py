"""Constants and small data helpers shared by test_model.py, test_routing.py
and test_stl.py: the two-task set-up, images, a dense backbone, batched
synthetic data.

Plain functions and constants, not fixtures (those live in conftest.py);
test modules import them with `from helpers import ...`.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_mtl import backbones
from tf_mtl.data import synthetic
from tf_mtl.tasks import classification

INPUT_SHAPE = (28, 28, 1)
NAMES = ("task_0", "task_1")


def two_tasks(**kwargs):
    return [classification(name, 3, **kwargs) for name in NAMES]


def images(batch, seed=0):
    return np.random.default_rng(seed).random((batch,) + INPUT_SHAPE, "float32")


def dense_backbone():
    # No BatchNormalization: results do not depend on how a batch is split.
    return [keras.layers.Flatten(), backbones.DenseUnit(16)]


def numpy_dataset(jointly_labelled, num_examples, batch_size):
    """Synthetic data in a fixed order (no shuffle), batched."""
    if jointly_labelled:
        arrays = synthetic.make_synthetic(num_examples)
    else:
        arrays = synthetic.make_synthetic_groups(num_examples)
    return tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size)
