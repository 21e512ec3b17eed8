"""Export of the deployable model: SavedModel and TFLite.

The exported function is the model at inference, `image -> {task: output}`:
for MPPS the fully shared backbone with every mask folded away (a mask is the
identity at inference and is not traced), so the graph and its latency are
those of a hard-sharing model; for L-SMTL only the encoders the gates chose,
with no gate op. Only the variables that function reads are
saved: no mask parameter, target, seed or optimizer state ships.
"""

import os

import tensorflow as tf


def serving_function(model):
    """The `tf.function` `image -> {task: output}` of `model` at inference
    (`MultiTaskModel.deployable_call`)."""
    call = model.deployable_call()

    @tf.function(input_signature=[tf.TensorSpec(
        (None,) + tuple(model.example_shape), tf.float32, name="image")])
    def serve(image):
        return call(image)

    return serve


def export(model, directory):
    """Writes `directory/saved_model` and `directory/model.tflite`.

    Returns the two paths.
    """
    serve = serving_function(model)
    concrete = serve.get_concrete_function()
    module = tf.Module()
    # Track what the inference graph reads, and nothing else.
    module.inference_variables = list(concrete.variables)
    module.serve = serve
    saved = os.path.join(directory, "saved_model")
    tf.saved_model.save(module, saved, signatures={"serving_default": concrete})
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    tflite = os.path.join(directory, "model.tflite")
    with open(tflite, "wb") as f:
        f.write(converter.convert())
    return saved, tflite


def graph_op_types(saved_model_dir):
    """The set of op types in a SavedModel's graph and its functions."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
    return ops
