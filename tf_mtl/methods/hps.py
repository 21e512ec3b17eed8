"""Hard parameter sharing: one backbone, one head per task (MPPS eq. 1)."""

from tf_mtl.methods.method import Method
from tf_mtl.model import MultiTaskModel


def hard_sharing(backbone, tasks, input_shape, jointly_labelled=True):
    """The HPS baseline: `backbone` (a list of layers) shared by all `tasks`."""
    return MultiTaskModel(backbone, tasks, input_shape, jointly_labelled)


def from_flags(flag_values, backbone, tasks, input_shape, jointly_labelled, epochs):
    """The model and callbacks of `train.py --method=hps`.

    `backbone` is the backbone definition: `backbone()` makes one.
    """
    return hard_sharing(backbone(), tasks, input_shape, jointly_labelled), []


METHODS = (Method("hps", "hard parameter sharing (PPNet's Share-W)", from_flags),)
