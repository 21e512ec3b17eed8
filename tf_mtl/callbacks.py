"""Callbacks that change or record sharing state between epochs.

Each lives with its method (`tf_mtl.methods`); they are gathered here.
"""

from tf_mtl.methods.mpps import (
    FIXED_SCHEDULES,
    SCHEDULES,
    ExclusiveCapacityScheduler,
    capacity_bounds,
    parse_schedule,
    sharing_progress,
)
from tf_mtl.methods.ppnet import PASSING_SCHEDULES, ParameterPassing
from tf_mtl.methods.roaming import MaximumRoaming
from tf_mtl.methods.smtl import GateHistory

__all__ = ["ExclusiveCapacityScheduler", "GateHistory", "MaximumRoaming", "ParameterPassing",
           "FIXED_SCHEDULES", "PASSING_SCHEDULES", "SCHEDULES", "capacity_bounds",
           "parse_schedule", "sharing_progress"]
