"""Task-conditioned Keras layers: `layer(x, task_ids)`."""

from tf_mtl.layers.base import ObjectiveScope, TaskAware, TaskConditioned, objective_scope
from tf_mtl.layers.cross_stitch import CrossStitch
from tf_mtl.layers.dense_head import DenseHead
from tf_mtl.layers.gate import EncoderGate
from tf_mtl.layers.partition import ChannelPartition
from tf_mtl.layers.per_task import (
    PerTaskBatchNormalization,
    PerTaskConv2D,
    PerTaskDense,
)
from tf_mtl.layers.progressive_mask import ProgressiveMask
from tf_mtl.layers.task_batch_norm import TaskBatchNormalization

__all__ = [
    "TaskAware", "TaskConditioned", "ProgressiveMask", "ChannelPartition",
    "TaskBatchNormalization", "EncoderGate",
    "CrossStitch", "DenseHead",
    "PerTaskDense", "PerTaskConv2D", "PerTaskBatchNormalization",
    "ObjectiveScope", "objective_scope",
]
