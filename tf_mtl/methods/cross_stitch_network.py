"""Cross-stitch networks (Misra et al., CVPR 2016): one column per task, the
per-task twin of a backbone definition (`tf_mtl.backbones`), with a
cross-stitch unit (`tf_mtl.layers.CrossStitch`) after every block mixing the
columns' activations. With `same=1` the units start passing nothing between
columns: the model starts as T single-task networks (PPNet's Self-Learn).
"""

from tf_mtl.backbones import Block
from tf_mtl.layers.cross_stitch import CrossStitch
from tf_mtl.methods.method import Method
from tf_mtl.model import MultiTaskModel
from tf_mtl.routing import routing_option


def cross_stitch(backbone, tasks, input_shape, jointly_labelled=True, same=0.9, **kwargs):
    """A cross-stitch network of `tasks` on columns of `backbone`.

    Args:
        backbone: a backbone definition (`tf_mtl.backbones.lenet`, ...):
            `backbone(num_tasks=T)` makes the columns.
        tasks, input_shape: see `MultiTaskModel`.
        jointly_labelled: must be True: every column sees every example.
        same: alpha_S, the units' initial weight of a column's own
            activation (`CrossStitch`).
        **kwargs: of `MultiTaskModel` (`heads`).

    Example:

    >>> import functools
    >>> from tf_mtl import backbones, methods, tasks
    >>> heads = [tasks.classification("a", 10), tasks.classification("b", 10)]
    >>> model = methods.cross_stitch(functools.partial(backbones.lenet, 0.5), heads,
    ...                              (28, 28, 1))
    """
    if not jointly_labelled:
        raise ValueError(
            "Cross-stitch units mix every task's column on the same example: they "
            "need jointly labelled data (each example has every task's label).")
    if kwargs.get("routing", "tiled") != "tiled":
        raise ValueError(
            "Cross-stitch units need every task's column in one pass: routing must "
            f"be 'tiled'. Received: routing={kwargs['routing']!r}")
    layers = []
    for layer in backbone(num_tasks=len(tasks)):
        layers.append(layer)
        if isinstance(layer, Block):
            layers.append(CrossStitch(len(tasks), same, name=f"cross_stitch_{len(layers)}"))
    return MultiTaskModel(layers, tasks, input_shape, jointly_labelled, **kwargs)


def define_flags():
    """absl flags of `train.py --method=cross_stitch`."""
    from absl import flags

    flags.DEFINE_float("cross_stitch_same", 0.9, "Initial weight alpha_S of a column's "
                       "own activation in each cross-stitch unit (Misra et al.: 0.9).",
                       lower_bound=0.0, upper_bound=1.0)


def from_flags(flag_values, backbone, tasks, input_shape, jointly_labelled, epochs):
    """The model and callbacks of `train.py --method=cross_stitch`."""
    return cross_stitch(backbone, tasks, input_shape, jointly_labelled,
                        same=flag_values.cross_stitch_same,
                        **routing_option(flag_values.routing)), []


METHODS = (Method("cross_stitch", "cross-stitch networks", from_flags),)
