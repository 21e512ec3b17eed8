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
