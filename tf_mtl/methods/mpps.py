"""MPPS: multitask learning with progressive parameter sharing (papers/001).

`progressive_sharing` puts a `ProgressiveMask` after the last k conditioned
sites of a backbone; `ExclusiveCapacityScheduler` moves the
targets along the EC schedule. Training then minimises eq. (3) (with the N_t/N
weights of appendix 7.1 on non-jointly labelled data); evaluation and export
use the fully shared backbone.
"""

import os
import re

import keras
import numpy as np

from tf_mtl.backbones import sites
from tf_mtl.layers.progressive_mask import (
    ProgressiveMask,
    exclusive_capacity,
    exclusive_init,
    rescale_capacity,
)
from tf_mtl.methods.method import Method
from tf_mtl.model import MultiTaskModel
from tf_mtl.routing import routing_option
from tf_mtl.training import conditioned_layers


def progressive_sharing(backbone, tasks, input_shape, jointly_labelled=True,
                        num_masked=6, distribution="bernoulli", eps=0.01,
                        beta=1.0, sample_per="task", baseline_decay=0.9,
                        mask_learning_rate=0.01, hold_capacity=False, seed=0,
                        routing="sequential"):
    """An MPPS model.

    Args:
        backbone: list of layers with conditioning sites (`tf_mtl.backbones`).
        tasks: the `Task`s; at least 2.
        input_shape: shape of one input example.
        jointly_labelled: data layout (see `MultiTaskModel`).
        num_masked: k, the number of last sites that carry a mask; 6 in the
            paper (4.1, 4.3.1). A backbone with fewer sites is masked at all
            of them.
        distribution, eps, beta, sample_per, baseline_decay,
            mask_learning_rate, hold_capacity: see `ProgressiveMask`.
        seed: seed of the first mask; mask i uses `seed + i`.
        routing: `"sequential"` (default: within 1.10 x the FLOP bound and
            1.2 x the memory of hard sharing on both backbones of
            `benchmarks/speed.md`) or `"tiled"` (faster on LeNet, up to twice
            the memory), see `MultiTaskModel`.
    """
    if int(num_masked) < 1:
        raise ValueError(f"`num_masked` must be >= 1. Received: {num_masked}")
    chosen = sites(backbone)[-int(num_masked):]
    if not chosen:
        raise ValueError("The backbone has no conditioning site to mask.")
    for i, (block, site, _) in enumerate(chosen):
        block.condition(site, ProgressiveMask(
            len(tasks), distribution=distribution, eps=eps, beta=beta,
            sample_per=sample_per, baseline_decay=baseline_decay,
            mask_learning_rate=mask_learning_rate, hold_capacity=hold_capacity,
            seed=None if seed is None else seed + i, name=f"mpps_mask_{i}",
        ))
    return MultiTaskModel(backbone, tasks, input_shape, jointly_labelled,
                          routing=routing)


