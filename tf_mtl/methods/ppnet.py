"""Parameter Passing Networks (papers/004) and the baselines of its tables.

Every task has its own copy of the backbone (the per-task twin of its
definition, `tf_mtl.backbones`); PPNet passes those copies' weights between
tasks with a learned passing matrix per layer (`tf_mtl.layers.passing`),
trained in alternation with the weights by `ParameterPassing`. Task heads are never passed. The baselines (B.2):

- Self-Learn: the per-task copies, no passing (`passing=None`);
- Adj-only: passing throughout, W and A trained together (schedule `joint`);
- Adj-fixed: a fixed passing, only W trained (schedule `fixed`);
- Share-W: one backbone for every task (`methods.hard_sharing`);
- the trace regularisers of Smith et al. on the per-task weights
  (`TaskTraceRegularizer`, fixed and dynamic).
"""

import functools
import os

import keras

from tf_mtl._keras import created_trainable, flatten_layers
from tf_mtl.layers.passing import passing_spec
from tf_mtl.methods.method import Method
from tf_mtl.model import MultiTaskModel
from tf_mtl.routing import routing_option


def parameter_passing(backbone, tasks, input_shape, jointly_labelled=True, passing="layer",
                      variant="linear", conv_only=False, learning_rate=0.1, per_tensor=False,
                      kernel_regularizer=None, **kwargs):
    """A model of per-task copies of `backbone` whose layers pass weights.

    Args:
        backbone: a backbone definition (`tf_mtl.backbones.lenet`, ...):
            `backbone(num_tasks=T, passing=..., kernel_regularizer=...)`
            makes the twin (the last two only when set).
        tasks, input_shape, jointly_labelled: see `MultiTaskModel`.
        passing: `"layer"`, `"channel"`, or None (Self-Learn).
        variant, learning_rate, conv_only, per_tensor: see
            `tf_mtl.layers.passing.passing_spec`.
        kernel_regularizer: of the copies' kernels, e.g.
            `tf_mtl.regularizers.TaskTraceRegularizer` (the paper's
            regularised baselines).
        **kwargs: of `MultiTaskModel` (`routing`, `heads`).
    """
    options = {}
    if passing is not None:
        options["passing"] = passing_spec(passing, variant, learning_rate, conv_only,
                                          per_tensor)
    if kernel_regularizer is not None:
        options["kernel_regularizer"] = kernel_regularizer
    layers = backbone(num_tasks=len(tasks), **options)
    return MultiTaskModel(layers, tasks, input_shape, jointly_labelled, **kwargs)


# The paper's coefficients (B.2).
TRACE_STRENGTHS = {"fixed": 1e-5, "dynamic": 5e-5}


def define_flags():
    """absl flags of `train.py --method=ppnet` and its baselines."""
    from absl import flags

    from tf_mtl.layers.passing import PASSINGS, VARIANTS

    flags.DEFINE_enum("ppnet_passing", "layer", PASSINGS,
                      "Passing matrix per layer: T x T (layer) or (C T) x (C T) (channel).")
    flags.DEFINE_enum("ppnet_variant", "linear", VARIANTS,
                      "W' = W A (linear), W + W A (residual) or W + tanh(W A) (nonlinear).")
    flags.DEFINE_integer("ppnet_period", 10, "N: length of each self-/adjacent-learning "
                         "phase, in --ppnet_period_unit.", lower_bound=1)
    flags.DEFINE_enum("ppnet_period_unit", "epochs", ["epochs", "steps"],
                      "Unit of --ppnet_period.")
    flags.DEFINE_float("ppnet_passing_lr", 0.1, "Plain SGD learning rate of the passing "
                       "matrices (channel-wise: over C, the layer's channels).",
                       lower_bound=1e-8)
    flags.DEFINE_bool("ppnet_conv_only", False, "Pass convolution and dense weights only, "
                      "not batch normalisation's gamma and beta.")
    flags.DEFINE_bool("ppnet_per_tensor", False, "One passing matrix per passed weight "
                      "(kernel and bias, gamma and beta apart), as the reference code.")


