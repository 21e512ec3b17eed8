"""Callbacks that change or record sharing state between epochs."""

import re

import keras
import numpy as np

from tf_mtl.layers.gate import EncoderGate
from tf_mtl.layers.progressive_mask import (
    ProgressiveMask,
    exclusive_capacity,
    exclusive_init,
    rescale_capacity,
)
from tf_mtl.training import conditioned_layers

FIXED_SCHEDULES = ("separ", "fullshare", "linear", "quad")
SCHEDULES = FIXED_SCHEDULES + ("stepN",)


def sharing_progress(schedule, epoch, epochs, frozen_start=0, frozen_end=0):
    """How far the EC schedule of MPPS Figure 3 is at `epoch`, in [0, 1]:
    0 is the exclusive start (EC = 1 - eps), 1 full sharing (EC = eps).

    - `separ` stays at 0 and `fullshare` at 1 (fixed targets);
    - the others split the S = epochs - frozen_start - frozen_end scheduled
      epochs into N courses of equal length and put course k (0-based) at
      `k / (N - 1)`: the first course is the exclusive start, the last one
      full sharing, and the frozen epochs lengthen those two (3.5, 4.3.2).
      `stepN` (`step5`, ...) has N courses, `linear` one per epoch (N = S),
      and `quad` is `linear` squared.

    Epoch 0 always trains at the exclusive initialisation, which is course 0.
    The paper does not say which way Quad bends; `u^2` keeps the target
    exclusive longest, in the spirit of the curriculum.
    """
    name, courses = parse_schedule(schedule)
    if name == "separ":
        return 0.0
    if name == "fullshare":
        return 1.0
    if epoch < frozen_start:
        return 0.0
    if epoch >= epochs - frozen_end:
        return 1.0
    scheduled = epochs - frozen_start - frozen_end
    step = epoch - frozen_start
    if name == "step":
        course, last = step * courses // scheduled, courses - 1
    else:
        course, last = step, scheduled - 1
    u = course / last if last > 0 else 1.0
    return u * u if name == "quad" else u


def parse_schedule(schedule):
    """`(name, courses)` of a schedule name; raises on an unknown one."""
    match = re.fullmatch(r"step([1-9][0-9]*)", schedule)
    if match:
        return "step", int(match.group(1))
    if schedule in FIXED_SCHEDULES:
        return schedule, None
    raise ValueError(
        f"Unknown EC schedule {schedule!r}: expected one of separ, fullshare, "
        "linear, quad or stepN (step5, step10, ...)."
    )


def capacity_bounds(eps):
    """The EC of the exclusive initialisation and of full sharing."""
    return 1.0 - eps, eps


