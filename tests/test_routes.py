"""Routes: how rows without a task enter the task-conditioned part."""

import numpy as np
import tensorflow as tf

import tf_mtl
from tf_mtl.layers.routes import DataRouted, Recorded, Tiled, tiled_tasks
from tf_mtl.task_gradients import RepresentationTap

from helpers import INPUT_SHAPE, dense_backbone, images, two_tasks


def test_tiled_repeats_the_batch_once_per_task_and_declares_its_blocks():
    rows = tf.constant([[1.0], [2.0]])
    routed, task_ids = Tiled([2, 0])(rows)
    np.testing.assert_array_equal(routed[:, 0], [1, 2, 1, 2])
    np.testing.assert_array_equal(task_ids, [2, 2, 0, 0])
    assert Tiled(3).tasks == (0, 1, 2)
    assert tiled_tasks() is None
    with Tiled([2, 0]).scope():
        assert tiled_tasks() == (2, 0)
        assert tiled_tasks(num_tasks=2) is None  # task 2 is not a 2-task layer's
        with Tiled([1]).scope():
            assert tiled_tasks() == (1,)
        assert tiled_tasks() == (2, 0)
    assert tiled_tasks() is None


def test_data_routed_rows_keep_their_rows_and_declare_no_blocks():
    rows, task_ids = tf.ones((3, 2)), tf.constant([1, 0, 1])
    route = DataRouted(task_ids)
    routed, ids = route(rows)
    assert routed is rows and ids is task_ids and route.tasks is None
    with route.scope():
        assert tiled_tasks() is None


def test_recorded_route_records_each_entry_cut_from_the_stem():
    entries = []
    route = Recorded(Tiled(2), lambda *entry: entries.append(entry))
    w = tf.Variable(3.0)
    with tf.GradientTape() as tape:
        rows = w * tf.ones((2, 1))
        routed, _ = route(rows)
    (source, recorded, task_ids), = entries
    assert source is rows and recorded is routed and route.tasks == (0, 1)
    np.testing.assert_array_equal(task_ids, [0, 0, 1, 1])
    assert tape.gradient(routed, w) is None


def test_a_data_routed_tap_records_the_rows_entering_the_heads_once():
    model = tf_mtl.MultiTaskModel(dense_backbone(), two_tasks(), INPUT_SHAPE,
                                  jointly_labelled=False)
    with tf.GradientTape(persistent=True) as tape:
        tap = RepresentationTap(2, tape)
        features, task_ids = model.features(images(4), tf.constant([0, 1, 1, 0]),
                                            training=True, tap=tap)
    assert len(tap.routed) == 1 and tap.routed[0] is features
    np.testing.assert_array_equal(task_ids, [0, 1, 1, 0])
