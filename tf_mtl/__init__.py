"""tf_mtl: multi-task learning methods that decide how tasks share parameters.

Keras 3 on TensorFlow. The names most users need:

- `Task` / `tasks.classification`: what each task predicts;
- `methods.hard_sharing`, `methods.progressive_sharing` (MPPS), ...: models;
- `callbacks.ExclusiveCapacityScheduler`: the MPPS curriculum.
"""

from tf_mtl import backbones, callbacks, layers, methods, metrics, tasks
from tf_mtl.model import MultiTaskModel
from tf_mtl.tasks import Metric, Task

__version__ = "0.1.0"

__all__ = [
    "MultiTaskModel", "Task", "Metric", "backbones", "callbacks", "layers",
    "methods", "metrics", "tasks",
]
