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

import functools
import os

import keras
import numpy as np
import tensorflow as tf

from tf_mtl.backbones import Block, run_layers, run_routed
from tf_mtl.bilevel import hypergradients
from tf_mtl.layers.gate import EncoderGate
from tf_mtl.methods.method import Method
from tf_mtl.model import MultiTaskModel
from tf_mtl.training import conditioned_layers


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
        if task_ids is None and route is None:
            return super().call(x, training=training)  # refused: it routes
        shared, _ = run_layers(self.public, x, route, training, task_ids)
        if task_ids is None:
            private, routed = run_routed(self.private, x, route, training)
        else:
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


@keras.saving.register_keras_serializable(package="tf_mtl")
class SafeSharing(MultiTaskModel):
    """A Safe MTL model (what `safe_sharing` builds): a `MultiTaskModel` on
    `GatedEncoders`, trained single-level (problem 2) or bi-level.

    **Bi-level** (`bilevel=True`, section 4.4, problem 6): the gates are
    hyperparameters fitted on held-out data, everything else on the
    training data: `fit(train, heldout_data=heldout)`. Each step, as in the
    reference code,

    1. a virtual plain-SGD step of the network on the training batch,
       `w' = w - xi * grad_w L_train(w, a)` (xi = `virtual_learning_rate`);
    2. a step of the gates, by their own Adam, on the held-out loss of the
       virtual network, `d L_val(w'(a), a) / d a`: exact, second order
       (the gradient flows through `grad_w L_train`; the reference code
       approximates that Hessian-vector product by finite differences);
       `virtual_learning_rate=0` is the first-order version,
       `d L_val(w, a) / d a`, one forward-backward pass cheaper;
    3. the real step of the network (not the gates) on the training loss.

    The virtual passes change no state: no normalisation statistics, draw
    count or metric moves (they run in a `keras.StatelessScope`). So the
    virtual passes and the real step see the same random draws (the lite
    gates' Gumbel noise, dropout masks), as one network evaluated twice.
    `fit`'s `validation_data` metrics are plain evaluation: when it is the
    held-out set too (`train.py` passes its validation split as both), they
    are not held out from the gates.

    **Deployment**: `deployable_call()` is the inference function with each
    lite gate's choice fixed: only the chosen encoders (and SMTL_c
    decoders) run, with no gate op; `tf_mtl.export` traces it.

    Args:
        backbone: `[GatedEncoders(...)]`.
        tasks, input_shape, jointly_labelled, heads: see `MultiTaskModel`.
        bilevel: train the gates on `fit`'s `heldout_data`.
        virtual_learning_rate: xi of the virtual step (bi-level; 1e-4 in
            the reference code; 0: first order).
        gate_learning_rate: the gates' Adam (bi-level).
    """

    def __init__(self, backbone, tasks, input_shape, jointly_labelled=True, bilevel=False,
                 virtual_learning_rate=1e-4, gate_learning_rate=1e-3, **kwargs):
        backbone = list(backbone)
        if len(backbone) != 1 or not isinstance(backbone[0], GatedEncoders):
            raise ValueError("SafeSharing's backbone is one GatedEncoders block; build "
                             f"it with methods.safe_sharing. Received: {backbone}")
        if virtual_learning_rate < 0 or not gate_learning_rate > 0:
            raise ValueError(
                "`virtual_learning_rate` must be >= 0 and `gate_learning_rate` > 0. "
                f"Received: {virtual_learning_rate}, {gate_learning_rate}")
        super().__init__(backbone, tasks, input_shape, jointly_labelled, **kwargs)
        if bilevel and self.routing != "tiled":
            raise ValueError("Bi-level SafeSharing trains on tiled routing only. "
                             f"Received: routing={self.routing!r}, bilevel=True")
        self.bilevel = bool(bilevel)
        self.virtual_learning_rate = float(virtual_learning_rate)
        self.gate_learning_rate = float(gate_learning_rate)
        self.gate_optimizer = (keras.optimizers.Adam(gate_learning_rate, name="gate_adam")
                               if self.bilevel else None)

    def get_config(self):
        return {**super().get_config(), "bilevel": self.bilevel,
                "virtual_learning_rate": self.virtual_learning_rate,
                "gate_learning_rate": self.gate_learning_rate}

    @property
    def gates(self):
        """The `EncoderGate`s, in task order."""
        return conditioned_layers(self, EncoderGate)

    @property
    def gate_logits(self):
        """The gates' variables, which bi-level training fits on held-out data."""
        return [g.logits for g in self.gates]

    # -- bi-level training ---------------------------------------------------

    def compile(self, optimizer="adam", weighting=None, aggregator=None, **kwargs):
        if self.bilevel and (weighting is not None or aggregator is not None):
            raise ValueError(
                "Bi-level SafeSharing trains on the summed task losses (its "
                "hypergradient step is eq. 5 of the paper): it takes no `weighting` "
                f"or `aggregator`. Received: weighting={weighting!r}, "
                f"aggregator={aggregator!r}")
        super().compile(optimizer, weighting=weighting, aggregator=aggregator, **kwargs)

    def takes_heldout_data(self):
        return self.bilevel or super().takes_heldout_data()

    def variable_optimizers(self):
        owners = super().variable_optimizers()
        if self.bilevel:
            owners.update({id(v): self.gate_optimizer for v in self.gate_logits})
        return owners

    def build_optimizer(self):
        super().build_optimizer()
        if self.bilevel and isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # Mixed precision: the gates' step scales its loss too, and skips
            # when a gradient overflows.
            if not isinstance(self.gate_optimizer, keras.optimizers.LossScaleOptimizer):
                self.gate_optimizer = keras.optimizers.LossScaleOptimizer(self.gate_optimizer)
        if self.bilevel and not self.gate_optimizer.built:
            with self.distribute_strategy.scope():
                self.gate_optimizer.build(self.gate_logits)

    def step_variables(self):
        if not self.bilevel:
            return super().step_variables()
        gates = self.gate_logits
        return [v for v in self.trainable_variables if all(v is not g for g in gates)]

    def fit_heldout(self, train, heldout):
        if not self.bilevel:
            return super().fit_heldout(train, heldout)
        gates = self.gate_logits
        self.gate_optimizer.apply_gradients(
            zip(self._hypergradients(train, heldout, self.step_variables(), gates), gates))

    def _hypergradients(self, train, heldout, network, gates):
        """`d L_val(w - xi grad_w L_train(w, a), a) / d a` (steps 1-2)."""
        return hypergradients(self, train, heldout, network, gates,
                              self.virtual_learning_rate or None,
                              heldout_optimizer=self.gate_optimizer)

    # -- deployment ----------------------------------------------------------

    def deployable_call(self):
        encoders, gates = self.backbone[0], self.gates
        if not all(g.lite for g in gates):
            return super().deployable_call()
        public = np.concatenate([g.public_weight(training=False).numpy() for g in gates]) > 0
        private = {t: self._private_encoder(t) for t in range(self.num_tasks) if not public[t]}
        after = encoders.gate is None

        def call(x):
            if public.any():
                shared, _ = run_layers(encoders.public, x, None, False)
            outputs = {}
            for t, name in enumerate(self.task_names):
                features = shared if public[t] else run_layers(private[t], x, None, False)[0]
                head = self.heads[name]
                if after:
                    head = head.public if public[t] else head.private
                outputs[name] = head(features, training=False)
            return outputs

        return call

    def _private_encoder(self, task):
        """Task `task`'s private encoder as plain layers of its own: a copy of
        the public encoder's definition holding that task's private weights."""
        encoders = self.backbone[0]
        copy = [keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(l))
                for l in encoders.public]
        run_layers(copy, np.zeros((1,) + self.example_shape, "float32"), None, False)
        for plain, twin in zip(copy, encoders.private, strict=True):
            plain.set_weights([w[task] for w in twin.get_weights()])
        return copy


