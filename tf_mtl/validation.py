"""Checks of a dataset against a model, run before any training step."""

import numpy as np
import tensorflow as tf


def _shape(spec):
    return tuple(spec.shape.as_list()) if spec.shape.rank is not None else None


def _check_shape(spec, expected, what, argument):
    """`expected` is the shape of one example; the spec has a batch axis."""
    shape = _shape(spec)
    want = (None,) + tuple(expected)
    if shape is None or len(shape) != len(want) or any(
        a is not None and b is not None and a != b for a, b in zip(shape, want)
    ):
        raise ValueError(
            f"{what} in `{argument}` have shape {shape}; expected "
            f"(batch,) + {tuple(expected)}, i.e. {want}."
        )


def _structure_error(model, argument, spec):
    layout = (
        "(image, {task_name: label}) for jointly labelled data"
        if model.jointly_labelled
        else "(image, task_id, label) for non-jointly labelled data"
    )
    return ValueError(
        f"`{argument}` must yield batches of {layout} with tasks "
        f"{list(model.task_names)}. It yields: {spec}"
    )


def check_dataset(model, dataset, argument):
    """Raises an error naming the task, key, value or batch at fault when
    `dataset` does not fit `model`, before any step runs; returns the number
    of examples of each task (None when the data are endless).

    Checked from the element spec: the layout, unknown or missing tasks,
    ranks and shapes, class ids of a floating dtype. Then one pass over the
    data (the first batch only of an endless dataset) checks every batch:
    inputs and floating labels finite, class ids in `[0, classes)`, task ids
    in range, and counts each task's examples. What the pass cannot see
    (batches of an endless dataset after its first) the training step checks
    in the graph (`tf_mtl.objective.task_loss`).
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"`{argument}` must be a batched tf.data.Dataset. "
            f"Received: {type(dataset).__name__}"
        )
    spec = dataset.element_spec
    label_shapes = {t.name: t.label_shape for t in model.tasks}
    if model.jointly_labelled:
        if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict)):
            raise _structure_error(model, argument, spec)
        x_spec, label_specs = spec
        for name in label_specs:
            if name not in label_shapes:
                raise ValueError(
                    f"Unknown task {name!r} in the labels of `{argument}`. "
                    f"The model's tasks are {list(model.task_names)}."
                )
        for name in model.task_names:
            if name not in label_specs:
                raise ValueError(
                    f"No label for task {name!r} in `{argument}`: its labels "
                    f"hold {sorted(label_specs)}."
                )
            _check_shape(label_specs[name], label_shapes[name],
                         f"Labels of task {name!r}", argument)
    else:
        if not (isinstance(spec, tuple) and len(spec) == 3
                and not isinstance(spec[2], dict)):
            raise _structure_error(model, argument, spec)
        x_spec, id_spec, label_spec = spec
        if not id_spec.dtype.is_integer:
            raise ValueError(
                f"Task ids in `{argument}` must be integers. "
                f"Received dtype: {id_spec.dtype.name}"
            )
        _check_shape(id_spec, (), "Task ids", argument)
        for name, shape in label_shapes.items():
            _check_shape(label_spec, shape, f"Labels of task {name!r}", argument)
        label_specs = {name: label_spec for name in model.task_names}
    for task in model.tasks:
        dtype = label_specs[task.name].dtype
        if task.classes is not None and not dtype.is_integer:
            raise ValueError(
                f"Labels of task {task.name!r} in `{argument}` are {dtype.name}: "
                f"class ids must be integers in [0, {task.classes}) "
                "(a float label would be truncated; cast them on purpose, "
                "e.g. tf.cast(label, tf.int32), if they are whole numbers).")
    _check_shape(x_spec, model.example_shape, "Inputs", argument)
    return _check_batches(model, dataset, argument)


def _check_batches(model, dataset, argument):
    endless = dataset.cardinality() == tf.data.INFINITE_CARDINALITY
    counts = np.zeros(model.num_tasks, np.int64)
    batches = dataset.take(1) if endless else dataset
    for index, batch in enumerate(batches.as_numpy_iterator()):
        where = f"batch {index} of `{argument}`"
        x = batch[0]
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            example = int(np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(1))[0])
            raise ValueError(f"NaN or Inf in the inputs of {where} (its example "
                             f"{example}).")
        if model.jointly_labelled:
            labels = batch[1]
            counts += len(x)
        else:
            task_ids, y = batch[1], batch[2]
            bad = task_ids[(task_ids < 0) | (task_ids >= model.num_tasks)]
            if bad.size:
                raise ValueError(
                    f"Task id {int(bad[0])} in {where} is out of range: the "
                    f"model has tasks 0..{model.num_tasks - 1} = "
                    f"{list(model.task_names)}."
                )
            labels = {name: y[task_ids == t] for t, name in enumerate(model.task_names)}
            counts += np.bincount(task_ids, minlength=model.num_tasks)
        for task in model.tasks:
            _check_labels(task, labels[task.name], where)
    if not endless and not counts.any():
        raise ValueError(f"`{argument}` is empty: it yields no batch.")
    return None if endless else counts


def _check_labels(task, y, where):
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        raise ValueError(f"NaN or Inf in the labels of task {task.name!r} in {where}.")
    if task.classes is not None:
        bad = y[task.out_of_range(y)]
        if bad.size:
            raise ValueError(
                f"Label {bad.flat[0]} of task {task.name!r} in {where} is out of "
                f"range: its class ids are 0..{task.classes - 1}.")
