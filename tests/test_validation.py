"""Tests of `tf_mtl.validation`: bad data is rejected before any step runs,
with a message naming the task, key, shape or argument at fault."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mtl
from tf_mtl import methods
from tf_mtl.data import synthetic
from tf_mtl.tasks import Task, classification

INPUT_SHAPE = (28, 28, 1)
NAMES = ("task_0", "task_1")


def backbone():
    return [keras.layers.Flatten(), tf_mtl.backbones.DenseUnit(8)]


def joint_model():
    model = methods.hard_sharing(
        backbone(), [classification(n, 3) for n in NAMES], INPUT_SHAPE
    )
    model.compile(optimizer="sgd")
    return model


def non_joint_model():
    model = methods.hard_sharing(
        backbone(), [classification(n, 3) for n in NAMES], INPUT_SHAPE,
        jointly_labelled=False,
    )
    model.compile(optimizer="sgd")
    return model


def regression_task(name="level"):
    """A float label of shape () scored by the squared error."""
    return Task(
        name, head=lambda: keras.layers.Dense(1),
        loss=lambda y_true, y_pred: tf.square(y_true - y_pred[:, 0]),
    )


def regression_model():
    model = tf_mtl.MultiTaskModel(backbone(), [regression_task()], INPUT_SHAPE)
    model.compile(optimizer="sgd")
    return model


def joint_dataset(num_examples=8, batch_size=4, x=None, labels=None):
    arrays = synthetic.make_synthetic(num_examples)
    x = arrays[0] if x is None else x
    labels = arrays[1] if labels is None else labels
    return tf.data.Dataset.from_tensor_slices((x, labels)).batch(batch_size)


def non_joint_dataset(task_ids=None):
    x, ids, y = synthetic.make_synthetic_groups(8)
    ids = ids if task_ids is None else np.asarray(task_ids)
    return tf.data.Dataset.from_tensor_slices((x, ids, y)).batch(4)


def regression_dataset(levels, batch_size=4):
    x = np.random.default_rng(0).random((len(levels),) + INPUT_SHAPE, "float32")
    labels = {"level": np.asarray(levels, "float32")}
    return tf.data.Dataset.from_tensor_slices((x, labels)).batch(batch_size)


def assert_fit_rejects(model, dataset, error, match):
    with pytest.raises(error, match=match):
        model.fit(dataset, epochs=1, verbose=0)
    assert model.train_function is None  # No training step was built.
    assert int(model.optimizer.iterations) == 0


def test_unknown_task_in_labels():
    x, labels = synthetic.make_synthetic(8)
    labels["task_9"] = labels["task_0"]

    assert_fit_rejects(
        joint_model(), joint_dataset(labels=labels), ValueError,
        r"Unknown task 'task_9' in the labels of `x`.*\['task_0', 'task_1'\]",
    )


def test_missing_label_of_a_task():
    x, labels = synthetic.make_synthetic(8)
    del labels["task_1"]

    assert_fit_rejects(
        joint_model(), joint_dataset(labels=labels), ValueError,
        r"No label for task 'task_1' in `x`.*\['task_0'\]",
    )


def test_labels_of_wrong_rank():
    x, labels = synthetic.make_synthetic(8)
    labels["task_0"] = labels["task_0"][:, None]

    assert_fit_rejects(
        joint_model(), joint_dataset(labels=labels), ValueError,
        r"Labels of task 'task_0' in `x` have shape \(None, 1\); "
        r"expected \(batch,\) \+ \(\)",
    )


@pytest.mark.parametrize("shape", [(28, 28), (32, 32, 1), (28, 28, 3)])
def test_images_of_wrong_shape(shape):
    x = np.zeros((8,) + shape, "float32")

    assert_fit_rejects(
        joint_model(), joint_dataset(x=x), ValueError,
        r"Inputs in `x` have shape \(None, " + ", ".join(map(str, shape))
        + r"\); expected \(batch,\) \+ \(28, 28, 1\)",
    )


def test_nan_in_a_float_label_of_the_first_batch():
    assert_fit_rejects(
        regression_model(), regression_dataset([0.5, np.nan, 0.2, 0.1]),
        ValueError, "NaN or Inf in the labels of task 'level' in batch 0 of `x`",
    )


def test_inf_in_a_non_joint_float_label_names_its_task():
    model = tf_mtl.MultiTaskModel(
        backbone(), [regression_task("a"), regression_task("b")], INPUT_SHAPE,
        jointly_labelled=False,
    )
    model.compile(optimizer="sgd")
    x = np.zeros((4,) + INPUT_SHAPE, "float32")
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, np.array([0, 1, 0, 1]), np.array([0.0, np.inf, 1.0, 2.0], "float32"))
    ).batch(4)

    assert_fit_rejects(model, dataset, ValueError,
                       "NaN or Inf in the labels of task 'b'")


def test_empty_dataset():
    dataset = joint_dataset().take(0)

    assert_fit_rejects(joint_model(), dataset, ValueError,
                       "`x` is empty: it yields no batch")


@pytest.mark.parametrize("bad_id", [2, -1])
def test_non_joint_task_id_out_of_range(bad_id):
    dataset = non_joint_dataset(task_ids=[0, 1, bad_id, 0, 1, 0, 1, 0])

    assert_fit_rejects(
        non_joint_model(), dataset, ValueError,
        rf"Task id {bad_id} in batch 0 of `x` is out of range: the model has tasks 0..1",
    )


def test_non_joint_float_task_ids():
    dataset = non_joint_dataset(task_ids=np.zeros(8, "float32"))

    assert_fit_rejects(non_joint_model(), dataset, ValueError,
                       "Task ids in `x` must be integers.*float32")


def test_non_joint_data_to_a_jointly_labelled_model():
    assert_fit_rejects(
        joint_model(), non_joint_dataset(), ValueError,
        r"`x` must yield batches of \(image, \{task_name: label\}\) for "
        r"jointly labelled data",
    )


def test_jointly_labelled_data_to_a_non_joint_model():
    assert_fit_rejects(
        non_joint_model(), joint_dataset(), ValueError,
        r"`x` must yield batches of \(image, task_id, label\) for "
        r"non-jointly labelled data",
    )


@pytest.mark.parametrize(
    "x", [np.zeros((4,) + INPUT_SHAPE, "float32"), [1, 2]],
    ids=["ndarray", "list"],
)
def test_not_a_dataset(x):
    assert_fit_rejects(
        joint_model(), x, TypeError,
        "`x` must be a batched tf.data.Dataset. Received: " + type(x).__name__,
    )


def test_unbatched_dataset_is_a_shape_error():
    x, labels = synthetic.make_synthetic(4)
    dataset = tf.data.Dataset.from_tensor_slices((x, labels))

    assert_fit_rejects(joint_model(), dataset, ValueError,
                       "Labels of task 'task_0' in `x` have shape \\(\\)")


def test_bad_validation_data_is_named():
    model = joint_model()
    x, labels = synthetic.make_synthetic(8)
    del labels["task_0"]
    validation = joint_dataset(labels=labels)

    with pytest.raises(ValueError, match="No label for task 'task_0' in "
                                         "`validation_data`"):
        model.fit(joint_dataset(), validation_data=validation, verbose=0)
    assert model.train_function is None


def test_evaluate_checks_its_data():
    model = joint_model()

    with pytest.raises(ValueError, match="`x` must yield batches"):
        model.evaluate(non_joint_dataset(), verbose=0)
    assert model.test_function is None


def test_nan_in_a_later_batch_is_refused_before_training():
    model = regression_model()
    dataset = regression_dataset([0.1, 0.2, 0.3, 0.4, 0.5, np.nan], batch_size=2)
    assert_fit_rejects(model, dataset, ValueError,
                       "NaN or Inf in the labels of task 'level' in batch 2 of `x`")


def test_nan_label_of_endless_data_is_caught_by_the_training_step():
    # An endless dataset is checked on its first batch; the step checks the rest.
    model = regression_model()
    initial = model.get_weights()
    dataset = regression_dataset([0.1, 0.2, 0.3, 0.4, 0.5, np.nan], batch_size=2).repeat()

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="NaN or Inf in the labels of task 'level'"):
        model.fit(dataset, epochs=1, steps_per_epoch=3, verbose=0)
    # The steps trained on the clean batches and stopped at the NaN before
    # it reached a weight.
    weights = model.get_weights()
    assert all(np.isfinite(w).all() for w in weights)
    assert any(not np.array_equal(w, w0) for w, w0 in zip(weights, initial))


@pytest.mark.parametrize("batch", [0, 1])
def test_class_id_out_of_range_is_refused_before_training(batch):
    x, labels = synthetic.make_synthetic(8)
    labels["task_1"][4 * batch + 1] = 12
    assert_fit_rejects(joint_model(), joint_dataset(labels=labels), ValueError,
                       f"Label 12 of task 'task_1' in batch {batch} of `x` is out of "
                       r"range: its class ids are 0..2")


def test_class_id_out_of_range_of_endless_data_names_its_task_in_the_step():
    x, labels = synthetic.make_synthetic(8)
    labels["task_0"][5] = -1
    model = joint_model()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"Task task_0: class ids outside 0..2:"):
        model.fit(joint_dataset(labels=labels).repeat(), epochs=1, steps_per_epoch=2,
                  verbose=0)
    assert int(model.optimizer.iterations) == 1  # the first batch's step only


def test_float_class_ids_are_refused_naming_the_task_and_dtype():
    x, labels = synthetic.make_synthetic(8)
    labels["task_0"] = labels["task_0"].astype("float32") + np.float32(0.7)
    assert_fit_rejects(joint_model(), joint_dataset(labels=labels), ValueError,
                       "Labels of task 'task_0' in `x` are float32: class ids must be "
                       "integers")


def test_a_nan_pixel_is_refused_naming_its_batch():
    x, _ = synthetic.make_synthetic(8)
    x[6, 3, 3, 0] = np.nan
    assert_fit_rejects(joint_model(), joint_dataset(x=x), ValueError,
                       r"NaN or Inf in the inputs of batch 1 of `x` \(its example 2\)")


def test_an_infinite_loss_mid_training_stops_before_it_reaches_a_weight():
    model = regression_model()
    dataset = regression_dataset([0.1, 0.2, 1e38, 1e38], batch_size=2)  # finite labels
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="training objective is NaN or Inf at step.*1"):
        model.fit(dataset, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 1
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_a_dataset_smaller_than_one_batch_trains():
    model = joint_model()
    history = model.fit(joint_dataset(num_examples=3, batch_size=32), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_a_task_with_one_class_is_refused():
    with pytest.raises(ValueError, match="Task 'flat': `num_classes` must be >= 2"):
        classification("flat", 1)


def test_clean_float_labels_pass():
    model = regression_model()

    history = model.fit(regression_dataset([0.1, 0.2, 0.3, 0.4]), verbose=0)

    assert np.isfinite(history.history["level_loss"][0])