def safe_sharing(backbone, tasks, input_shape, jointly_labelled=True, lite=False,
                 tau=0.1, seed=0, gates_after_decoders=False, **kwargs):
    """A Safe MTL model (`SafeSharing`): SMTL; L-SMTL with `lite=True`,
    SMTL_c with `gates_after_decoders=True`, L-SMTL_c with both.

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
        **kwargs: of `SafeSharing`: `bilevel`, `virtual_learning_rate`,
            `gate_learning_rate`.
    """
    heads = None
    if not gates_after_decoders:
        gate = EncoderGate(len(tasks), lite=lite, tau=tau, seed=seed, name="smtl_gate")
    else:
        gate = None
        heads = {t.name: GatedDecoders(
            t.head(), t.head(), EncoderGate(1, lite=lite, tau=tau, seed=seed + i,
                                            name=f"smtl_gate_{t.name}"),
            name=f"{t.name}_gated_decoders") for i, t in enumerate(tasks)}
    encoders = GatedEncoders(backbone(), backbone(num_tasks=len(tasks)), gate,
                             name="smtl_encoders")
    return SafeSharing([encoders], tasks, input_shape, jointly_labelled, heads=heads,
                       **kwargs)


def define_flags():
    """absl flags of `train.py --method=smtl|lsmtl|smtl_c|lsmtl_c`."""
    from absl import flags

    flags.DEFINE_float("smtl_tau", 0.1, "Temperature of the lite gate's Gumbel "
                       "relaxation (eq. 4).", lower_bound=1e-6)
    flags.DEFINE_bool("smtl_bilevel", False,
                      "Bi-level formulation (section 4.4): fit the gates on the "
                      "validation split (held out of the training set), the rest on "
                      "the training split.")
    flags.DEFINE_float("smtl_virtual_lr", 1e-4,
                       "Bi-level: learning rate of the virtual SGD step (0: first-order "
                       "gate gradients).", lower_bound=0.0)
    flags.register_multi_flags_validator(
        ["smtl_bilevel", "weighting", "aggregator"], _bilevel_takes_no_objective,
        message="Bi-level Safe MTL (--smtl_bilevel) trains on the summed task losses: it "
                "takes no --weighting or --aggregator.")


