"""Gradient aggregators: per-task gradients -> one update (DESIGN.md,
composable objectives). Give one to the `compile(aggregator=...)` of a
`MultiTaskModel` or a `tf_mtl.Model`, by object or by name, and choose where
it acts with `aggregate_on`:

| name | class | paper | on parameters | on the representation |
|---|---|---|---|---|
| `pcgrad` | `PCGrad` | Yu et al., NeurIPS 2020 | yes (the paper's) | yes |
| `cagrad` | `CAGrad` | Liu et al., NeurIPS 2021 | yes (the paper's) | yes |
| `graddrop` | `GradDrop` | Chen et al., NeurIPS 2020 | yes | yes (the paper's) |
| `mgda` | `MGDA` | Sener and Koltun, NeurIPS 2018 | yes (MGDA) | yes (MGDA-UB) |
| `imtl_g` | `IMTLG` | Liu et al., ICLR 2021 | yes | yes (the paper's) |
"""

from tf_mtl.aggregation.base import Aggregator, GramianAggregator, Sum
from tf_mtl.aggregation.cagrad import CAGrad
from tf_mtl.aggregation.graddrop import GradDrop
from tf_mtl.aggregation.imtl import IMTLG
from tf_mtl.aggregation.mgda import MGDA
from tf_mtl.aggregation.pcgrad import PCGrad
from tf_mtl.objective import lookup

AGGREGATORS = {"pcgrad": PCGrad, "cagrad": CAGrad, "graddrop": GradDrop, "mgda": MGDA,
               "imtl_g": IMTLG, "sum": Sum}


def get(identifier):
    """An `Aggregator` from itself or its name (see the table above)."""
    return lookup(identifier, Aggregator, AGGREGATORS)


__all__ = ["AGGREGATORS", "Aggregator", "CAGrad", "GradDrop", "GramianAggregator", "IMTLG",
           "MGDA", "PCGrad", "Sum", "get"]


def define_flags():
    """absl flags of `train.py`: `--aggregator` and its options."""
    from absl import flags

    from tf_mtl.task_gradients import AGGREGATE_ON, PER_TASK_GRADIENTS

    flags.DEFINE_enum("aggregator", None, sorted(set(AGGREGATORS) - {"sum"}),
                      "Gradient aggregator (tf_mtl.aggregation); default: none, one "
                      "backward pass of the summed objective.")
    flags.DEFINE_enum("aggregate_on", "parameters", AGGREGATE_ON,
                      "Where the aggregator (and GradNorm) acts: every shared parameter, "
                      "or the shared representation.")
    flags.DEFINE_enum("per_task_gradients", "loop", PER_TASK_GRADIENTS,
                      "Task gradients of the parameters: one backward pass per task, or "
                      "one pfor-vectorised Jacobian.")
    flags.DEFINE_float("cagrad_c", 0.5, "CAGrad's radius c.", lower_bound=0.0)


def from_flags(flag_values):
    """The `Aggregator` the flags name, or None."""
    name = flag_values.aggregator
    if name == "cagrad":
        return CAGrad(flag_values.cagrad_c)
    if name in ("pcgrad", "graddrop"):
        return AGGREGATORS[name](seed=flag_values.seed)
    return None if name is None else get(name)
