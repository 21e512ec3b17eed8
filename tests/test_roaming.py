"""Maximum Roaming and fixed partitioning: the partition layer, the update
plan's Lemmas 1 and 2, training, saving, resuming and export."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import backbones, data, methods
from tf_mtl.callbacks import MaximumRoaming
from tf_mtl.layers import ChannelPartition
from tf_mtl.layers.partition import filter_similarity, initial_partition, roam_step
from tf_mtl.tasks import classification

SHAPE = (28, 28, 1)
TASKS = [classification("task_0", 3), classification("task_1", 3)]


def _layer(num_tasks=3, channels=24, sharing_ratio=0.5, seed=0):
    layer = ChannelPartition(num_tasks, sharing_ratio, seed=seed)
    layer.build((None, channels))
    return layer


def test_initial_partition_covers_every_channel_with_equal_counts():
    for p in (0.1, 0.3, 0.5, 0.8, 1.0):
        m = initial_partition(3, 40, p, seed=1) > 0
        assert m.any(axis=0).all()  # constraint 3
        cover = np.bincount(np.arange(40) % 3)  # channel j first goes to task j mod T
        np.testing.assert_array_equal(m.sum(axis=1), np.maximum(round(p * 40), cover))


def test_each_task_uses_its_own_channels():
    layer = _layer(num_tasks=2, channels=6)
    x = tf.ones((4, 6))
    y = layer(x, tf.constant([0, 1, 1, 0]))
    np.testing.assert_array_equal(y, layer.partition.numpy()[[0, 1, 1, 0]])


def test_lemma_1_counts_constant_plan_length_and_full_visit():
    channels, p = 24, 0.5
    layer = _layer(channels=channels, sharing_ratio=p)
    counts = layer.partition.numpy().sum(axis=1)
    updates = 0
    while layer.roam():
        updates += 1
        np.testing.assert_array_equal(layer.partition.numpy().sum(axis=1), counts)
        assert layer.update_ratio() == pytest.approx(updates / ((1 - p) * channels))
    assert updates == (1 - p) * channels  # Lemma 1.1
    assert (layer.visited.numpy() == 1).all()  # every task visited every channel
    assert not layer.roam()  # the plan is over


def test_completion_rate_stops_the_plan():
    layer = _layer(channels=24, sharing_ratio=0.5)
    while layer.roam(completion=0.5):
        pass
    assert int(layer.updates.numpy()) == 6 and layer.update_ratio() == 0.5
    fixed = _layer(seed=3)
    before = fixed.partition.numpy()
    assert not fixed.roam(completion=0.0)  # Task Routing: never moves
    np.testing.assert_array_equal(fixed.partition.numpy(), before)


def test_lemma_2_mean_overlap_is_constant_for_independent_partitions():
    # Lemma 2's premise: each task's channels drawn uniformly and
    # independently (P(m_it = 1) the same for every i, t).
    num_tasks, channels, count, plans = 3, 20, 10, 4000
    rng = np.random.default_rng(0)
    overlaps = np.zeros((plans, channels - count + 1))
    for n in range(plans):
        active = np.zeros((num_tasks, channels), bool)
        for t in range(num_tasks):
            active[t, rng.choice(channels, count, replace=False)] = True
        visited = active.copy()
        for c in range(channels - count + 1):
            overlaps[n, c] = np.mean([(active[s] & active[t]).mean()
                                      for s in range(3) for t in range(s + 1, 3)])
            if c < channels - count:
                roam_step(active, visited, rng)
    mean = overlaps.mean(axis=0)
    error = overlaps.std(axis=0).max() / np.sqrt(plans)
    np.testing.assert_allclose(mean, (count / channels) ** 2, atol=4 * error)


def test_least_aligned_selection_follows_filter_alignment():
    # 4 output channels of a 1x1x2 kernel: 0 and 1 aligned, 2 orthogonal to
    # them, 3 between.
    kernel = np.array([[1.0, 0.9, 0.0, 0.7], [0.0, 0.1, 1.0, 0.7]])[None, None]
    similarity = filter_similarity(kernel)
    np.testing.assert_allclose(similarity[0, 2], 0.0, atol=1e-7)
    np.testing.assert_allclose(np.diag(similarity), 1.0, rtol=1e-6)
    active = np.array([[True, True, False, False]])
    visited = active.copy()
    roam_step(active, visited, None, similarity)
    # Leaves: one of the aligned pair (0 or 1, the most aligned to the rest);
    # joins: channel 2, least aligned with {0, 1}.
    assert active[0, 2] and visited[0, 2] and active.sum() == 2
    assert not (active[0, 0] and active[0, 1])


def _model(joint=True, routing="tiled", p=0.5):
    return methods.maximum_roaming(backbones.lenet(0.25), TASKS, SHAPE, joint,
                                   sharing_ratio=p, seed=1, routing=routing)


def test_tiled_training_equals_one_pass_per_task():
    # The paper runs one forward pass per task: sequential routing.
    ds = data.load("synthetic", batch_size=32, limit=64)
    models = [_model(routing=r) for r in ("tiled", "sequential")]
    models[1].set_weights(models[0].get_weights())
    for model in models:
        model.compile(optimizer=keras.optimizers.SGD(0.05))
        model.fit(ds.train, epochs=1, verbose=0)
    # Every weight but the moving statistics of the first block's
    # normalisation, before the first partition: one pass of the tiled model
    # updates them once, and the sequential model (like the paper's T
    # passes) T times with the same batch statistics.
    stem = {id(w) for w in models[0].backbone[0].norm.non_trainable_variables}
    for a, b in zip(models[0].weights, models[1].weights, strict=True):
        if id(a) not in stem:
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5,
                                       err_msg=a.path)


@pytest.mark.parametrize("joint", [True, False])
def test_callback_roams_every_interval_and_logs(joint):
    ds = data.load("synthetic" if joint else "synthetic_groups", batch_size=32, limit=128)
    model = _model(joint)
    model.compile(optimizer="adam")
    roaming = MaximumRoaming(interval=0.5)  # every 2 of the 4 steps per epoch
    history = model.fit(ds.train, epochs=2, verbose=0, callbacks=[roaming]).history
    updates = [int(p.updates.numpy()) for p in model.conditioned_layers]
    # 4 updates, or the layer's whole plan when shorter.
    assert updates == [min(4, p.plan_length()) for p in model.conditioned_layers]
    assert len(history["update_ratio"]) == 2 and history["update_ratio"][1] > 0
    assert 0 < history["overlap"][0] <= 1
    assert [r["epoch"] for r in roaming.history] == [0, 1]
    with pytest.raises(ValueError, match="completion"):
        MaximumRoaming(completion=1.5)


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_callback_counts_interval_boundaries_not_batches(steps_per_execution):
    # With 4 steps per call, each callback batch crosses 4 one-step
    # intervals: the plan still takes one update per interval.
    ds = data.load("synthetic", batch_size=32, limit=128)
    model = _model()
    model.compile(optimizer="adam", steps_per_execution=steps_per_execution)
    model.fit(ds.train, epochs=1, verbose=0, callbacks=[MaximumRoaming(interval=0.25)])
    assert [int(p.updates.numpy()) for p in model.conditioned_layers] == [
        min(4, p.plan_length()) for p in model.conditioned_layers]


def test_site_kernel_of_a_block_without_site_layers_is_a_clear_error():
    from tf_mtl import backbones

    with pytest.raises(ValueError, match="site_layers"):
        backbones.Block(name="mine").site_kernel(0)


def test_least_aligned_callback_reads_each_site_kernel():
    ds = data.load("synthetic", batch_size=32, limit=64)
    model = _model()
    model.compile(optimizer="adam")
    model.fit(ds.train, epochs=1, verbose=0,
              callbacks=[MaximumRoaming(interval=1.0, selection="least_aligned")])
    assert all(int(p.updates.numpy()) == 1 for p in model.conditioned_layers)


def test_inference_serves_each_task_its_mask_alone_or_in_a_batch():
    # Normalisation keeps running statistics (not the reference code's
    # batch statistics at evaluation): a prediction does not depend on the
    # other images of its batch, so one image at a time (edge devices) gets
    # what a batch gets.
    ds = data.load("synthetic", batch_size=32, limit=64)
    model = _model()
    model.compile(optimizer="adam")
    model.fit(ds.train, epochs=1, verbose=0, callbacks=[MaximumRoaming(interval=0.5)])
    x = next(iter(ds.test))[0][:5]
    batch = model(x)
    for i in range(5):
        alone = model(x[i:i + 1])
        for name in batch:
            np.testing.assert_allclose(alone[name][0], batch[name][i], rtol=1e-5, atol=1e-6)
    # Each task its own mask: swapping the partitions changes the outputs.
    partition = model.conditioned_layers[-1]
    partition.partition.assign(partition.partition.numpy()[::-1])
    assert not np.allclose(model(x)["task_0"], batch["task_0"])


def test_evaluate_equals_each_tasks_own_inference_pass(own_inference_results):
    # Training normalises each task with its own batch statistics; so must
    # evaluation, with each task's own moving statistics.
    ds = data.load("synthetic", batch_size=32, limit=64)
    model = _model(p=0.5)
    means = [w for w in model.non_trainable_weights if w.name == "moving_mean"]
    assert means and all(w.shape[0] == 2 for w in means)
    model.compile(optimizer="adam")
    model.fit(ds.train, epochs=1, verbose=0, callbacks=[MaximumRoaming(interval=0.5)])
    evaluated = model.evaluate(ds.test, return_dict=True, verbose=0)
    own = own_inference_results(model, ds.test)
    for key, value in own.items():
        assert evaluated[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    # Each task's statistics are its own: pooling them changes what task 0 sees.
    for mean in means:
        mean.assign(tf.repeat(tf.reduce_mean(mean, 0, keepdims=True), 2, axis=0))
    assert model.evaluate(ds.test, return_dict=True, verbose=0)["task_0_loss"] != \
        pytest.approx(evaluated["task_0_loss"], rel=1e-4)


def test_export_serves_every_task_without_flex_ops(tmp_path):
    from tf_mtl import export

    model = _model()
    for partition in model.conditioned_layers:
        partition.roam()
    saved, tflite = export.export(model, str(tmp_path))
    assert not export.graph_op_types(saved) & {"DynamicPartition", "DynamicStitch"}
    x = np.random.RandomState(1).rand(3, *SHAPE).astype("float32")
    served = tf.lite.Interpreter(model_path=tflite).get_signature_runner()(image=x)
    for name, out in model(x).items():
        np.testing.assert_allclose(served[name], out, rtol=1e-4, atol=1e-5)


def test_partition_state_saves_and_reloads(tmp_path):
    model = _model()
    for partition in model.conditioned_layers:
        partition.roam()
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    for a, b in zip(model.conditioned_layers, loaded.conditioned_layers, strict=True):
        for name in ("partition", "visited", "updates"):
            np.testing.assert_array_equal(getattr(a, name).numpy(), getattr(b, name).numpy())
    x = np.random.RandomState(1).rand(3, *SHAPE).astype("float32")
    np.testing.assert_allclose(loaded(x)["task_1"], model(x)["task_1"], rtol=1e-6)


@pytest.mark.parametrize("argument, message", [
    ({"sharing_ratio": 0.0}, "sharing_ratio"), ({"num_tasks": 0}, "num_tasks"),
    # Below 1/T every p gives each task C/T channels: refused, not silently equal.
    ({"sharing_ratio": 0.3}, r"\[1/T, 1\] = \[0.5, 1\] for 2 tasks")])
def test_bad_arguments_are_refused(argument, message):
    with pytest.raises(ValueError, match=message):
        ChannelPartition(**{"num_tasks": 2, **argument})
    with pytest.raises(ValueError, match="channels"):
        _layer(num_tasks=4, channels=3)