def define_flags():
    """absl flags of `train.py --method=mpps`.

    Their defaults are chosen on validation (`benchmarks/share_proportions.md`:
    held capacity, beta 0.01, a mask per example, Phi's SGD at 0.01, best
    on the three-task set and within a standard deviation of the paper's
    setting on MultiFashion and FashionGroups); the paper's eq. 3 with
    Algorithm 1 as written is `--nompps_hold_capacity --mpps_beta=1
    --mpps_sample_per=task --mpps_mask_learning_rate=0.01`, the defaults of
    `progressive_sharing` itself.
    """
    from absl import flags

    from tf_mtl.layers.progressive_mask import DISTRIBUTIONS, SAMPLE_PER

    flags.DEFINE_enum("mpps_distribution", "bernoulli", DISTRIBUTIONS,
                      "Mask distribution (3.3): bernoulli, gaussian (the paper's "
                      "N(1, r(phi)^2)) or gaussian_matched (N(phi, phi (1 - phi))).")
    flags.DEFINE_integer("mpps_layers", 6, "k: number of last sites masked (4.3.1).",
                         lower_bound=1)
    flags.DEFINE_string("mpps_schedule", "linear",
                        "EC schedule: separ, fullshare, linear, quad or stepN.")
    flags.DEFINE_integer("mpps_frozen_start", None, "Frozen epochs at the start "
                         "(4.3.2); default: an eighth of --epochs, rounded.",
                         lower_bound=0)
    flags.DEFINE_integer("mpps_frozen_end", None, "Frozen epochs at the end (4.3.2); "
                         "default: an eighth of --epochs, rounded.", lower_bound=0)
    flags.DEFINE_float("mpps_beta", 0.01, "Coefficient of the KL term (appendix).",
                       lower_bound=0.0)
    flags.DEFINE_float("mpps_eps", 0.01, "Probability clipping eps.",
                       lower_bound=1e-6, upper_bound=0.49)
    flags.DEFINE_enum("mpps_sample_per", "example", SAMPLE_PER,
                      "One mask per task per step (Algorithm 1) or per example.")
    flags.DEFINE_float("mpps_baseline_decay", 0.9,
                       "Decay of the REINFORCE moving-average baseline; 0: none "
                       "(the paper's plain estimator).",
                       lower_bound=0.0, upper_bound=0.999)
    flags.DEFINE_float("mpps_mask_learning_rate", 0.01,
                       "Train Phi by plain SGD at this rate; 0: with the model's "
                       "optimizer.", lower_bound=0.0)
    flags.DEFINE_bool("mpps_hold_capacity", True,
                      "Hold the EC of Phi on the target's after every step, so "
                      "the loss only moves capacity between guests "
                      "(see ProgressiveMask).")
    flags.DEFINE_bool("mpps_update_target", True,
                      "Algorithm 1's target update; false: 'without updating' (4.3.4).")
    flags.register_validator(
        "mpps_schedule", _valid_schedule,
        message="--mpps_schedule must be separ, fullshare, linear, quad or stepN.")
    flags.register_multi_flags_validator(
        ["method", "epochs", "mpps_frozen_start", "mpps_frozen_end"], _frozen_epochs_fit,
        message="MPPS's frozen epochs (--mpps_frozen_start + --mpps_frozen_end) must fit "
                "in --epochs.")


def _frozen_epochs_fit(values):
    frozen = [values[k] or 0 for k in ("mpps_frozen_start", "mpps_frozen_end")]
    return values["method"] != "mpps" or sum(frozen) <= values["epochs"]


def _valid_schedule(name):
    try:
        parse_schedule(name)
    except ValueError:
        return False
    return True


def from_flags(flag_values, backbone, tasks, input_shape, jointly_labelled, epochs):
    """The model and callbacks of `train.py --method=mpps`.

    `backbone` is the backbone definition: `backbone()` makes one.
    """
    f = flag_values
    model = progressive_sharing(
        backbone(), tasks, input_shape, jointly_labelled,
        num_masked=f.mpps_layers, distribution=f.mpps_distribution,
        eps=f.mpps_eps, beta=f.mpps_beta, sample_per=f.mpps_sample_per,
        baseline_decay=f.mpps_baseline_decay or None,
        mask_learning_rate=f.mpps_mask_learning_rate or None,
        hold_capacity=f.mpps_hold_capacity, seed=f.seed,
        **routing_option(f.routing),
    )
    frozen = [default_frozen_epochs(epochs) if n is None else n
              for n in (f.mpps_frozen_start, f.mpps_frozen_end)]
    scheduler = ExclusiveCapacityScheduler(epochs, f.mpps_schedule, *frozen,
                                           f.mpps_update_target)
    return model, [scheduler]


def default_frozen_epochs(epochs):
    """Frozen epochs at each end when none are given: the paper freezes 15-25
    of 200 epochs (4.3.2); an eighth of the run, rounded, is 1 of 8 epochs
    (so 8 epochs train 2 at each end, with the exclusive first course and
    the fully shared last one) and none of 1 to 4."""
    return round(epochs / 8)


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

    history_key = "mpps"

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
        masks = conditioned_layers(self.model, ProgressiveMask)
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

    def plot(self, folder, task_names):
        """`ec.png`, and the share proportions of Figures 6-7 for 3 to 5 tasks
        (for T tasks a panel per task of C(T-1, 2) lines per layer:
        unreadable, and minutes to draw, for 20)."""
        from tf_mtl import plots

        plots.plot_capacity(self.history, os.path.join(folder, "ec.png"))
        if 3 <= len(task_names) <= 5:
            plots.plot_share_proportions(self.history, task_names,
                                         os.path.join(folder, "share_proportions.png"))


METHODS = (Method("mpps", "progressive parameter sharing (MPPS)", from_flags),)
