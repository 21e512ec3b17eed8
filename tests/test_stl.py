"""Tests of `tf_mtl.methods.stl`: `task_view` (one task's view of a data set)
and `single_task` (single-task learning), exported as `tf_mtl.methods.task_view`
and `tf_mtl.methods.single_task`."""

import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import backbones, data, methods
from tf_mtl.data import synthetic
from tf_mtl.tasks import classification

from helpers import INPUT_SHAPE, NAMES


def test_task_view_of_jointly_labelled_data_keeps_one_task():
    x, labels = synthetic.make_synthetic(40)
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16)

    view = methods.task_view(dataset, 1, "task_1", jointly_labelled=True)

    batches = list(view)
    assert set(view.element_spec[1]) == {"task_1"}
    np.testing.assert_array_equal(
        np.concatenate([b[1]["task_1"] for b in batches]), labels["task_1"]
    )
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)


@pytest.mark.parametrize("task", [0, 1])
def test_task_view_of_non_joint_data_keeps_that_tasks_examples(task):
    x, task_ids, y = synthetic.make_synthetic_groups(40)
    dataset = tf.data.Dataset.from_tensor_slices((x, task_ids, y)).batch(8)
    name = NAMES[task]

    view = methods.task_view(dataset, task, name, jointly_labelled=False)

    batches = list(view)
    assert all(len(b[0]) > 0 for b in batches)
    labels = np.concatenate([b[1][name] for b in batches])
    assert len(labels) == data.task_counts(dataset, 2)[task]
    np.testing.assert_array_equal(labels, y[task_ids == task])
    np.testing.assert_array_equal(
        np.concatenate([b[0] for b in batches]), x[task_ids == task]
    )


@pytest.mark.parametrize("dataset", ["synthetic", "synthetic_groups"])
def test_single_task_model_fits_a_task_view(dataset):
    splits = data.load(dataset, batch_size=32, limit=64)
    task = classification("task_1", 3)
    model = methods.single_task(backbones.lenet(0.25), task, INPUT_SHAPE)
    model.compile(optimizer="adam")
    view = methods.task_view(splits.train, 1, "task_1", splits.jointly_labelled)

    history = model.fit(view, epochs=1, verbose=0).history

    assert model.task_names == ("task_1",)
    assert set(history) == {"loss", "task_1_loss", "task_1_accuracy"}
    np.testing.assert_allclose(history["loss"], history["task_1_loss"], rtol=1e-5)
    assert np.isfinite(history["loss"][0])

