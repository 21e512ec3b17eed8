"""What `train.py` needs of a method: its name, its builder and its records."""

import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Method:
    """A method `train.py --method=<name>` trains.

    A method module declares its methods in `METHODS` and, when it has
    flags, defines them (and their validators) in `define_flags()`;
    `tf_mtl.methods.MODULES` lists the modules. The callbacks `build`
    returns may keep a record of the run: one with a `history_key` has its
    `history` written into `history.json` under that key and draws its
    figures with `plot(folder, task_names)`.

    Attributes:
        name: the `--method` value.
        help: what it is, for `--method`'s help.
        build: `build(flag_values, backbone, tasks, input_shape,
            jointly_labelled, epochs)` -> `(model, callbacks)`, where
            `backbone()` makes a backbone; None for a single-task method.
        single_task: one model per task, trained in turn on its task's view
            of the data (STL), instead of one multi-task model.
    """

    name: str
    help: str
    build: Optional[Callable] = None
    single_task: bool = False
