"""Maximum Roaming (papers/003) and fixed partitioning (Task Routing).

`maximum_roaming` puts a `ChannelPartition` at every site of a backbone
(after normalisation, before the activation: eq. 2); the
`MaximumRoaming` callback runs the update plan. Without it
(or with `completion=0`) the partitions stay fixed: Task Routing
(Strezoski et al. 2019). The paper runs one forward pass per task; here all
tasks run in one tiled pass (or one pass each, `routing="sequential"`),
in training and at inference, where each task keeps its own mask.
"""

import functools
import os

import keras
import numpy as np

from tf_mtl._keras import flatten_layers
from tf_mtl.backbones import sites
from tf_mtl.layers.partition import ChannelPartition
from tf_mtl.methods.method import Method
from tf_mtl.model import MultiTaskModel
from tf_mtl.routing import routing_option
from tf_mtl.training import conditioned_layers


def maximum_roaming(backbone, tasks, input_shape, jointly_labelled=True,
                    sharing_ratio=0.5, seed=0, routing="tiled"):
    """A model with a binary channel partition at every site of `backbone`.

    Args:
        backbone: list of layers with conditioning sites (`tf_mtl.backbones`).
        tasks: the `Task`s.
        input_shape: shape of one input example.
        jointly_labelled: data layout (see `MultiTaskModel`).
        sharing_ratio: p, the fraction of each layer's channels a task uses
            (the same for every layer).
        seed: seed of the first partition; partition i uses `seed + i`.
        routing: see `MultiTaskModel`.
    """
    chosen = sites(backbone)
    if not chosen:
        raise ValueError("The backbone has no conditioning site to partition.")
    for i, (block, site, _) in enumerate(chosen):
        block.condition(site, ChannelPartition(len(tasks), sharing_ratio, seed=seed + i,
                                               name=f"partition_{i}"))
    return MultiTaskModel(backbone, tasks, input_shape, jointly_labelled, routing=routing)


def define_flags():
    """absl flags of `train.py --method=mr|tr`."""
    from absl import flags

    from tf_mtl.layers.partition import SELECTIONS

    flags.DEFINE_float("sharing_ratio", 0.5, "p: fraction of each layer's channels a "
                       "task uses (MR, TR).", lower_bound=0.01, upper_bound=1.0)
    flags.DEFINE_float("roaming_interval", 0.1, "Delta: epochs between two updates of "
                       "the partitions (fractions allowed).", lower_bound=1e-6)
    flags.DEFINE_float("roaming_completion", 1.0, "r: update ratio at which the plan "
                       "stops (eq. 6).", lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_enum("roaming_selection", "random", SELECTIONS,
                      "How the channels to switch are chosen: uniformly (the paper's "
                      "method) or by filter alignment (its ablation).")


def from_flags(flag_values, backbone, tasks, input_shape, jointly_labelled, epochs,
               roaming=True):
    """The model and callbacks of `train.py --method=mr` (roaming=False: tr)."""
    model = maximum_roaming(backbone(), tasks, input_shape, jointly_labelled,
                            flag_values.sharing_ratio, flag_values.seed,
                            **routing_option(flag_values.routing))
    completion = flag_values.roaming_completion if roaming else 0.0
    return model, [MaximumRoaming(flag_values.roaming_interval, completion,
                                  flag_values.roaming_selection)]


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

    history_key = "roaming"

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
            for block in flatten_layers(self.model, include_self=False):
                if isinstance(block, Block):
                    for site, layer in block.conditioned.items():
                        kernels[id(layer)] = block.site_kernel(int(site))
        found = [(layer, kernels.get(id(layer)))
                 for layer in conditioned_layers(self.model, ChannelPartition)]
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

    def plot(self, folder, task_names):
        from tf_mtl import plots

        plots.plot_roaming(self.history, os.path.join(folder, "roaming.png"))


METHODS = (
    Method("mr", "Maximum Roaming", from_flags),
    Method("tr", "fixed channel partitions (Task Routing)",
           functools.partial(from_flags, roaming=False)),
)
