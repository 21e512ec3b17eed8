"""Every builder's model saves to `.keras` and reloads, in safe mode, with
its method state and every optimizer's state, ready to continue `fit`."""

import functools
import json
import re

import keras
import numpy as np
import pytest

from tf_mtl import backbones, data, methods
from tf_mtl.tasks import classification

BUILDERS = {
    "hps": lambda b, t, joint: methods.hard_sharing(b, t, (28, 28, 1), joint),
    "mpps": lambda b, t, joint: methods.progressive_sharing(
        b, t, (28, 28, 1), joint, num_masked=2, seed=3),
    "mpps_sequential_gaussian": lambda b, t, joint: methods.progressive_sharing(
        b, t, (28, 28, 1), joint, num_masked=3, distribution="gaussian",
        routing="sequential"),
    "stl": lambda b, t, joint: methods.single_task(b, t[0], (28, 28, 1)),
    "mr": lambda b, t, joint: methods.maximum_roaming(b, t, (28, 28, 1), joint, 0.6),
    "lsmtl": lambda b, t, joint: methods.safe_sharing(
        functools.partial(backbones.lenet, 0.25), t, (28, 28, 1), joint, lite=True),
    "mtan": lambda b, t, joint: methods.attention_network(b, t, (28, 28, 1), joint),
    "cross_stitch": lambda b, t, joint: methods.cross_stitch(
        functools.partial(backbones.lenet, 0.25), t, (28, 28, 1), joint),
}


def _config(model):
    """The model's config without the input shapes Keras records at build."""
    return re.sub(r', "build_config": \{"input_shape": \[[^]]*\]\}', "",
                  json.dumps(model.get_config()))


def _assert_same_state(a, b):
    for x, y in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)
    optimizers = lambda m: [m.optimizer] + [
        l.dedicated_optimizer()[0] for l in m.conditioned_layers
        if l.dedicated_optimizer()]
    for p, q in zip(optimizers(a), optimizers(b), strict=True):
        for x, y in zip(p.variables, q.variables, strict=True):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("joint", [True, False])
def test_save_load_and_continue(builder, joint, tmp_path):
    if builder in ("stl", "cross_stitch") and not joint:
        pytest.skip("jointly labelled data only")
    if builder == "mtan" and joint:
        pytest.skip("MTAN's routed rows on jointly labelled data: test_architectures.py")
    ds = data.load("synthetic" if joint else "synthetic_groups", batch_size=64, limit=128)
    task_list = [classification(n, k) for n, k in ds.task_classes.items()]
    model = BUILDERS[builder](backbones.lenet(0.25), task_list, joint)
    train = ds.train
    if builder == "stl":
        train = methods.task_view(ds.train, 0, task_list[0].name, True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(train, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")

    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded) is type(model)
    assert _config(loaded) == _config(model)
    _assert_same_state(model, loaded)
    x = next(iter(ds.test))[0]
    for name, out in model(x).items():
        np.testing.assert_allclose(loaded(x)[name], out, rtol=1e-6, err_msg=name)

    # Both continue alike (on data in a fixed order).
    more = ds.validation if builder != "stl" else methods.task_view(
        ds.validation, 0, task_list[0].name, True)
    model.fit(more, epochs=1, verbose=0)
    loaded.fit(more, epochs=1, verbose=0)
    _assert_same_state(model, loaded)


def test_a_task_without_a_factory_cannot_be_saved(tmp_path):
    import dataclasses

    task = dataclasses.replace(classification("a", 3), config=None)
    model = methods.hard_sharing(backbones.lenet(0.25), [task], (28, 28, 1))
    with pytest.raises(ValueError, match="Task 'a' cannot be saved.*task_factory"):
        model.save(tmp_path / "m.keras")


def test_a_residual_backbone_reloads_with_its_shortcuts(tmp_path):
    # A block builds its sublayers at its first call: a reloaded one must too
    # (its strided blocks' shortcuts are made in `build`).
    task_list = [classification("a", 3), classification("b", 3)]
    model = methods.hard_sharing(backbones.resnet(0.25), task_list, (28, 28, 1))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert len(loaded.weights) == len(model.weights)
    x = np.random.RandomState(0).rand(2, 28, 28, 1).astype("float32")
    np.testing.assert_allclose(loaded(x)["a"], model(x)["a"], rtol=1e-6)
