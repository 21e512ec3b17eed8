"""One builder per method. Each returns `MultiTaskModel`s ready to compile."""

from tf_mtl.methods.cross_stitch_network import cross_stitch
from tf_mtl.methods.hps import hard_sharing
from tf_mtl.methods.mpps import progressive_sharing
from tf_mtl.methods.mtan import attention_network
from tf_mtl.methods.ppnet import parameter_passing
from tf_mtl.methods.roaming import maximum_roaming
from tf_mtl.methods.smtl import safe_sharing
from tf_mtl.methods.stl import single_task, task_view

__all__ = ["attention_network", "cross_stitch", "hard_sharing", "maximum_roaming",
           "parameter_passing", "progressive_sharing", "safe_sharing", "single_task",
           "task_view"]