def from_flags(flag_values, backbone, tasks, input_shape, jointly_labelled, epochs,
               schedule="alternate", trace=None):
    """The model and callbacks of `train.py --method=ppnet` and of the
    baselines: `schedule` `"joint"` (adj_only) or `"fixed"` (adj_fixed);
    `schedule=None`, no passing (self_learn), with `trace` `"fixed"` or
    `"dynamic"` the regularised baselines."""
    from tf_mtl.regularizers import TaskTraceRegularizer

    regularizer = trace and TaskTraceRegularizer(TRACE_STRENGTHS[trace], trace)
    model = parameter_passing(
        backbone, tasks, input_shape, jointly_labelled,
        passing=schedule and flag_values.ppnet_passing, variant=flag_values.ppnet_variant,
        conv_only=flag_values.ppnet_conv_only, learning_rate=flag_values.ppnet_passing_lr,
        per_tensor=flag_values.ppnet_per_tensor,
        kernel_regularizer=regularizer, **routing_option(flag_values.routing))
    if schedule is None:
        return model, []
    return model, [ParameterPassing(flag_values.ppnet_period, flag_values.ppnet_period_unit,
                                    schedule)]


PASSING_SCHEDULES = ("alternate", "joint", "fixed")


class ParameterPassing(keras.callbacks.Callback):
    """The training schedule of Parameter Passing Networks (papers/004,
    eq. 7 and B.2) for every passed layer (`PerTaskLayer(passing=...)`).

    - `"alternate"` (PPNet): self-learning for `period`, where the network
      trains and every passing matrix A is frozen; then adjacent learning
      for `period`, where only the A train (each by its layer's plain SGD)
      and every network weight is frozen; and so on. Each adjacent phase
      ends with a set-back (`W <- W'`, A reset), and so does training.
      Normalisation keeps batch statistics and updates its moving
      statistics in both phases (the network is in training mode; only
      its weights are frozen).
    - `"joint"` (the paper's Adj-only baseline): W and A train together at
      every step; set back at the end of training.
    - `"fixed"` (Adj-fixed): A is set once to a fixed passing,
      `(I + 11^T / T) / 2` layer-wise (each task keeps half of its weights
      and takes half of the tasks' mean; `kron(I_C, .)` channel-wise), and
      never trains; W trains through it.

    The phase is a function of the epoch and the step in it, so a run
    resumed at an epoch's start is in the phase an uninterrupted run would
    be (with `steps_per_execution` > 1, a phase starts with the first
    execution that begins at or after its boundary). Entering self-learning
    always sets back (a no-op when A already passes nothing), so a run
    resumed after an adjacent phase still is.
    The network optimizer's moments are kept across phases and set-backs,
    as in the reference code (which writes the passed weights into the
    parameters in place): `W'` differs from W by one phase of A's steps,
    and Adam's per-coordinate scales stay meaningful for it; resetting them
    would restart Adam's bias correction every 2 periods. Its `iterations`
    count the adjacent steps too, though it takes none there: a learning
    rate schedule is a function of `iterations`, and one over the run's N
    steps must reach its end at step N (Keras' Adam then corrects its
    moments' bias for every step, where PyTorch's counts its updates: a
    difference that fades once `beta_2 ** steps` is small).

    Logs gain `adjacent` (1 in adjacent learning). `history` holds, per
    adjacent phase, the epoch of its last step and the task affinity of
    every passed layer (appendix I.2, `tf_mtl.layers.passing.
    task_affinity`; with a matrix per weight, its first weight's) taken
    before its set-back, for `tf_mtl.plots.plot_affinity`.

    Args:
        period: N, the length of each phase (10 epochs in the paper).
        unit: `"epochs"` or `"steps"`.
        schedule: `"alternate"`, `"joint"` or `"fixed"`.
        steps_per_epoch: for `unit="steps"` when `fit` does not know it.
    """

    history_key = "passing"

    def __init__(self, period=10, unit="epochs", schedule="alternate",
                 steps_per_epoch=None):
        super().__init__()
        if not (isinstance(period, int) and period >= 1):
            raise ValueError(f"`period` must be an integer >= 1. Received: period={period!r}")
        if unit not in ("epochs", "steps"):
            raise ValueError(f"`unit` must be 'epochs' or 'steps'. Received: unit={unit!r}")
        if schedule not in PASSING_SCHEDULES:
            raise ValueError(f"`schedule` must be one of {PASSING_SCHEDULES}. "
                             f"Received: schedule={schedule!r}")
        self.period, self.unit, self.schedule = period, unit, schedule
        self.steps_per_epoch = steps_per_epoch
        self.history = []

    def on_train_begin(self, logs=None):
        from tf_mtl.layers.passing import fixed_matrix, passed_layers

        self._layers = passed_layers(self.model)
        if not self._layers:
            raise ValueError("ParameterPassing: the model has no passed layer "
                             "(build it with methods.parameter_passing).")
        self._steps = (self.params or {}).get("steps") or self.steps_per_epoch
        if self.unit == "steps" and self._steps is None:
            raise ValueError("ParameterPassing: a period in steps needs the number of "
                             "steps per epoch, which fit does not know: pass "
                             "`steps_per_epoch`.")
        matrices = {id(m) for l in self._layers for m in l.passing_matrices}
        # Every weight created trainable, whatever a phase left it at.
        self._network = [v for layer in flatten_layers(self.model)
                         for v in created_trainable(layer) if id(v) not in matrices]
        self._phase = self._trained_epoch = None
        self._train_functions = {}  # one trace per phase, kept for the fit
        if self.schedule == "fixed":
            for layer in self._layers:
                if layer.passes_nothing():
                    for matrix in layer.passing_matrices:
                        matrix.assign(fixed_matrix(layer))
            self._freeze(passing=True)

    def _set_trainable(self, network, passing):
        for v in self._network:
            v.trainable = network
        for layer in self._layers:
            for matrix in layer.passing_matrices:
                matrix.trainable = passing

    def _freeze(self, passing):
        """Freezes the passing matrices (`passing`) or the network, and
        trains with the step traced on the variables left trainable."""
        self._set_trainable(network=passing, passing=not passing)
        if passing not in self._train_functions:
            self.model.make_train_function(force=True)
            self._train_functions[passing] = self.model.train_function
        self.model.train_function = self._train_functions[passing]

    def phase_at(self, epoch, batch):
        """`"self"` or `"adjacent"` at step `batch` of `epoch`."""
        if self.schedule != "alternate":
            return self.schedule
        position = epoch if self.unit == "epochs" else epoch * self._steps + batch
        return "adjacent" if (position // self.period) % 2 else "self"

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._first_batch = batch
        phase = self.phase_at(self._epoch, batch)
        if phase == self._phase or self.schedule != "alternate":
            return
        if phase == "self":
            self._set_back()
        self._freeze(passing=phase == "self")
        self._phase = phase

    def on_train_batch_end(self, batch, logs=None):
        self._trained_epoch = self._epoch
        if self._phase == "adjacent":  # the steps of this execution
            self.model.optimizer.iterations.assign_add(batch - self._first_batch + 1)

    def _set_back(self):
        from tf_mtl.layers.passing import task_affinity

        if not all(layer.passes_nothing() for layer in self._layers):
            # The epoch of the phase's last step (before a resume: the last
            # epoch the checkpoint holds).
            epoch = self._epoch - 1 if self._trained_epoch is None else self._trained_epoch
            self.history.append({"epoch": epoch, "affinity": {
                layer.name: task_affinity(layer.passing_matrix.numpy(), layer.num_tasks,
                                          layer.passing_variant).tolist()
                for layer in self._layers}})
        for layer in self._layers:
            layer.set_back()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["adjacent"] = float(self._phase == "adjacent")

    def on_train_end(self, logs=None):
        if self.schedule != "fixed":
            self._set_back()
        self._set_trainable(network=True, passing=True)
        self.model.train_function = None  # the next fit traces its own

    def plot(self, folder, task_names):
        from tf_mtl import plots

        plots.plot_affinity(self.history, task_names, os.path.join(folder, "affinity.png"))


METHODS = (
    Method("ppnet", "Parameter Passing Networks", from_flags),
    Method("adj_only", "PPNet's Adj-only: weights and passing trained together",
           functools.partial(from_flags, schedule="joint")),
    Method("adj_fixed", "PPNet's Adj-fixed: a fixed passing",
           functools.partial(from_flags, schedule="fixed")),
    Method("self_learn", "PPNet's Self-Learn: per-task copies, no passing",
           functools.partial(from_flags, schedule=None)),
    Method("trace_fixed", "per-task copies with the fixed trace regulariser",
           functools.partial(from_flags, schedule=None, trace="fixed")),
    Method("trace_dynamic", "per-task copies with the dynamic trace regulariser",
           functools.partial(from_flags, schedule=None, trace="dynamic")),
)