class ExclusiveCapacityScheduler(keras.callbacks.Callback):
    """The EC scheduler and target update of MPPS (section 3.5, Algorithm 1).

    At the start of epoch i (Algorithm 1's update at the end of epoch i - 1,
    with the same Phi) it takes the target EC
    `C = C_max - s(i) * (C_max - C_min)` from the schedule `s`
    (`sharing_progress`), C_max = 1 - eps (exclusive) and C_min = eps (full
    sharing), and sets every mask's target to

    - with `update_target=True` (Algorithm 1): `Pi = 1 - (C / EC(Phi)) (1 - Phi)`,
      the learned Phi with its remaining capacity rescaled;
    - with `update_target=False` ("without updating", 4.3.4): the same
      rescaling of the exclusive initialisation, so Pi moves with the
      schedule alone.

    The EC used is the normalised one of 3.3 (see `rescale_capacity`).
    Logs gain `ec` (EC of Phi over all masked channels), `ec_target` (that of
    the target in force during the epoch) and `ec_{layer}` per mask layer.
    `history` keeps them per epoch with a copy of every Phi, for the figures.

    The position needs no state of its own: it is the epoch `fit` passes,
    which `keras.callbacks.BackupAndRestore` restores. Setting the target when
    an epoch begins, not when the last one ends, keeps a checkpoint written
    at an epoch's end (by a callback before or after this one) complete: a
    resumed epoch recomputes its target from the restored Phi. A fixed
    schedule (`fullshare`) so has its target from the first step.

    Args:
        epochs: the length of training the schedule spans.
        schedule: one of `SCHEDULES` (`linear` is the paper's default).
        frozen_start, frozen_end: frozen epochs at the start and the end.
        update_target: Algorithm 1's update (default) or the linear variant.
    """

    def __init__(self, epochs, schedule="linear", frozen_start=0, frozen_end=0,
                 update_target=True):
        super().__init__()
        parse_schedule(schedule)
        if frozen_start < 0 or frozen_end < 0 or frozen_start + frozen_end > epochs:
            raise ValueError(
                "Frozen epochs must be >= 0 and fit in the training: "
                f"frozen_start={frozen_start} + frozen_end={frozen_end} > "
                f"epochs={epochs}"
            )
        self.epochs = epochs
        self.schedule = schedule
        self.frozen_start = frozen_start
        self.frozen_end = frozen_end
        self.update_target = update_target
        self.history = []

    def on_train_begin(self, logs=None):
        epochs = (self.params or {}).get("epochs")
        if epochs is not None and epochs != self.epochs:
            raise ValueError(
                f"ExclusiveCapacityScheduler spans epochs={self.epochs} but "
                f"fit runs epochs={epochs}: give it the same number."
            )

    def _masks(self):
        masks = [l for l in conditioned_layers(self.model)
                 if isinstance(l, ProgressiveMask)]
        if not masks:
            raise ValueError("ExclusiveCapacityScheduler: the model has no "
                             "ProgressiveMask (build it with progressive_sharing).")
        return masks

    def capacity_at(self, epoch, eps):
        """C_i, the target EC during `epoch`."""
        high, low = capacity_bounds(eps)
        progress = sharing_progress(self.schedule, epoch, self.epochs,
                                    self.frozen_start, self.frozen_end)
        return high - progress * (high - low)

    def on_epoch_begin(self, epoch, logs=None):
        """Sets every mask's target for `epoch` (Algorithm 1's update, from
        Phi as the previous epoch left it)."""
        for mask in self._masks():
            capacity = self.capacity_at(epoch, mask.eps)
            source = (mask.mask_probs if self.update_target else
                      exclusive_init(*mask.mask_probs.shape, mask.eps))
            mask.target_probs.assign(rescale_capacity(source, capacity, mask.eps))
            mask.target_capacity.assign(capacity)
            if mask.hold_capacity:  # the course starts with Phi on its capacity
                mask.mask_probs.assign(mask.project(mask.mask_probs))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        masks = self._masks()
        per_layer = {m.name: exclusive_capacity(m.mask_probs).numpy() for m in masks}
        targets = [exclusive_capacity(m.target_probs).numpy() for m in masks]
        record = {
            "ec": float(np.mean(np.concatenate(list(per_layer.values())))),
            "ec_target": float(np.mean(np.concatenate(targets))),
            **{f"ec_{name}": float(ec.mean()) for name, ec in per_layer.items()},
        }
        logs.update(record)
        self.history.append({
            "epoch": epoch, **record,
            "mask_probs": {m.name: m.mask_probs.numpy().tolist() for m in masks},
        })


class GateHistory(keras.callbacks.Callback):
    """Logs each task's Safe MTL gate at every epoch's end.

    Logs gain `alpha_{task}`: the weight (soft gate) or the probability
    (lite gate) of the public encoder for that task. `history` keeps them per
    epoch for the figure (`tf_mtl.plots.plot_gates`).

    Args:
        task_names: the model's tasks, in task-id order.
    """

    def __init__(self, task_names):
        super().__init__()
        self.task_names = list(task_names)
        self.history = []

    def on_epoch_end(self, epoch, logs=None):
        gates = [l for l in conditioned_layers(self.model) if isinstance(l, EncoderGate)]
        if not gates:
            raise ValueError("GateHistory: the model has no EncoderGate "
                             "(build it with methods.safe_sharing).")
        # One gate of T tasks (SMTL), or one gate per task (SMTL_c), in task order.
        probs = np.concatenate([g.public_probs().numpy() for g in gates])
        alpha = {name: float(a) for name, a in zip(self.task_names, probs, strict=True)}
        if logs is not None:
            logs.update({f"alpha_{name}": a for name, a in alpha.items()})
        self.history.append({"epoch": epoch, "alpha": alpha})


