"""Loss weightings: per-task losses -> task weights (DESIGN.md, composable
objectives). Give one to the `compile(weighting=...)` of a `MultiTaskModel`
or a `tf_mtl.Model`, by object or by name:

| name | class | paper |
|---|---|---|
| `ew` | `EqualWeighting` | the sum of the losses |
| `dwa` | `DynamicWeightAverage` | Liu et al., CVPR 2019 |
| `uw` | `UncertaintyWeighting` | Kendall et al., CVPR 2018 |
| `rlw` | `RandomLossWeighting` | Lin et al., TMLR 2022 |
| `gradnorm` | `GradNorm` | Chen et al., ICML 2018 |
| `auto_lambda` | `AutoLambda` | Liu et al., TMLR 2022 (fits on `heldout_data`) |
"""

from tf_mtl.objective import lookup
from tf_mtl.weighting.auto_lambda import AutoLambda
from tf_mtl.weighting.base import EpochCallback, Weighting
from tf_mtl.weighting.dwa import DynamicWeightAverage
from tf_mtl.weighting.ew import EqualWeighting
from tf_mtl.weighting.gradnorm import GradNorm
from tf_mtl.weighting.rlw import RandomLossWeighting
from tf_mtl.weighting.uncertainty import UncertaintyWeighting

WEIGHTINGS = {
    "ew": EqualWeighting, "dwa": DynamicWeightAverage, "uw": UncertaintyWeighting,
    "rlw": RandomLossWeighting, "gradnorm": GradNorm, "auto_lambda": AutoLambda,
}


def get(identifier):
    """A `Weighting` from itself or its name (see the table above)."""
    return lookup(identifier, Weighting, WEIGHTINGS)


__all__ = ["AutoLambda", "DynamicWeightAverage", "EqualWeighting", "GradNorm", "RandomLossWeighting",
           "UncertaintyWeighting", "Weighting", "WEIGHTINGS", "get"]


def define_flags():
    """absl flags of `train.py`: `--weighting` and its options."""
    from absl import flags

    flags.DEFINE_enum("weighting", None, sorted(WEIGHTINGS),
                      "Loss weighting (tf_mtl.weighting); default: the sum of the losses.")
    flags.DEFINE_float("dwa_temperature", 2.0, "DWA's temperature tau.", lower_bound=1e-6)
    flags.DEFINE_float("gradnorm_alpha", 1.5, "GradNorm's asymmetry alpha.", lower_bound=0.0)
    flags.DEFINE_float("auto_lambda_lr", 1e-4, "Auto-Lambda: learning rate of the task "
                       "weights' Adam (fitted on the validation split).", lower_bound=1e-12)
    flags.DEFINE_float("auto_lambda_init", 0.1, "Auto-Lambda: initial task weight.")


def from_flags(flag_values):
    """The `Weighting` the flags name, or None."""
    name = flag_values.weighting
    if name == "dwa":
        return DynamicWeightAverage(flag_values.dwa_temperature)
    if name == "gradnorm":
        return GradNorm(flag_values.gradnorm_alpha)
    if name == "auto_lambda":
        return AutoLambda(flag_values.auto_lambda_init, flag_values.auto_lambda_lr)
    if name == "rlw":
        return RandomLossWeighting(flag_values.seed)
    return None if name is None else get(name)
