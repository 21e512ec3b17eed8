"""Shared pytest set-up.

TensorFlow is configured at import of this file, before any test module
imports it: two logical CPU devices let `tf.distribute.MirroredStrategy` run
on a machine with one CPU, as DESIGN.md asks of the distribution tests.
"""

import gc
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
# TensorFlow's and Keras' modules live as long as the worker: leaving their
# 400,000 objects out of every later collection makes each one cheap.
gc.freeze()


@pytest.fixture(autouse=True)
def fresh_keras_state():
    """Same seeds before every test; no Keras state carried between tests.

    Without a garbage collection: `clear_session()`'s own `gc.collect()` walks
    every object TensorFlow and the earlier tests left, 0.3 s at the start of
    a worker and 2.5 s near its end, about 45 % of the suite's time. Python's
    own collector still runs as objects accumulate.
    """
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session(free_memory=False)


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


@pytest.fixture
def own_inference_results():
    """`results(model, dataset)`: each task's mean loss and accuracy on a
    jointly labelled split from its own inference pass (its rows alone
    through the backbone and its head), `{task}_loss` and `{task}_accuracy`:
    what `model.evaluate` must report."""
    import numpy as np

    from tf_mtl.backbones import run_layers
    from tf_mtl.layers.routes import Tiled

    def results(model, dataset):
        losses, hits = {}, {}
        for x, labels in dataset:
            for t, task in enumerate(model.tasks):
                features, _ = run_layers(model.backbone, x, Tiled([t]), False)
                preds = model.heads[task.name](features, training=False)
                y = labels[task.name]
                losses.setdefault(task.name, []).append(task.loss(y, preds).numpy())
                hits.setdefault(task.name, []).append(
                    (np.argmax(preds, -1) == y.numpy()).astype("float32"))
        return {**{f"{n}_loss": np.concatenate(v).mean() for n, v in losses.items()},
                **{f"{n}_accuracy": np.concatenate(v).mean() for n, v in hits.items()}}

    return results
