"""Paired comparisons over seeds, and the papers' summary measures on records.

Every comparison pairs runs of the same seed (same data order, same held-out
split, same initialisation of what the two share) and reports the mean of
the per-seed differences with a 95 % Student-t interval.
"""

import math

import numpy as np

from tf_mtl import metrics

# t_{0.975, df} for df = 1..30 (beyond, the normal 1.96 is within 0.02 of it).
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
          2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
          2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class Interval:
    """The mean of `values` and the half-width of its 95 % t interval
    (`nan` from a single value: one seed says nothing of the spread)."""

    def __init__(self, values):
        values = np.asarray(values, "float64")
        if values.size == 0:
            raise ValueError("An interval needs at least one value.")
        self.n, self.mean = values.size, float(values.mean())
        df = self.n - 1
        t = _T_975[df - 1] if 0 < df <= len(_T_975) else 1.96
        self.half = (t * float(values.std(ddof=1)) / math.sqrt(self.n)) if df else math.nan

    @property
    def low(self):
        return self.mean - self.half

    @property
    def high(self):
        return self.mean + self.half

    def sign(self):
        """+1 above 0, -1 below 0, 0 where the interval reaches 0 (or is unknown)."""
        if math.isnan(self.half):
            return 0
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def format(self, digits=2):
        if math.isnan(self.half):
            return f"{self.mean:+.{digits}f}"
        return f"{self.mean:+.{digits}f} ± {self.half:.{digits}f}"


def task_metrics(record):
    """`{task: {metric key: higher is better}}` of a record: as train.py
    wrote it, or (records before it did) each task's `<task>_accuracy`."""
    if "task_metrics" in record["selected"]:
        return record["selected"]["task_metrics"]
    return {k[:-len("_accuracy")]: {k: True} for k in sorted(record["selected"])
            if k.endswith("_accuracy")}


def task_names(record):
    return list(task_metrics(record))


def directions(record):
    """`{metric key: higher is better}` over every task of a record."""
    return {k: h for metrics_ in task_metrics(record).values() for k, h in metrics_.items()}


def by_seed(records):
    return {r["seed"]: r for r in records}


def paired(records, references, measure):
    """`Interval` of `measure(record, reference)` over the seeds both have,
    or None when they share none."""
    ours, theirs = by_seed(records), by_seed(references)
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return None
    return Interval([measure(ours[s], theirs[s]) for s in seeds])


def paired_gap(pair, other_pair, measure):
    """`Interval` over the seeds all four share of `measure` on `pair` minus
    `measure` on `other_pair` (each `(records, references)`): how much more
    one comparison gains than another, paired by seed; None when they share
    no seed."""
    groups = [by_seed(records) for records in (*pair, *other_pair)]
    seeds = sorted(set.intersection(*(set(g) for g in groups)))
    if not seeds:
        return None
    a, b, c, d = groups
    return Interval([measure(a[s], b[s]) - measure(c[s], d[s]) for s in seeds])


def delta_m(record, reference):
    """Delta of MPPS eq. (5) (percent) of `record` against `reference`, on the
    test metrics of every task at the selected epoch."""
    return metrics.relative_improvement(record["selected"], reference["selected"],
                                        directions(reference))


def improvement(key, higher_is_better):
    """Paired measure: how much better than the reference `key` is (its
    difference, signed so that positive is better; accuracies in points)."""
    scale = 100.0 if key.endswith("accuracy") else 1.0
    sign = 1.0 if higher_is_better else -1.0
    return lambda record, reference: sign * scale * (record["selected"][key]
                                                     - reference["selected"][key])


def eta_hat(records, references):
    """Safe MTL's eta-hat (section 4.1) on the seed means: the share of
    tasks (each the mean over its metrics) no worse than STL, in percent."""
    grouped = task_metrics(references[0])
    mean = lambda rs: {k: float(np.mean([r["selected"][k] for r in rs]))
                       for metrics_ in grouped.values() for k in metrics_}
    return metrics.safeness(mean(records), mean(references), grouped)["eta_hat"]


def paired_eta_hat(records, references):
    """eta-hat where a metric counts as no worse than STL unless its paired
    difference's 95 % interval lies below 0 (as it does not without a
    shared seed)."""
    def no_worse(key, higher_is_better):
        interval = paired(records, references, improvement(key, higher_is_better))
        return interval is None or interval.sign() >= 0

    safe = [np.mean([no_worse(k, h) for k, h in metrics_.items()])
            for metrics_ in task_metrics(references[0]).values()]
    return 100.0 * float(np.mean(safe))
