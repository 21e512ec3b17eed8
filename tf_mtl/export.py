"""Export of the deployable model: SavedModel and TFLite.

The exported function is the model at inference, `image -> {task: output}`:
for MPPS the fully shared backbone with every mask folded away (a mask is the
identity at inference and is not traced), so the graph and its latency are
those of a hard-sharing model; for L-SMTL only the encoders the gates chose,
with no gate op. Only the variables that function reads are
saved: no mask parameter, target, seed or optimizer state ships. A model
trained under mixed precision is exported computing in float32 (TFLite has no
bfloat16 kernels; a float16 model is TFLite's own post-training choice).
"""

import os

import keras
import tensorflow as tf

from tf_mtl._keras import flatten_layers


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
    serve = serving_function(in_float32(model))
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


def in_float32(model):
    """`model`, or, if some layer of it computes in another dtype (a mixed
    precision policy), a copy of it computing in float32 with its weights."""
    if all(getattr(layer, "compute_dtype", "float32") == "float32"
           for layer in flatten_layers(model)):
        return model
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    # Blocks make their sublayers under the global policy: float32 too.
    policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("float32")
    try:
        twin = keras.saving.deserialize_keras_object(_float32_policies(config))
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
    twin.set_weights(model.get_weights())
    return twin


def _float32_policies(config):
    if isinstance(config, list):
        return [_float32_policies(c) for c in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "DTypePolicy":
        return "float32"
    return {k: _float32_policies(v) for k, v in config.items()}


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
