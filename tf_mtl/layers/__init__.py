"""Task-conditioned Keras layers: `layer(x, task_ids)`."""

from tf_mtl.layers.base import TaskConditioned
from tf_mtl.layers.progressive_mask import ProgressiveMask

__all__ = ["TaskConditioned", "ProgressiveMask"]
