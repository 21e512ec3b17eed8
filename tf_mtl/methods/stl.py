"""Single-task learning: one backbone per task, trained in T runs.

STL is the reference of MPPS eq. (5). Each task gets its own one-task
`MultiTaskModel`, trained by the same trainer on `task_view` of the data, so
STL and the multi-task methods share every line of the training loop. T runs
rather than one model with T backbones: each run is a plain model whose
export is a plain single-task network, and a task's run never pays for the
others' data (non-jointly labelled data shrinks to that task's examples).
"""

import tensorflow as tf

from tf_mtl.methods.method import Method
from tf_mtl.model import MultiTaskModel


def single_task(backbone, task, input_shape):
    """A one-task model on its own `backbone`."""
    return MultiTaskModel(backbone, [task], input_shape, jointly_labelled=True)


def task_view(dataset, task_index, task_name, jointly_labelled):
    """The examples and labels of one task, as `(x, {task_name: y})`."""
    if jointly_labelled:
        return dataset.map(lambda x, labels: (x, {task_name: labels[task_name]}))
    # Filtering batches keeps their structure: drop other tasks' rows.
    def select(x, task_ids, y):
        keep = tf.equal(tf.cast(task_ids, tf.int32), task_index)
        return tf.boolean_mask(x, keep), {task_name: tf.boolean_mask(y, keep)}

    return dataset.map(select).filter(lambda x, labels: tf.shape(x)[0] > 0)


METHODS = (Method("stl", "single-task learning, one model per task", single_task=True),)
