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
    from tf_mtl.callbacks import ParameterPassing
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
