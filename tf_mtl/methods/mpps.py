"""MPPS: multitask learning with progressive parameter sharing (papers/001).

`progressive_sharing` puts a `ProgressiveMask` after the last k conditioned
sites of a backbone; `tf_mtl.callbacks.ExclusiveCapacityScheduler` moves the
targets along the EC schedule. Training then minimises eq. (3) (with the N_t/N
weights of appendix 7.1 on non-jointly labelled data); evaluation and export
use the fully shared backbone.
"""

from tf_mtl.backbones import sites
from tf_mtl.layers.progressive_mask import ProgressiveMask
from tf_mtl.model import MultiTaskModel
from tf_mtl.routing import routing_option


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


def _valid_schedule(name):
    from tf_mtl.callbacks import parse_schedule

    try:
        parse_schedule(name)
    except ValueError:
        return False
    return True


def from_flags(flag_values, backbone, tasks, input_shape, jointly_labelled, epochs):
    """The model and callbacks of `train.py --method=mpps`.

    `backbone` is the backbone definition: `backbone()` makes one.
    """
    from tf_mtl.callbacks import ExclusiveCapacityScheduler

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
