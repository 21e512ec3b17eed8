"""Parameter Passing Networks (papers/004) and the baselines of its tables.

Every task has its own copy of the backbone (the per-task twin of its
definition, `tf_mtl.backbones`); PPNet passes those copies' weights between
tasks with a learned passing matrix per layer (`tf_mtl.layers.passing`),
trained in alternation with the weights by `tf_mtl.callbacks.
ParameterPassing`. Task heads are never passed. The baselines (B.2):

- Self-Learn: the per-task copies, no passing (`passing=None`);
- Adj-only: passing throughout, W and A trained together (schedule `joint`);
- Adj-fixed: a fixed passing, only W trained (schedule `fixed`);
- Share-W: one backbone for every task (`methods.hard_sharing`);
- the trace regularisers of Smith et al. on the per-task weights
  (`TaskTraceRegularizer`, fixed and dynamic).
"""

from tf_mtl.layers.passing import passing_spec
from tf_mtl.model import MultiTaskModel


def parameter_passing(backbone, tasks, input_shape, jointly_labelled=True, passing="layer",
                      variant="linear", conv_only=False, learning_rate=0.1, **kwargs):
    """A model of per-task copies of `backbone` whose layers pass weights.

    Args:
        backbone: a backbone definition (`tf_mtl.backbones.lenet`, ...):
            `backbone(num_tasks=T, passing=...)` makes the passed twin.
        tasks, input_shape, jointly_labelled: see `MultiTaskModel`.
        passing: `"layer"`, `"channel"`, or None (Self-Learn).
        variant, learning_rate, conv_only: see
            `tf_mtl.layers.passing.passing_spec`.
        **kwargs: of `MultiTaskModel` (`routing`, `heads`).
    """
    spec = None if passing is None else passing_spec(passing, variant, learning_rate,
                                                     conv_only)
    layers = backbone(num_tasks=len(tasks), passing=spec)
    return MultiTaskModel(layers, tasks, input_shape, jointly_labelled, **kwargs)
