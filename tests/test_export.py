"""Tests of `tf_mtl.export`: SavedModel and TFLite of the inference model."""

import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tf_mtl import backbones, data, export, methods
from tf_mtl.tasks import classification

INPUT_SHAPE = (28, 28, 1)
NAMES = ("task_0", "task_1")
TRAINING_ONLY = ("Random", "Dropout", "FusedBatchNormGrad", "Bernoulli",
                 "Multinomial")


def trained(method):
    """A lenet(0.25) model after one short epoch, so that the BatchNorm
    moving statistics are no longer their initial 0 and 1."""
    splits = data.load("synthetic", batch_size=32, limit=32)
    model = method(backbones.lenet(0.25), [classification(n, 3) for n in NAMES],
                   INPUT_SHAPE)
    model.compile(optimizer="adam")
    model.fit(splits.train, epochs=1, verbose=0)
    return model


def sample_images(batch=5):
    x, _ = data.synthetic.make_synthetic(batch, seed=1)
    return x


def serving_function_ops(saved_model_dir):
    """Op types of the functions of the graph that serve, by function name."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    library = proto.meta_graphs[0].graph_def.library.function
    return {
        f.signature.name: {node.op for node in f.node_def}
        for f in library if "serve" in f.signature.name
    }


def saved_variable_shapes(saved_model_dir):
    path = os.path.join(saved_model_dir, "variables", "variables")
    return sorted(tuple(shape) for name, shape in tf.train.list_variables(path)
                  if name.endswith("VARIABLE_VALUE"))


def test_export_writes_both_files(tmp_path):
    model = trained(methods.hard_sharing)

    saved, tflite = export.export(model, str(tmp_path))

    assert saved == str(tmp_path / "saved_model")
    assert tflite == str(tmp_path / "model.tflite")
    assert os.path.isfile(os.path.join(saved, "saved_model.pb"))
    assert os.path.getsize(tflite) > 0


def test_saved_model_and_tflite_match_the_keras_model(tmp_path):
    model = trained(methods.hard_sharing)
    saved, tflite = export.export(model, str(tmp_path))
    x = sample_images()

    expected = {k: v.numpy() for k, v in model(x, training=False).items()}
    served = tf.saved_model.load(saved).signatures["serving_default"](
        image=tf.constant(x))
    interpreter = tf.lite.Interpreter(model_path=tflite)
    lite = interpreter.get_signature_runner()(image=x)

    assert set(served) == set(lite) == set(NAMES)
    for name in NAMES:
        assert expected[name].shape == (5, 3)
        np.testing.assert_allclose(served[name].numpy(), expected[name], atol=1e-5)
        np.testing.assert_allclose(lite[name], expected[name], atol=1e-5)


def test_saved_model_accepts_any_batch_size(tmp_path):
    model = trained(methods.hard_sharing)
    saved, _ = export.export(model, str(tmp_path))
    serve = tf.saved_model.load(saved).signatures["serving_default"]
    x = sample_images(7)

    one = serve(image=tf.constant(x[:1]))
    seven = serve(image=tf.constant(x))

    for name in NAMES:
        assert one[name].shape == (1, 3) and seven[name].shape == (7, 3)
        # Inference BatchNorm: a row's output does not depend on its batch.
        np.testing.assert_allclose(one[name][0], seven[name][0], atol=1e-5)


def test_hard_sharing_export_has_no_training_op(tmp_path):
    model = trained(methods.hard_sharing)
    saved, _ = export.export(model, str(tmp_path))

    all_ops = export.graph_op_types(saved)
    serving = serving_function_ops(saved)

    assert {"Conv2D", "MatMul", "MaxPool"} <= all_ops
    assert not [op for op in all_ops if any(t in op for t in TRAINING_ONLY)]
    assert serving
    for name, ops in serving.items():
        assert "Conv2D" in ops, name
        # Variable writes belong to the checkpoint restore, never to serving.
        assert not [op for op in ops if "Assign" in op], name


def test_export_saves_only_the_inference_variables(tmp_path):
    model = trained(methods.hard_sharing)
    saved, _ = export.export(model, str(tmp_path))

    # 2 convolutions with BatchNorm (kernel, gamma, beta, mean, variance),
    # the dense layer and the 2 heads: no task_frequencies, no Adam state.
    expected = sorted(
        tuple(w.shape) for w in model.weights if "task_frequencies" not in w.path
    )
    assert len(expected) == 16
    assert saved_variable_shapes(saved) == expected


def test_mpps_export_is_the_fully_shared_backbone(tmp_path):
    model = trained(methods.progressive_sharing)
    masks = model.conditioned_layers
    saved, tflite = export.export(model, str(tmp_path))
    x = sample_images()

    all_ops = export.graph_op_types(saved)
    served = tf.saved_model.load(saved).signatures["serving_default"](
        image=tf.constant(x))

    assert len(masks) == 3
    assert not [op for op in all_ops if any(t in op for t in TRAINING_ONLY)]
    mask_shapes = {tuple(m.mask_probs.shape) for m in masks}
    assert not mask_shapes & set(saved_variable_shapes(saved))
    assert len(saved_variable_shapes(saved)) == 16
    expected = model(x, training=False)
    for name in NAMES:
        np.testing.assert_allclose(served[name], expected[name], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
def test_serving_function_is_the_model_at_inference(batch):
    model = trained(methods.hard_sharing)
    serve = export.serving_function(model)
    x = sample_images(batch)

    outputs = serve(tf.constant(x))

    assert serve.input_signature[0].shape.as_list() == [None, 28, 28, 1]
    for name in NAMES:
        np.testing.assert_allclose(outputs[name], model(x)[name], atol=1e-6)
