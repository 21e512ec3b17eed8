"""Loss weightings and gradient aggregators composed with every sharing method
in `MultiTaskModel`'s training step."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import aggregation, backbones, bilevel, data, methods, weighting
from tf_mtl.tasks import classification

SHAPE = (28, 28, 1)
TASKS = [classification("task_0", 3), classification("task_1", 3)]


def _dense(num_tasks=None, **per_task):
    return [keras.layers.Flatten(), backbones.DenseUnit(16, num_tasks=num_tasks, **per_task),
            backbones.DenseUnit(8, num_tasks=num_tasks, **per_task)]


BUILDERS = {
    "hps": lambda: methods.hard_sharing(_dense(), TASKS, SHAPE),
    "mpps": lambda: methods.progressive_sharing(_dense(), TASKS, SHAPE, num_masked=2, seed=1),
    "mpps_tiled": lambda: methods.progressive_sharing(_dense(), TASKS, SHAPE, num_masked=2,
                                                      seed=1, routing="tiled"),
    "mr": lambda: methods.maximum_roaming(_dense(), TASKS, SHAPE, seed=1),
    "smtl": lambda: methods.safe_sharing(_dense, TASKS, SHAPE),
    "ppnet": lambda: methods.parameter_passing(_dense, TASKS, SHAPE),
    "mtan": lambda: methods.attention_network(_dense(), TASKS, SHAPE, attend_dense=True),
    "cross_stitch": lambda: methods.cross_stitch(_dense, TASKS, SHAPE),
}
# Every weighting and aggregator, on both parts, the Jacobian both ways.
COMBINATIONS = [
    dict(weighting="dwa", aggregator="pcgrad"),
    dict(weighting="gradnorm", aggregator="mgda", aggregate_on="representation"),
    dict(weighting="uw", aggregator="cagrad", aggregate_on="representation"),
    dict(weighting="rlw", aggregator="graddrop", per_task_gradients="vectorized"),
    dict(weighting="ew", aggregator="imtl_g", aggregate_on="representation"),
]


def _data(limit=64, batch_size=32):
    return data.load("synthetic", batch_size=batch_size, limit=limit).validation


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_every_weighting_and_aggregator_trains_every_sharing_method(method):
    model = BUILDERS[method]()
    dataset = _data()
    for objective in COMBINATIONS:
        if method in ("ppnet", "cross_stitch"):  # per-task columns: no shared representation
            objective = {**objective, "aggregate_on": "parameters"}
        before = [v.numpy() for v in model.trainable_variables]
        model.compile(optimizer=keras.optimizers.SGD(0.05), **objective)
        logs = model.fit(dataset, epochs=1, verbose=0).history
        assert np.isfinite(logs["loss"][0]), objective
        assert {"task_0_weight", "task_1_weight"} <= set(logs), objective
        after = model.trainable_variables
        assert all(np.isfinite(v.numpy()).all() for v in after), objective
        moved = [not np.array_equal(a, b.numpy()) for a, b in zip(before, after)]
        assert sum(moved) >= len(after) - 2, objective  # the lite/unused gates aside
    # Auto-Lambda, whose weights fit on held-out data through a virtual step.
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  weighting=weighting.AutoLambda(learning_rate=0.1))
    model.fit(dataset, heldout_data=_data(32, 16), epochs=1, verbose=0)
    lambdas = model.weighting.lambdas.numpy()
    assert np.isfinite(lambdas).all() and not np.allclose(lambdas, 0.1)


def _flat(tensors):
    return np.concatenate([np.reshape(t, -1) for t in tensors])


def test_pcgrad_on_parameters_is_the_projection_of_each_tasks_own_gradient():
    model = BUILDERS["hps"]()
    x, labels = next(iter(_data()))
    # A conflict to project: task 1's head is task 0's negated, on the same labels.
    head_0, head_1 = model.heads["task_0"], model.heads["task_1"]
    head_1.set_weights([-w for w in head_0.get_weights()])
    labels = {"task_0": labels["task_0"], "task_1": labels["task_0"]}
    model.compile(optimizer=keras.optimizers.SGD(1.0), aggregator="pcgrad")
    shared = model.shared_variable_indices()
    variables = model.trainable_variables
    assert [variables[i] for i in shared] == [v for l in model.backbone
                                             for v in l.trainable_variables]
    task_grads = []
    for task in TASKS:
        with tf.GradientTape() as tape:
            pred = model(x, training=True)[task.name]
            loss = tf.reduce_mean(task.loss(labels[task.name], pred))
        task_grads.append(tape.gradient(loss, variables))
    g = [_flat([grads[i] for i in shared]) for grads in task_grads]
    dot = g[0] @ g[1]
    assert dot < 0
    update = (g[0] - dot / (g[1] @ g[1]) * g[1]) + (g[1] - dot / (g[0] @ g[0]) * g[0])
    before = [v.numpy() for v in variables]
    model.train_step((x, labels))
    after = [v.numpy() for v in variables]
    np.testing.assert_allclose(_flat([before[i] - after[i] for i in shared]), update,
                               rtol=2e-4, atol=1e-6)
    for i in set(range(len(variables))) - set(shared):  # heads: their own gradient
        own = sum(grads[i] for grads in task_grads if grads[i] is not None)
        np.testing.assert_allclose(before[i] - after[i], own, rtol=2e-4, atol=1e-6)


def test_mgda_ub_weighs_the_tasks_by_the_min_norm_point_of_their_feature_gradients():
    model = BUILDERS["hps"]()
    x, labels = next(iter(_data()))
    model.compile(optimizer=keras.optimizers.SGD(1.0), aggregator="mgda",
                  aggregate_on="representation")
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        features, _ = model.features(x, training=True)
        losses = [tf.reduce_mean(t.loss(labels[t.name], model.heads[t.name](features)))
                  for t in TASKS]
    z = [tape.gradient(loss, features).numpy().reshape(-1) for loss in losses]
    alpha = np.clip((z[1] - z[0]) @ z[1] / ((z[0] - z[1]) @ (z[0] - z[1])), 0, 1)
    expected = tape.gradient(losses, variables, output_gradients=[alpha, 1 - alpha])
    heads = {id(v) for h in model.heads.values() for v in h.trainable_variables}
    own = tape.gradient(losses, variables)  # the heads: their own gradients
    before = [v.numpy() for v in variables]
    model.train_step((x, labels))
    for v, b, e, o in zip(variables, before, expected, own):
        want = o if id(v) in heads else e
        np.testing.assert_allclose(b - v.numpy(), want, rtol=2e-4, atol=1e-6, err_msg=v.path)


def test_auto_lambda_hypergradient_is_minus_alpha_times_gradient_inner_products():
    model = BUILDERS["hps"]()
    auto = weighting.AutoLambda(learning_rate=1e-3)  # alpha: the SGD's 0.5
    model.compile(optimizer=keras.optimizers.SGD(0.5), weighting=auto)
    train, heldout = next(iter(_data(16, 16))), next(iter(_data(32, 16).skip(1)))
    lambdas = np.array([0.3, 1.2], "float32")
    auto.lambdas.assign(lambdas)
    network = model.trainable_variables
    x, _, labels = model._unpack(train)
    with tf.GradientTape(persistent=True) as tape:
        losses = model.forward_objective(x, None, labels, tf.ones([2]))[0]
        task_losses = tf.unstack(losses)  # on the tape
    dense = lambda grads: _flat([tf.zeros_like(v) if g is None else g
                                 for v, g in zip(network, grads)])
    task_grads = [dense(tape.gradient(loss, network)) for loss in task_losses]
    # grad L_val at w' = w - alpha sum_t lambda_t g_t, by assigning w'.
    start = [v.numpy() for v in network]
    step = tape.gradient(losses, network, output_gradients=tf.constant(lambdas))
    for v, g in zip(network, step):
        v.assign_sub(0.5 * g)
    with tf.GradientTape() as tape:
        heldout_loss = model.batch_objective(heldout, training=True)
    heldout_grad = dense(tape.gradient(heldout_loss, network))
    for v, value in zip(network, start):
        v.assign(value)
    expected = [-0.5 * heldout_grad @ g for g in task_grads]
    (got,) = bilevel.hypergradients(model, train, heldout, network, [auto.lambdas], 0.5,
                                    train_weights=auto.lambdas)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    # Its step: Adam's first, lambda - lr sign(gradient), at the optimizer's alpha.
    auto.fit_heldout(model, train, heldout)
    np.testing.assert_allclose(auto.lambdas.numpy(), lambdas - 1e-3 * np.sign(expected),
                               rtol=1e-4)
    np.testing.assert_array_equal([v.numpy() for v in network][0], start[0])  # no w step


def test_auto_lambda_refuses_float16_loss_scaling():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = BUILDERS["hps"]()
        with pytest.raises(ValueError, match="AutoLambda does not scale its held-out loss"):
            model.compile(optimizer="adam", weighting="auto_lambda")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_auto_lambda_fits_its_weights_on_heldout_data_and_saves_them(tmp_path):
    model = BUILDERS["hps"]()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  weighting=weighting.AutoLambda(learning_rate=1e-2))
    with pytest.raises(ValueError, match="heldout_data"):
        model.fit(_data(), verbose=0)
    logs = model.fit(_data(), heldout_data=_data(32, 16), epochs=2, verbose=0).history
    auto = model.weighting
    assert int(auto.meta_optimizer.iterations) == int(model.optimizer.iterations) == 4
    assert not np.allclose(auto.lambdas.numpy(), 0.1)
    np.testing.assert_allclose(logs["task_0_weight"][-1], auto.lambdas.numpy()[0], rtol=0.1)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.weighting.lambdas.numpy(), auto.lambdas.numpy())
    for a, b in zip(auto.meta_optimizer.variables, loaded.weighting.meta_optimizer.variables,
                    strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    plain = BUILDERS["hps"]()
    plain.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="has none"):
        plain.fit(_data(), heldout_data=_data(), verbose=0)


def test_vectorized_jacobian_equals_the_loop():
    runs = []
    for method in ("loop", "vectorized"):
        keras.utils.set_random_seed(2)
        model = BUILDERS["mpps_tiled"]()
        model.compile(optimizer=keras.optimizers.SGD(0.1), aggregator="pcgrad",
                      per_task_gradients=method)
        model.fit(_data(), epochs=1, verbose=0)
        runs.append([v.numpy() for v in model.weights])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregate_on", ["parameters", "representation"])
def test_sequential_routing_aggregates_as_tiled_routing(aggregate_on):
    runs = []
    for routing in ("tiled", "sequential"):
        keras.utils.set_random_seed(2)
        model = methods.maximum_roaming(_dense(), TASKS, SHAPE, seed=1, routing=routing)
        model.compile(optimizer=keras.optimizers.SGD(0.1), weighting="gradnorm",
                      aggregator="cagrad", aggregate_on=aggregate_on)
        runs.append((model.fit(_data(), epochs=1, verbose=0).history,
                     [v.numpy() for v in model.weights]))
    np.testing.assert_allclose(runs[1][0]["loss"], runs[0][0]["loss"], rtol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_equal_weighting_composed_with_mpps_is_eq_3():
    runs = []
    for objective in ({}, {"weighting": "ew"}):
        keras.utils.set_random_seed(2)
        model = BUILDERS["mpps"]()
        model.compile(optimizer=keras.optimizers.SGD(0.1), **objective)
        runs.append((model.fit(_data(), epochs=1, verbose=0).history,
                     [v.numpy() for v in model.weights if "weight" not in v.path]))
    np.testing.assert_array_equal(runs[1][0]["loss"], runs[0][0]["loss"])
    assert runs[1][0]["kl"] == runs[0][0]["kl"]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("method, objective", [
    ("hps", dict(weighting="gradnorm", aggregator="pcgrad")),
    ("mpps_tiled", dict(weighting="uw", aggregator="mgda", aggregate_on="representation")),
    ("hps", dict(weighting="dwa", aggregator="cagrad", aggregate_on="representation")),
    ("hps", dict(weighting="auto_lambda")),  # the hypergradient through the virtual step
])
def test_mirrored_strategy_aggregates_the_global_task_gradients(mirrored, method, objective):
    keras.utils.set_random_seed(3)
    single = BUILDERS[method]()
    with mirrored.scope():
        distributed = BUILDERS[method]()
        distributed.set_weights(single.get_weights())
    for model in (single, distributed):
        with model.distribute_strategy.scope():
            model.compile(optimizer=keras.optimizers.SGD(0.1), **objective)
    dataset = _data(limit=96)
    heldout = {"heldout_data": _data(32, 16)} if single.takes_heldout_data() else {}
    runs = [m.fit(dataset, epochs=2, verbose=0, **heldout).history
            for m in (single, distributed)]
    np.testing.assert_allclose(runs[1]["loss"], runs[0]["loss"], rtol=1e-4)
    for a, b in zip(single.weights, distributed.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)


def test_weighting_state_and_compile_options_survive_a_keras_file(tmp_path):
    model = BUILDERS["hps"]()
    model.compile(optimizer="adam", weighting=weighting.DynamicWeightAverage(temperature=3),
                  aggregator=aggregation.PCGrad(seed=5), aggregate_on="representation")
    model.fit(_data(), epochs=3, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.weighting.temperature == 3 and loaded.aggregator.seed == 5
    assert loaded.aggregate_on == "representation"
    np.testing.assert_array_equal(loaded.weighting.epoch_losses, model.weighting.epoch_losses)
    np.testing.assert_array_equal(loaded.weighting.task_weights(),
                                  model.weighting.task_weights())
    assert int(loaded.aggregator.draws.numpy()) == 6
    loaded.fit(_data(), epochs=1, verbose=0)


@pytest.mark.parametrize("options, match", [
    (dict(aggregate_on="features"), "aggregate_on='features'"),
    (dict(per_task_gradients="pfor"), "per_task_gradients='pfor'"),
    (dict(weighting="dwaa"), "'dwaa'"),
    (dict(aggregator="pc_grad"), "'pc_grad'"),
])
def test_bad_compile_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        BUILDERS["hps"]().compile(optimizer="sgd", **options)


def test_bilevel_safe_mtl_refuses_a_weighting():
    model = methods.safe_sharing(_dense, TASKS, SHAPE, bilevel=True)
    with pytest.raises(ValueError, match="weighting='dwa'"):
        model.compile(optimizer="adam", weighting="dwa")
