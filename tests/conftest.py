"""Shared pytest set-up.

TensorFlow is configured at import of this file, before any test module
imports it: two logical CPU devices let `tf.distribute.MirroredStrategy` run
on a machine with one CPU, as DESIGN.md asks of the distribution tests.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Must run before TensorFlow initialises its devices, hence at import.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2,
)


@pytest.fixture(autouse=True)
def fresh_keras_state():
    """Same seeds before every test; no Keras state carried between tests."""
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy on the two logical CPUs for the whole session.

    Strategies made one after another in a process can reuse collective
    instance keys and then fail with a shape mismatch (a TensorFlow
    limitation); one shared strategy keeps its keys unique.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def mirrored_pair(mirrored):
    """`pair(build)`: the model `build()` makes on one device and under the
    two-CPU MirroredStrategy, with the same weights, both compiled with
    SGD(0.1)."""
    def pair(build):
        single = build()
        with mirrored.scope():
            distributed = build()
            distributed.set_weights(single.get_weights())
            distributed.compile(optimizer=keras.optimizers.SGD(0.1))
        single.compile(optimizer=keras.optimizers.SGD(0.1))
        return single, distributed

    return pair
