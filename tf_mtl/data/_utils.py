"""Argument checks shared by the modules of `tf_mtl.data`."""

import numpy as np


def check_int(name, value, minimum):
    """Raises a ValueError unless `value` is an integer >= `minimum`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(
            f"Expected `{name}` to be an integer >= {minimum}. "
            f"Received: {name}={value!r}"
        )
