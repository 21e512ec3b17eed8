"""tf_mtl: multi-task learning methods that decide how tasks share parameters.

Keras 3 on TensorFlow. The names most users need:

- `Task` / `tasks.classification`, `tasks.segmentation`, `tasks.depth`,
  `tasks.surface_normals`, `tasks.binary_attributes`: what each task
  predicts (dense tasks score with `dense_metrics`);
- `methods.hard_sharing`, `methods.progressive_sharing` (MPPS), ...: models;
- `callbacks.ExclusiveCapacityScheduler`, `MaximumRoaming`, `ParameterPassing`:
  the schedules of MPPS, Maximum Roaming and PPNet;
- `Model`: a `keras.Model` in which `tf_mtl.layers` train in full.
"""

from tf_mtl import (
    backbones, callbacks, dense_metrics, layers, methods, metrics, regularizers, tasks)
from tf_mtl.model import MultiTaskModel
from tf_mtl.tasks import Metric, Task
from tf_mtl.training import ConditionedTraining, Model

__version__ = "0.1.0"

__all__ = [
    "ConditionedTraining", "Model", "MultiTaskModel", "Task", "Metric", "backbones", "callbacks",
    "dense_metrics", "layers", "methods", "metrics", "regularizers", "tasks",
]
