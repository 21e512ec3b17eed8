"""Summaries that compare multi-task results with a reference."""

import numpy as np


def directions(tasks):
    """`{"{task}_{metric}": higher_is_better}` for every metric of `tasks`."""
    return {f"{t.name}_{m.name}": m.higher_is_better for t in tasks for m in t.metrics}


def relative_improvement(results, reference, higher_is_better):
    """Delta of MPPS eq. (5), in percent:

        Delta = 100 / K * sum_k C_k (P_k - P_k,base) / P_k,base

    over the K metrics named in `higher_is_better` (one per task gives the
    paper's 1/T sum over tasks), `C_k = +1` where higher is better, -1
    otherwise. `reference` holds the single-task results P_base.

    >>> relative_improvement({"a_acc": 0.9}, {"a_acc": 0.75}, {"a_acc": True})
    20.0
    """
    if not higher_is_better:
        raise ValueError("`higher_is_better` names no metric to compare.")
    terms = []
    for key, higher in higher_is_better.items():
        for where, values in (("results", results), ("reference", reference)):
            if key not in values:
                raise KeyError(f"Metric {key!r} is missing from `{where}`: "
                               f"it holds {sorted(values)}.")
        base = reference[key]
        if base == 0:
            raise ValueError(f"Reference value of {key!r} is 0: Delta divides by it.")
        sign = 1.0 if higher else -1.0
        terms.append(sign * (results[key] - base) / abs(base))
    return float(100.0 * np.mean(terms))


def accuracy_summary(accuracies):
    """Lowest, median and average of per-task accuracies (MPPS Table 3)."""
    values = np.asarray(list(accuracies), "float64")
    if values.size == 0:
        raise ValueError("`accuracies` is empty.")
    return {
        "lowest": float(values.min()),
        "median": float(np.median(values)),
        "average": float(values.mean()),
    }
