"""MPPS as a method: builder, EC schedules, target updates, resume, export."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import backbones, export
from tf_mtl.callbacks import ExclusiveCapacityScheduler, sharing_progress
from tf_mtl.data import synthetic
from tf_mtl.layers import ProgressiveMask
from tf_mtl.layers.progressive_mask import exclusive_capacity, exclusive_init
from tf_mtl.methods import hard_sharing, progressive_sharing
from tf_mtl.tasks import classification

TASKS = [classification("task_0", 3), classification("task_1", 3)]


def _joint_data(batch=32, n=128):
    x, labels = synthetic.make_synthetic(n, 2, 3, seed=0)
    return tf.data.Dataset.from_tensor_slices((x, labels)).batch(batch)


def _mpps(**kwargs):
    model = progressive_sharing(backbones.lenet(0.25), TASKS, (28, 28, 1), **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    return model


@pytest.mark.parametrize("schedule, expected", [
    # 10 epochs, 2 frozen at each end: 6 scheduled epochs.
    ("linear", [0, 0, 0, 0.2, 0.4, 0.6, 0.8, 1, 1, 1]),
    ("quad", [0, 0, 0, 0.04, 0.16, 0.36, 0.64, 1, 1, 1]),
    ("step2", [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ("step3", [0, 0, 0, 0, 0.5, 0.5, 1, 1, 1, 1]),
    ("separ", [0] * 10),
    ("fullshare", [1] * 10),
])
def test_schedule_curves(schedule, expected):
    got = [sharing_progress(schedule, e, 10, 2, 2) for e in range(10)]
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_linear_equals_step_per_epoch_and_no_frozen_epochs():
    linear = [sharing_progress("linear", e, 6) for e in range(6)]
    np.testing.assert_allclose(linear, [k / 5 for k in range(6)])
    np.testing.assert_allclose(linear, [sharing_progress("step6", e, 6) for e in range(6)])


@pytest.mark.parametrize("bad", ["cosine", "step0", "linear2"])
def test_unknown_schedule(bad):
    with pytest.raises(ValueError, match="EC schedule"):
        sharing_progress(bad, 0, 5)


def test_frozen_epochs_must_fit():
    with pytest.raises(ValueError, match="frozen_start=3"):
        ExclusiveCapacityScheduler(5, frozen_start=3, frozen_end=3)


def test_builder_masks_the_last_k_sites():
    model = progressive_sharing(backbones.resnet(0.25), TASKS, (28, 28, 1), num_masked=6)
    sites = backbones.sites(model.backbone)
    assert len(sites) == 7
    masked = [block.conditioned.get(str(site)) for block, site, _ in sites]
    assert masked[0] is None and all(isinstance(m, ProgressiveMask) for m in masked[1:])
    # LeNet has 3 sites: k = 6 masks all of them.
    assert len(_mpps().conditioned_layers) == 3


def test_builder_needs_two_tasks():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        progressive_sharing(backbones.lenet(0.25), TASKS[:1], (28, 28, 1))


@pytest.mark.parametrize("update_target", [True, False])
def test_scheduler_updates_targets(update_target):
    model = _mpps()
    scheduler = ExclusiveCapacityScheduler(4, "linear", update_target=update_target)
    scheduler.set_model(model)
    mask = model.conditioned_layers[0]
    phi = exclusive_init(2, mask.mask_probs.shape[1], 0.01)
    phi[1, 0] = 0.5  # a guest that learned to share
    mask.mask_probs.assign(phi)
    logs = {}
    scheduler.on_epoch_begin(1)
    scheduler.on_epoch_end(1, logs)
    capacity = 0.99 - (1 / 3) * 0.98  # epoch 1 of 4: course 1 of 0..3
    source = phi if update_target else exclusive_init(*phi.shape, 0.01)
    expected = 1 - capacity / exclusive_capacity(source).numpy() * (1 - source)
    np.testing.assert_allclose(mask.target_probs.numpy(), np.clip(expected, 0.01, 0.99),
                               rtol=1e-5)
    assert mask.target_capacity.numpy() == pytest.approx(capacity)
    assert logs["ec_target"] == pytest.approx(capacity, abs=1e-4)  # in force in epoch 1
    assert logs["ec"] < 0.99 and f"ec_{mask.name}" in logs
    assert len(scheduler.history) == 1 and mask.name in scheduler.history[0]["mask_probs"]


def test_fixed_schedule_has_its_target_from_the_first_step():
    model = _mpps()
    history = model.fit(_joint_data(), epochs=3, verbose=0,
                        callbacks=[ExclusiveCapacityScheduler(3, "fullshare")])
    np.testing.assert_allclose(history.history["ec_target"], [0.01] * 3, atol=1e-4)


@pytest.mark.parametrize("routing", ["tiled", "sequential"])
def test_kl_is_logged_apart_from_the_task_losses(routing):
    # Training `loss` holds beta * KL, evaluation (masks off) does not
    # (`val_kl` is 0): `loss - kl` is the task losses' sum, like `val_loss`.
    model = _mpps(routing=routing)
    data = _joint_data()
    history = model.fit(data, validation_data=data, epochs=2, verbose=0,
                        callbacks=[ExclusiveCapacityScheduler(2, "linear")]).history
    assert all(kl > 0 for kl in history["kl"]) and history["val_kl"] == [0.0, 0.0]
    tasks = np.add(history["task_0_loss"], history["task_1_loss"])
    np.testing.assert_allclose(np.subtract(history["loss"], history["kl"]), tasks, rtol=1e-4)
    np.testing.assert_allclose(history["val_loss"], np.add(history["val_task_0_loss"],
                                                           history["val_task_1_loss"]),
                               rtol=1e-5)
    assert "kl" not in hard_sharing(backbones.lenet(0.25), TASKS, (28, 28, 1)).metrics_names


def test_fit_moves_ec_towards_sharing():
    model = _mpps(baseline_decay=0.9)
    history = model.fit(_joint_data(), epochs=3, verbose=0,
                        callbacks=[ExclusiveCapacityScheduler(3, "linear")])
    ec = history.history["ec"]
    assert ec[-1] < ec[0] < 0.99
    np.testing.assert_allclose(history.history["ec_target"], [0.99, 0.5, 0.01], rtol=1e-4)
    assert all(np.isfinite(history.history["loss"]))


def test_held_capacity_keeps_phi_on_the_schedule_and_moves_it_between_guests():
    tasks = [classification(f"task_{t}", 3) for t in range(3)]
    x, labels = synthetic.make_synthetic(96, 3, 3, seed=0)
    data = tf.data.Dataset.from_tensor_slices((x, labels)).batch(32)
    model = progressive_sharing(backbones.lenet(0.25), tasks, (28, 28, 1), beta=0.01,
                                mask_learning_rate=0.1, hold_capacity=True)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    mask = model.conditioned_layers[-1]
    phi = exclusive_init(3, mask.mask_probs.shape[1], 0.01)
    scheduler = ExclusiveCapacityScheduler(3, "linear")
    history = model.fit(data, epochs=3, verbose=0, callbacks=[scheduler]).history
    for record, capacity in zip(scheduler.history, [0.99, 0.5, 0.01]):
        for probs in record["mask_probs"].values():  # every channel, at the epoch's end
            np.testing.assert_allclose(exclusive_capacity(np.array(probs)), capacity,
                                       atol=1e-5)
    middle = np.array(scheduler.history[1]["mask_probs"][mask.name])
    owners = phi.argmax(0)
    guests = middle[np.arange(3)[:, None] != owners]
    assert guests.std() > 1e-3  # the loss moved capacity between the guests
    assert history["ec"] == pytest.approx([0.99, 0.5, 0.01], abs=1e-5)


def _run(tmp_path, epochs, stop_after=None):
    """Trains a fresh MPPS model with BackupAndRestore; optionally crashes."""
    keras.utils.set_random_seed(0)
    model = _mpps(sample_per="example", baseline_decay=0.5)

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == stop_after:
                raise RuntimeError("interrupted")

    # The backup first: it saves before the scheduler's end-of-epoch work.
    callbacks = [keras.callbacks.BackupAndRestore(str(tmp_path)),
                 ExclusiveCapacityScheduler(epochs, "linear")]
    if stop_after:
        callbacks.append(Crash())
    model.fit(_joint_data(), epochs=epochs, verbose=0, callbacks=callbacks)
    return model


def test_resume_equals_uninterrupted(tmp_path):
    reference = _run(tmp_path / "a", 4)
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(tmp_path / "b", 4, stop_after=2)
    resumed = _run(tmp_path / "b", 4)
    for ref, got in zip(reference.conditioned_layers, resumed.conditioned_layers):
        np.testing.assert_allclose(got.mask_probs.numpy(), ref.mask_probs.numpy(), atol=1e-6)
        np.testing.assert_allclose(got.target_probs.numpy(), ref.target_probs.numpy(),
                                   atol=1e-6)
        # 4 epochs x 4 steps x 2 tasks' passes (sequential routing)
        assert got.draws.numpy() == ref.draws.numpy() == 32


def test_mirrored_strategy_keeps_one_phi(mirrored):
    with mirrored.scope():
        model = _mpps()
    model.fit(_joint_data(), epochs=2, verbose=0,
              callbacks=[ExclusiveCapacityScheduler(2, "linear", 0, 0)])
    for mask in model.conditioned_layers:
        for variable in (mask.mask_probs, mask.target_probs):
            replicas = [v.numpy() for v in variable.value.values]
            assert len(replicas) == 2
            np.testing.assert_array_equal(replicas[0], replicas[1])
        # Training moved Phi: the test compares trained values.
        assert not np.allclose(mask.mask_probs.numpy(),
                               exclusive_init(*mask.mask_probs.shape, 0.01))


def test_export_is_the_hard_sharing_model(tmp_path):
    model = _mpps(distribution="gaussian")
    model.fit(_joint_data(), epochs=1, verbose=0)
    hps = hard_sharing(backbones.lenet(0.25), TASKS, (28, 28, 1))
    # Same weights, layer by layer; the masks hold the only extra variables.
    for source, target in zip(model.backbone + list(model.heads.values()),
                              hps.backbone + list(hps.heads.values())):
        plain = [v for v in source.weights if "mpps_mask" not in v.path]
        for s, t in zip(plain, target.weights):
            t.assign(s)
    saved, tflite = export.export(model, str(tmp_path / "mpps"))
    hps_saved, _ = export.export(hps, str(tmp_path / "hps"))
    ops = export.graph_op_types(saved)
    # No sampling, owner (ArgMax, OneHot), gather or select op of the masks:
    # the very op set of the hard-sharing export.
    assert ops == export.graph_op_types(hps_saved)
    assert not {op for op in ops if "Random" in op or op in ("ArgMax", "OneHot", "GatherV2")}
    x = np.random.default_rng(0).random((5, 28, 28, 1)).astype("float32")
    served = tf.saved_model.load(saved).signatures["serving_default"](image=tf.constant(x))
    lite = tf.lite.Interpreter(model_path=tflite).get_signature_runner()(image=x)
    expected = hps(x)
    for name in ("task_0", "task_1"):
        np.testing.assert_allclose(served[name], expected[name], atol=1e-5)
        np.testing.assert_allclose(lite[name], expected[name], atol=1e-4)
    variables = [v.name for v in tf.saved_model.load(saved).inference_variables]
    assert not [v for v in variables if "probs" in v or "seed" in v]


@pytest.mark.parametrize("mask_learning_rate", [None, 0.01])
def test_mask_learning_rate_trains_phi_with_its_own_sgd(mask_learning_rate):
    model = progressive_sharing(backbones.lenet(0.25), TASKS, (28, 28, 1),
                                mask_learning_rate=mask_learning_rate)
    model.compile(optimizer=keras.optimizers.Adam(0.0))  # network frozen
    mask = model.conditioned_layers[0]
    kernel = model.backbone[0].conv.kernel
    before = mask.mask_probs.numpy(), kernel.numpy()
    model.fit(_joint_data(), epochs=1, verbose=0)
    np.testing.assert_array_equal(kernel.numpy(), before[1])
    moved = not np.array_equal(mask.mask_probs.numpy(), before[0])
    assert moved == (mask_learning_rate is not None)
    if mask_learning_rate is not None:
        optimizer, variables = mask.dedicated_optimizer()
        assert isinstance(optimizer, keras.optimizers.SGD) and variables == [mask.mask_probs]
        assert float(optimizer.learning_rate) == pytest.approx(0.01)


def test_bernoulli_mpps_under_mirrored_strategy_matches_one_device(mirrored_pair):
    # Dense backbone without BatchNormalization, so that splitting a batch
    # between replicas changes nothing; one mask per task per step is the
    # same on every replica and on one device.
    def build():
        backbone = [keras.layers.Flatten(), backbones.DenseUnit(16),
                    backbones.DenseUnit(16)]
        return progressive_sharing(backbone, TASKS, (28, 28, 1), baseline_decay=0.5)

    single, distributed = mirrored_pair(build)
    data = _joint_data(batch=32, n=96)
    callbacks = lambda: [ExclusiveCapacityScheduler(2, "linear", 0, 0)]
    expected = single.fit(data, epochs=2, verbose=0, callbacks=callbacks()).history
    got = distributed.fit(data, epochs=2, verbose=0, callbacks=callbacks()).history
    for key in ("loss", "task_0_loss", "task_1_accuracy", "ec"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)
    for a, b in zip(single.conditioned_layers, distributed.conditioned_layers):
        # Phi moved by the score function and the KL alike on both.
        assert not np.allclose(a.mask_probs.numpy(), exclusive_init(2, 16, 0.01))
        np.testing.assert_allclose(b.mask_probs.numpy(), a.mask_probs.numpy(),
                                   rtol=1e-4, atol=1e-6)


def test_scheduler_must_span_the_fit():
    with pytest.raises(ValueError, match="epochs=3 but fit runs epochs=2"):
        _mpps().fit(_joint_data(), epochs=2, verbose=0,
                    callbacks=[ExclusiveCapacityScheduler(3, "linear")])


def test_phi_steps_do_not_depend_on_loss_scaling():
    phis = []
    for scale in (None, 128.0):
        keras.utils.set_random_seed(0)
        model = progressive_sharing(backbones.lenet(0.25), TASKS, (28, 28, 1))
        model.compile(optimizer=keras.optimizers.Adam(1e-3, loss_scale_factor=scale))
        model.fit(_joint_data(), epochs=1, verbose=0)
        phis.append(model.conditioned_layers[0].mask_probs.numpy())
    assert not np.allclose(phis[0], exclusive_init(*phis[0].shape, 0.01))
    np.testing.assert_allclose(phis[1], phis[0], rtol=1e-4, atol=1e-6)
