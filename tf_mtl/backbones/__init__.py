"""Backbones built from blocks with conditioning sites.

A *site* is the point of a block right after normalisation and before the
activation of one convolution or dense layer: the place where a method puts
its task-conditioned layer (an MPPS mask, a roaming partition). The Maximum
Roaming reference code masks there, and for a Bernoulli mask it is the same as
masking the neuron's output. A backbone is a list of layers; `sites(backbone)`
lists its sites in forward order and `Block.condition` fills one.

Blocks are called as `block(x, task_ids, training=..., route=route)` and
return `(x, task_ids)`. Rows without a task yet (`task_ids` None) enter the
routed part at the first site that needs task ids, through a route
(`tf_mtl.layers.routes`: tiling a jointly labelled batch, or the data's own
task ids), so the convolution and normalisation before it run once for
all tasks. From there on, normalisation uses each task's own batch
statistics (`TaskBatchNormalization`): the routed rows of a task compute
what that task's own pass would. A block that routes nothing is a plain
Keras layer, `block(x)`.

Every backbone has a *per-task twin*, `lenet(..., num_tasks=T)`: the same
architecture with one copy of every weight per task (`tf_mtl.layers.PerTask*`),
routed from its first layer: SMTL's private encoders, a one-model STL.

`tf_mtl.backbones.small` holds the Fashion-MNIST backbones (LeNet, a small
ResNet), `tf_mtl.backbones.papers` those of the papers' experiments
(ResNet-18/34/50, VGG-16, SegNet). `BACKBONES` maps `train.py --backbone`
to them.
"""

from tf_mtl.backbones.backbone import WEIGHTLESS, is_per_task, run_layers, run_routed, sites
from tf_mtl.backbones.blocks import (
    Block, BottleneckUnit, ConvUnit, DenseUnit, ResidualUnit, scaled)
from tf_mtl.backbones.papers import SegNet, resnet18, resnet34, resnet50, segnet, vgg16
from tf_mtl.backbones.small import lenet, resnet
from tf_mtl.layers.task_batch_norm import NORM_MOMENTUM

BACKBONES = {"lenet": lenet, "resnet": resnet, "resnet18": resnet18, "resnet34": resnet34,
             "resnet50": resnet50, "vgg16": vgg16, "segnet": segnet}

__all__ = ["BACKBONES", "NORM_MOMENTUM", "WEIGHTLESS", "Block", "BottleneckUnit", "ConvUnit",
           "DenseUnit", "ResidualUnit", "SegNet", "is_per_task", "lenet", "resnet",
           "resnet18", "resnet34", "resnet50", "run_layers", "run_routed", "scaled",
           "segnet", "sites", "vgg16"]
