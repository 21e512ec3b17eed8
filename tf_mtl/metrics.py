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

    >>> round(relative_improvement({"a_acc": 0.9}, {"a_acc": 0.75}, {"a_acc": True}), 6)
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


def task_metrics(tasks):
    """`{task: {"{task}_{metric}": higher_is_better}}`: each task's metrics."""
    return {t.name: {f"{t.name}_{m.name}": m.higher_is_better for m in t.metrics}
            for t in tasks}


def safeness(results, reference, metrics_of_tasks):
    """The Safe MTL measures of section 4.1 against single-task results.

    Per metric j of task t, `Delta_{t,j} = (-1)^p (M_{t,j} - STL_{t,j})`
    (p = 1 where lower is better), so positive is better than STL; then

        Delta_I = 1/m sum_t 1/m_t sum_j Delta_{t,j} / STL_{t,j}   (percent),
        eta_hat = 1/m sum_t 1/m_t sum_j [Delta_{t,j} >= 0] * 100,

    each task counting once however many metrics it has. eta_hat = 100 is
    safe multi-task learning (Definition 3: no task worse than STL).

    Args:
        results, reference: `{"{task}_{metric}": value}` of the method and
            of STL.
        metrics_of_tasks: `task_metrics(tasks)`.

    Returns:
        `{"delta": {key: Delta_{t,j}}, "delta_i": ..., "eta_hat": ...}`.

    >>> safeness({"a_acc": 0.9, "b_err": 2.0}, {"a_acc": 0.8, "b_err": 1.0},
    ...          {"a": {"a_acc": True}, "b": {"b_err": False}})["eta_hat"]
    50.0
    """
    if not any(metrics_of_tasks.values()):
        raise ValueError("`metrics_of_tasks` names no metric to compare.")
    delta, relative, safe = {}, [], []
    for task, metrics in metrics_of_tasks.items():
        if not metrics:
            continue
        task_relative, task_safe = [], []
        for key, higher in metrics.items():
            for where, values in (("results", results), ("reference", reference)):
                if key not in values:
                    raise KeyError(f"Metric {key!r} of task {task!r} is missing from "
                                   f"`{where}`: it holds {sorted(values)}.")
            if reference[key] == 0:
                raise ValueError(f"Reference value of {key!r} is 0: Delta_I divides by it.")
            delta[key] = (1.0 if higher else -1.0) * (results[key] - reference[key])
            task_relative.append(delta[key] / abs(reference[key]))
            task_safe.append(delta[key] >= 0)
        relative.append(np.mean(task_relative))
        safe.append(np.mean(task_safe))
    return {"delta": delta, "delta_i": float(100.0 * np.mean(relative)),
            "eta_hat": float(100.0 * np.mean(safe))}


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