class MaximumRoaming(keras.callbacks.Callback):
    """The update plan of Maximum Roaming (papers/003, Definition 1) for
    every `ChannelPartition` of the model, and its record.

    Every `interval` epochs (fractions allowed: counted in training steps,
    `round(interval * steps_per_epoch)`, at least 1), each partition takes
    one `roam` step, until its update ratio r(c) reaches `completion`
    (eq. 6) or its plan is over. The step count is the model optimizer's
    `iterations`, which a checkpoint restores. `completion=0` keeps the
    partitions fixed (Task Routing), still recorded.

    Logs gain, per epoch, `update_ratio` and `overlap` (the means over the
    partitions of r(c) and of the fraction of channels two tasks share);
    `history` keeps them per epoch and per partition for
    `tf_mtl.plots.plot_roaming`.

    Args:
        interval: Delta, in epochs.
        completion: r at which the plan stops, in [0, 1].
        selection: `"random"` or `"least_aligned"` (`ChannelPartition.roam`;
            the latter for partitions at a `tf_mtl.backbones` site).
        steps_per_epoch: needed for fractional intervals when `fit` does not
            know its number of steps.
    """

    def __init__(self, interval=1.0, completion=1.0, selection="random",
                 steps_per_epoch=None):
        super().__init__()
        from tf_mtl.layers.partition import SELECTIONS

        if not interval > 0:
            raise ValueError(f"`interval` must be > 0 epochs. Received: interval={interval}")
        if not 0.0 <= completion <= 1.0:
            raise ValueError(f"`completion` must be in [0, 1]. Received: {completion}")
        if selection not in SELECTIONS:
            raise ValueError(f"`selection` must be one of {SELECTIONS}. "
                             f"Received: selection={selection!r}")
        self.interval, self.completion, self.selection = interval, completion, selection
        self.steps_per_epoch = steps_per_epoch
        self.history = []

    def _partitions(self):
        """`[(partition, kernel or None)]`: the kernel of the layer each
        partition masks, needed by `least_aligned` selection only."""
        from tf_mtl.backbones import Block
        from tf_mtl.layers.partition import ChannelPartition

        kernels = {}
        if self.selection == "least_aligned":
            for block in self.model._flatten_layers(include_self=False, recursive=True):
                if isinstance(block, Block):
                    for site, layer in block.conditioned.items():
                        kernels[id(layer)] = block.site_kernel(int(site))
        found = [(layer, kernels.get(id(layer))) for layer in conditioned_layers(self.model)
                 if isinstance(layer, ChannelPartition)]
        if not found:
            raise ValueError("MaximumRoaming: the model has no ChannelPartition "
                             "(build it with methods.maximum_roaming).")
        return found

    def on_train_begin(self, logs=None):
        steps = (self.params or {}).get("steps") or self.steps_per_epoch
        if steps is None and self.interval != int(self.interval):
            raise ValueError(
                f"MaximumRoaming: interval={self.interval} epochs needs the number of "
                "steps per epoch, which fit does not know: pass `steps_per_epoch`.")
        self._interval_steps = max(1, round(self.interval * (steps or 0))) if steps else None
        self._partitions_found = self._partitions()

    def _update(self, times=1):
        for _ in range(times):
            for partition, kernel in self._partitions_found:
                partition.roam(self.completion, self.selection,
                               None if kernel is None else kernel.numpy())

    def _slot(self):
        return int(self.model.optimizer.iterations.numpy()) // self._interval_steps

    def on_train_batch_begin(self, batch, logs=None):
        if self._interval_steps:
            self._slot_before = self._slot()

    def on_train_batch_end(self, batch, logs=None):
        # One update per interval boundary the step count crossed: a batch
        # may advance it by several (`steps_per_execution`) or by none (a
        # loss-scale skip), so no `iterations % interval` test.
        if self._interval_steps:
            self._update(self._slot() - self._slot_before)

    def on_epoch_end(self, epoch, logs=None):
        if self._interval_steps is None and (epoch + 1) % int(self.interval) == 0:
            self._update()  # whole epochs, without a step count
        partitions = [p for p, _ in self._partitions_found]
        record = {"update_ratio": float(np.mean([p.update_ratio() for p in partitions])),
                  "overlap": float(np.mean([p.overlap() for p in partitions]))}
        if logs is not None:
            logs.update(record)
        self.history.append({"epoch": epoch, **record, "layers": {
            p.name: {"update_ratio": p.update_ratio(), "overlap": p.overlap(),
                     "updates": int(p.updates.numpy())} for p in partitions}})


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
        self._network = [v for layer in self.model._flatten_layers(include_self=True)
                         for v in layer._trainable_variables if id(v) not in matrices]
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
