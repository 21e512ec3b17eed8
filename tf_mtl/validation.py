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
    """Raises an error naming the task, key or shape at fault when `dataset`
    does not fit `model`: wrong layout, unknown or missing task, wrong rank or
    shape, empty data, NaN labels or task ids out of range in the first batch.
    Later NaN labels are caught in the training step itself.
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
    _check_shape(x_spec, model.example_shape, "Inputs", argument)
    _check_first_batch(model, dataset, argument)


def _check_first_batch(model, dataset, argument):
    batch = next(iter(dataset.take(1)), None)
    if batch is None:
        raise ValueError(f"`{argument}` is empty: it yields no batch.")
    if model.jointly_labelled:
        labels = batch[1]
    else:
        task_ids = batch[1].numpy()
        bad = task_ids[(task_ids < 0) | (task_ids >= model.num_tasks)]
        if bad.size:
            raise ValueError(
                f"Task id {int(bad[0])} in `{argument}` is out of range: the "
                f"model has tasks 0..{model.num_tasks - 1} = "
                f"{list(model.task_names)}."
            )
        labels = dict(zip(
            model.task_names,
            tf.dynamic_partition(batch[2], tf.cast(batch[1], tf.int32), model.num_tasks),
        ))
    for name, y in labels.items():
        if y.dtype.is_floating and not np.isfinite(y.numpy()).all():
            raise ValueError(
                f"NaN or Inf in the labels of task {name!r} in `{argument}`."
            )
