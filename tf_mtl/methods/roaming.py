"""Maximum Roaming (papers/003) and fixed partitioning (Task Routing).

`maximum_roaming` puts a `ChannelPartition` at every site of a backbone
(after normalisation, before the activation: eq. 2); the
`tf_mtl.callbacks.MaximumRoaming` callback runs the update plan. Without it
(or with `completion=0`) the partitions stay fixed: Task Routing
(Strezoski et al. 2019). The paper runs one forward pass per task; here all
tasks run in one tiled pass (or one pass each, `routing="sequential"`),
in training and at inference, where each task keeps its own mask.
"""

from tf_mtl.backbones import sites
from tf_mtl.layers.partition import ChannelPartition
from tf_mtl.model import MultiTaskModel
from tf_mtl.routing import routing_option


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
    from tf_mtl.callbacks import MaximumRoaming

    model = maximum_roaming(backbone(), tasks, input_shape, jointly_labelled,
                            flag_values.sharing_ratio, flag_values.seed,
                            **routing_option(flag_values.routing))
    completion = flag_values.roaming_completion if roaming else 0.0
    return model, [MaximumRoaming(flag_values.roaming_interval, completion,
                                  flag_values.roaming_selection)]
