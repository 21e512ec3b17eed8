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


def heldout_split(count, fraction, seed):
    """`(kept, heldout)`: the sorted indices of `count` examples split at
    random, a function of `seed`, with `round(fraction * count)` held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"Expected the held-out fraction in (0, 1). Received: {fraction}")
    held = round(fraction * count)
    if not 0 < held < count:
        raise ValueError(f"Holding out {fraction} of {count} training examples leaves "
                         "one part empty.")
    order = np.random.default_rng([seed, 0x4E1D]).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])
