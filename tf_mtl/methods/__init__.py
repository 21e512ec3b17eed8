"""One builder per method. Each returns `MultiTaskModel`s ready to compile.

`METHODS` is the registry `train.py` trains from: every method module
declares its `Method`s (and its flags in `define_flags`), and `MODULES`
lists the modules. Adding a method is a module and its line there.
"""

from tf_mtl.methods import cross_stitch_network, hps, mpps, mtan, ppnet, roaming, smtl, stl
from tf_mtl.methods.cross_stitch_network import cross_stitch
from tf_mtl.methods.hps import hard_sharing
from tf_mtl.methods.method import Method
from tf_mtl.methods.mpps import progressive_sharing
from tf_mtl.methods.mtan import attention_network
from tf_mtl.methods.ppnet import parameter_passing
from tf_mtl.methods.roaming import maximum_roaming
from tf_mtl.methods.smtl import safe_sharing
from tf_mtl.methods.stl import single_task, task_view

MODULES = (hps, stl, mpps, smtl, roaming, ppnet, mtan, cross_stitch_network)
METHODS = {method.name: method for module in MODULES for method in module.METHODS}


def define_flags():
    """The absl flags of every method (after `train.py`'s own, which their
    validators read: `--method`, `--epochs`, `--weighting`, ...)."""
    for module in MODULES:
        if hasattr(module, "define_flags"):
            module.define_flags()


__all__ = ["METHODS", "Method", "attention_network", "cross_stitch", "define_flags",
           "hard_sharing", "maximum_roaming", "parameter_passing", "progressive_sharing",
           "safe_sharing", "single_task", "task_view"]