def _bilevel_takes_no_objective(values):
    return not values["smtl_bilevel"] or (values["weighting"] is None
                                          and values["aggregator"] is None)


def from_flags(flag_values, backbone, tasks, input_shape, jointly_labelled, epochs,
               lite=False, gates_after_decoders=False):
    """The model and callbacks of `train.py --method=smtl|lsmtl|smtl_c|lsmtl_c`."""
    model = safe_sharing(backbone, tasks, input_shape, jointly_labelled, lite=lite,
                         tau=flag_values.smtl_tau, seed=flag_values.seed,
                         gates_after_decoders=gates_after_decoders,
                         bilevel=flag_values.smtl_bilevel,
                         virtual_learning_rate=flag_values.smtl_virtual_lr,
                         gate_learning_rate=flag_values.learning_rate)
    return model, [GateHistory([t.name for t in tasks])]


class GateHistory(keras.callbacks.Callback):
    """Logs each task's Safe MTL gate at every epoch's end.

    Logs gain `alpha_{task}`: the weight (soft gate) or the probability
    (lite gate) of the public encoder for that task. `history` keeps them per
    epoch for the figure (`tf_mtl.plots.plot_gates`).

    Args:
        task_names: the model's tasks, in task-id order.
    """

    history_key = "smtl"

    def __init__(self, task_names):
        super().__init__()
        self.task_names = list(task_names)
        self.history = []

    def on_epoch_end(self, epoch, logs=None):
        gates = conditioned_layers(self.model, EncoderGate)
        if not gates:
            raise ValueError("GateHistory: the model has no EncoderGate "
                             "(build it with methods.safe_sharing).")
        # One gate of T tasks (SMTL), or one gate per task (SMTL_c), in task order.
        probs = np.concatenate([g.public_probs().numpy() for g in gates])
        alpha = {name: float(a) for name, a in zip(self.task_names, probs, strict=True)}
        if logs is not None:
            logs.update({f"alpha_{name}": a for name, a in alpha.items()})
        self.history.append({"epoch": epoch, "alpha": alpha})

    def plot(self, folder, task_names):
        from tf_mtl import plots

        plots.plot_gates(self.history, os.path.join(folder, "gates.png"))


METHODS = (
    Method("smtl", "Safe MTL, soft gates", from_flags),
    Method("lsmtl", "lite Safe MTL, Gumbel gates", functools.partial(from_flags, lite=True)),
    Method("smtl_c", "Safe MTL, gates after the decoders",
           functools.partial(from_flags, gates_after_decoders=True)),
    Method("lsmtl_c", "lite Safe MTL, gates after the decoders",
           functools.partial(from_flags, lite=True, gates_after_decoders=True)),
)
