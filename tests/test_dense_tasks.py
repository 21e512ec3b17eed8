"""Dense prediction tasks: losses and streaming metrics against numpy over a
whole split, batched any way and under MirroredStrategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import dense_metrics, tasks
from tf_mtl.backbones import ConvUnit
from tf_mtl.methods import hard_sharing

SIZE = (6, 5)
CLASSES = 4


def _split(seed=0, n=7):
    """Labels and predictions of a small split, with unlabelled pixels."""
    rng = np.random.default_rng(seed)
    semantic = rng.integers(-1, CLASSES, (n, *SIZE)).astype("int32")
    logits = rng.normal(size=(n, *SIZE, CLASSES)).astype("float32")
    depth = np.abs(rng.normal(size=(n, *SIZE, 1))).astype("float32") + 0.5
    depth[rng.random((n, *SIZE)) < 0.3] = 0.0
    depth_pred = rng.normal(size=(n, *SIZE, 1)).astype("float32")
    normal = rng.normal(size=(n, *SIZE, 3))
    normal = (normal / np.linalg.norm(normal, axis=-1, keepdims=True)).astype("float32")
    normal[rng.random((n, *SIZE)) < 0.3] = 0.0
    normal_pred = (normal + rng.normal(scale=0.6, size=normal.shape)).astype("float32")
    return semantic, logits, depth, depth_pred, normal, normal_pred


def _numpy_metrics():
    semantic, logits, depth, depth_pred, normal, normal_pred = _split()
    labelled = semantic >= 0
    truth, guess = semantic[labelled], logits.argmax(-1)[labelled]
    ious = []
    for c in range(CLASSES):
        union = np.sum((truth == c) | (guess == c))
        if union:
            ious.append(np.sum((truth == c) & (guess == c)) / union)
    valid = depth[..., 0] != 0
    error = np.abs(depth_pred - depth)[..., 0][valid]
    has_normal = np.any(normal != 0, axis=-1)
    unit = normal_pred / np.linalg.norm(normal_pred, axis=-1, keepdims=True)
    cosine = np.clip(np.sum(unit * normal, -1)[has_normal], -1, 1)
    angles = np.degrees(np.arccos(cosine))
    return {
        "miou": np.mean(ious), "pixel_accuracy": np.mean(truth == guess),
        "absolute_error": error.mean(), "relative_error": (error / depth[..., 0][valid]).mean(),
        "mean_angle": angles.mean(), "median_angle": np.median(angles),
        "within_11_25": np.mean(angles < 11.25), "within_22_5": np.mean(angles < 22.5),
        "within_30": np.mean(angles < 30),
    }


def _task_list():
    return [tasks.segmentation("semantic", CLASSES, SIZE), tasks.depth("depth", SIZE),
            tasks.surface_normals("normal", SIZE)]


def _streamed(batch_size, strategy=None):
    """Every metric of the three tasks over the split in batches of
    `batch_size`, updated in replica contexts of `strategy` if given."""
    semantic, logits, depth, depth_pred, normal, normal_pred = _split()
    pairs = {"semantic": (semantic, logits), "depth": (depth, depth_pred),
             "normal": (normal, normal_pred)}
    strategy = strategy or tf.distribute.get_strategy()
    results = {}
    for task in _task_list():
        with strategy.scope():
            metrics = [m.build(m.name) for m in task.metrics]
        y_true, y_pred = pairs[task.name]
        data = tf.data.Dataset.from_tensor_slices((y_true, y_pred)).batch(batch_size)

        @tf.function
        def update(batch):
            for metric in metrics:
                metric.update_state(*batch)

        for batch in strategy.experimental_distribute_dataset(data):
            strategy.run(update, (batch,))
        results.update({m.name: float(m.result()) for m in metrics})
    return results


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_metrics_over_a_split_equal_numpy_whatever_the_batching(batch_size):
    expected = _numpy_metrics()
    results = _streamed(batch_size)
    tolerance = {"median_angle": 90 / 18000}  # the histogram's half bin
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, abs=tolerance.get(name, 1e-5)), name


def test_metrics_under_mirrored_strategy_equal_one_device(mirrored):
    assert _streamed(4, mirrored) == pytest.approx(_streamed(7), abs=1e-6)


def test_metric_directions_and_reset():
    directions = {m.name: m.higher_is_better for t in _task_list() for m in t.metrics}
    assert directions == {
        "miou": True, "pixel_accuracy": True, "absolute_error": False,
        "relative_error": False, "mean_angle": False, "median_angle": False,
        "within_11_25": True, "within_22_5": True, "within_30": True}
    metric = dense_metrics.MedianAngleError()
    normal = np.array([[[[0.0, 0.0, 1.0]]]], "float32")
    metric.update_state(normal, np.array([[[[1.0, 0.0, 1.0]]]], "float32"))
    assert float(metric.result()) == pytest.approx(45.0, abs=0.005)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_losses_are_per_example_means_over_valid_pixels():
    semantic, logits, depth, depth_pred, normal, normal_pred = _split()
    segmentation, depth_task, normal_task = _task_list()
    labelled = semantic >= 0
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_softmax, np.maximum(semantic, 0)[..., None], -1)[..., 0]
    expected = [-picked[i][labelled[i]].mean() for i in range(len(semantic))]
    np.testing.assert_allclose(segmentation.loss(semantic, logits), expected, rtol=1e-5)

    valid = depth[..., 0] != 0
    error = np.abs(depth_pred - depth)[..., 0]
    np.testing.assert_allclose(depth_task.loss(depth, depth_pred),
                               [error[i][valid[i]].mean() for i in range(len(depth))],
                               rtol=1e-5)
    has_normal = np.any(normal != 0, axis=-1)
    unit = normal_pred / np.linalg.norm(normal_pred, axis=-1, keepdims=True)
    cosine = np.sum(unit * normal, -1)
    np.testing.assert_allclose(normal_task.loss(normal, normal_pred),
                               [1 - cosine[i][has_normal[i]].mean() for i in range(len(normal))],
                               rtol=1e-5)
    # An image without a labelled pixel adds nothing (not NaN).
    assert float(depth_task.loss(np.zeros((1, *SIZE, 1), "float32"), depth_pred[:1])[0]) == 0


def test_ignore_label_is_allowed_and_other_values_are_refused():
    task = tasks.segmentation("semantic", CLASSES, SIZE)
    assert not task.out_of_range(np.array([-1, 0, CLASSES - 1])).any()
    assert task.out_of_range(np.array([-2, CLASSES])).all()
    with pytest.raises(ValueError, match="ignore_label"):
        tasks.segmentation("semantic", CLASSES, SIZE, ignore_label=0)


def _dense_data(n=6):
    semantic, _, depth, _, normal, _ = _split(n=n)
    images = np.random.default_rng(1).random((n, *SIZE, 3)).astype("float32")
    labels = {"semantic": semantic, "depth": depth, "normal": normal}
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(3)


def _model(task_list):
    return hard_sharing([ConvUnit(8, 3), ConvUnit(8, 3, strides=2)],
                        task_list, (*SIZE, 3))


def test_dense_tasks_train_save_and_reload(tmp_path):
    model = _model(_task_list())
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(_dense_data(), epochs=3, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    results = model.evaluate(_dense_data(), return_dict=True, verbose=0)
    model.save(tmp_path / "dense.keras")
    reloaded = keras.saving.load_model(tmp_path / "dense.keras", safe_mode=True)
    reloaded.compile(optimizer=keras.optimizers.Adam(1e-2))
    again = reloaded.evaluate(_dense_data(), return_dict=True, verbose=0)
    assert again == pytest.approx(results, rel=1e-5)


def test_a_label_below_the_ignore_label_is_refused_before_training():
    semantic, _, depth, _, normal, _ = _split(n=3)
    semantic[2, 1, 1] = -3
    images = np.zeros((3, *SIZE, 3), "float32")
    data = tf.data.Dataset.from_tensor_slices(
        (images, {"semantic": semantic, "depth": depth, "normal": normal})).batch(3)
    with pytest.raises(ValueError, match="Label -3 of task 'semantic'"):
        _model(_task_list()).check_dataset(data, "x")
