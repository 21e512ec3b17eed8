"""Safe Multi-Task Learning: SMTL, L-SMTL, SMTL_c, L-SMTL_c (papers/002, 3).

A public encoder f_S shared by every task and a private encoder f_t per task
(the per-task twin of the same backbone definition), mixed per task by the
gate g_t before the task's decoder h_t (eq. 1):

    y_t = h_t(a_t f_S(x) + (1 - a_t) f_t(x)),

or, in SMTL_c (section 3.3), after a public decoder h_{S,t} and a private
one h_t: `y_t = a_t h_{S,t}(f_S(x)) + (1 - a_t) h_t(f_t(x))`. Trained on the
summed task losses (eq. 2, equal weights as in the reference code). With
a_t = 0 task t is single-task learning, with a_t = 1 hard sharing. The lite
versions make a_t binary with the Gumbel gate (eqs. 3-4).
"""

import keras
import tensorflow as tf

from tf_mtl.backbones import Block, run_layers
from tf_mtl.layers.gate import EncoderGate
from tf_mtl.model import MultiTaskModel


@keras.saving.register_keras_serializable(package="tf_mtl")
class GatedEncoders(Block):
    """The public encoder, the private encoders and the gates of SMTL.

    The public encoder runs once on the batch (its rows then serve every
    task); the private encoders run on the routed rows, each task's rows
    through its own copy; the gate mixes the two per row's task.

    Args:
        public: the backbone f_S (a list of layers).
        private: its per-task twin (`tf_mtl.backbones`, `num_tasks=T`).
        gate: an `EncoderGate`, or None to pass on both encoders' features,
            concatenated on the last axis, to gated decoders (SMTL_c).
    """

    def __init__(self, public, private, gate=None, **kwargs):
        super().__init__(**kwargs)
        self.public = list(public)
        self.private = list(private)
        self.gate = gate

    def routes_tasks(self, training):
        return True

    def call(self, x, task_ids=None, training=None, route=None):
        shared, _ = run_layers(self.public, x, route, training, task_ids)
        private, routed = run_layers(self.private, x, route, training, task_ids)
        if task_ids is None:
            shared, _ = route(shared)  # the same rows, one copy per task
        if self.gate is None:
            return keras.ops.concatenate([shared, private], axis=-1), routed
        return self.gate(shared, private, routed, training=training), routed

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {**super().get_config(), "public": [serialize(l) for l in self.public],
                "private": [serialize(l) for l in self.private],
                "gate": None if self.gate is None else serialize(self.gate)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        deserialize = keras.saving.deserialize_keras_object
        for key in ("public", "private"):
            config[key] = [deserialize(l) for l in config[key]]
        config["gate"] = config["gate"] and deserialize(config["gate"])
        return super().from_config(config)


@keras.saving.register_keras_serializable(package="tf_mtl")
class GatedDecoders(keras.layers.Layer):
    """SMTL_c's decoders of one task: the public decoder h_{S,t} on the
    public features and the private decoder h_t on the private ones (the
    two halves of the features), mixed by the task's gate:
    `a_t h_{S,t}(f_S) + (1 - a_t) h_t(f_t)`.

    Args:
        public, private: the two decoders (e.g. two `Task.head()`s).
        gate: a one-task `EncoderGate`.
    """

    def __init__(self, public, private, gate, **kwargs):
        super().__init__(**kwargs)
        self.public, self.private, self.gate = public, private, gate

    def call(self, features, training=None):
        shared, own = keras.ops.split(features, 2, axis=-1)
        task = tf.zeros(tf.shape(features)[:1], tf.int32)  # the gate's one task
        return self.gate(self.public(shared, training=training),
                         self.private(own, training=training), task, training=training)

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {**super().get_config(), "public": serialize(self.public),
                "private": serialize(self.private), "gate": serialize(self.gate)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("public", "private", "gate"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def safe_sharing(backbone, tasks, input_shape, jointly_labelled=True, lite=False,
                 tau=0.1, seed=0, gates_after_decoders=False):
    """An SMTL model: L-SMTL with `lite=True`, SMTL_c with
    `gates_after_decoders=True`, L-SMTL_c with both.

    Args:
        backbone: a backbone definition, `backbone(num_tasks=None)` -> list of
            layers (e.g. `functools.partial(backbones.lenet, 0.5)`): the public
            encoder and, with `num_tasks=T`, its per-task twin.
        tasks: the `Task`s; their decoders are the heads.
        input_shape: shape of one input example.
        jointly_labelled: data layout (see `MultiTaskModel`).
        lite, tau, seed: see `EncoderGate` (task t's gate after the decoders
            draws with seed `seed + t`).
        gates_after_decoders: SMTL_c: a public and a private decoder per
            task (each the task's head), gated on their outputs.
    """
    if not gates_after_decoders:
        gate = EncoderGate(len(tasks), lite=lite, tau=tau, seed=seed, name="smtl_gate")
        encoders = GatedEncoders(backbone(), backbone(num_tasks=len(tasks)), gate,
                                 name="smtl_encoders")
        return MultiTaskModel([encoders], tasks, input_shape, jointly_labelled)
    encoders = GatedEncoders(backbone(), backbone(num_tasks=len(tasks)),
                             name="smtl_encoders")
    heads = {t.name: GatedDecoders(
        t.head(), t.head(), EncoderGate(1, lite=lite, tau=tau, seed=seed + i,
                                        name=f"smtl_gate_{t.name}"),
        name=f"{t.name}_gated_decoders") for i, t in enumerate(tasks)}
    return MultiTaskModel([encoders], tasks, input_shape, jointly_labelled, heads=heads)


def define_flags():
    """absl flags of `train.py --method=smtl|lsmtl`."""
    from absl import flags

    flags.DEFINE_float("smtl_tau", 0.1, "Temperature of the lite gate's Gumbel "
                       "relaxation (eq. 4).", lower_bound=1e-6)


def from_flags(flag_values, backbone, tasks, input_shape, jointly_labelled, epochs,
               lite=False, gates_after_decoders=False):
    """The model and callbacks of `train.py --method=smtl|lsmtl|smtl_c|lsmtl_c`."""
    from tf_mtl.callbacks import GateHistory

    model = safe_sharing(backbone, tasks, input_shape, jointly_labelled, lite=lite,
                         tau=flag_values.smtl_tau, seed=flag_values.seed,
                         gates_after_decoders=gates_after_decoders)
    return model, [GateHistory([t.name for t in tasks])]
