"""Training on real Fashion-MNIST data (slow; needs dataset-fashion-mnist)."""

import os

import keras
import pytest

from tf_mtl import backbones, data
from tf_mtl.data.fashion_mnist import DEFAULT_DATA_DIR
from tf_mtl.methods import hard_sharing
from tf_mtl.tasks import classification

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        not os.path.exists(os.path.join(DEFAULT_DATA_DIR, "train-images-idx3-ubyte.gz")),
        reason="apt-get install dataset-fashion-mnist",
    ),
]


def test_hps_learns_multifashion():
    mf = data.load("multifashion", batch_size=64, limit=6000)
    tasks = [classification(n, k) for n, k in mf.task_classes.items()]
    model = hard_sharing(backbones.lenet(0.5), tasks, (28, 28, 1))
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    model.fit(mf.train, epochs=2, verbose=0)
    results = model.evaluate(mf.test, return_dict=True, verbose=0)
    # Chance is 0.10. Measured 0.75 / 0.72 (seed 0, 2 epochs on 6000
    # examples); the margin absorbs seeds and platforms.
    assert results["left_accuracy"] > 0.5
    assert results["right_accuracy"] > 0.5
