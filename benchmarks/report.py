"""`benchmarks/RESULTS.md` from the records alone (`harness.py report`).

Per data set of the main table: every method's test metrics per task at the
validation-selected epoch, Delta (MPPS eq. 5) against STL and against HPS,
Safe MTL's eta-hat and its paired version, parameters and time per step
relative to HPS, and what the method's mechanism did over the run; a figure
of Delta against STL. Then MPPS Table 5, and the verdict on each headline
claim of the four papers. Every interval is a paired 95 % t interval over
seeds (`stats.py`).
"""

import collections
import os

import numpy as np

import stats

ROOT = os.path.dirname(os.path.abspath(__file__))


def _runs(records, group):
    """`{dataset: {label: [records]}}` of a group, in the order declared."""
    table = collections.defaultdict(lambda: collections.defaultdict(list))
    for record in records.values():
        if record["group"] == group:
            table[record["dataset"]][record["label"]].append(record)
    return table


def step_time(record):
    """Median milliseconds per training step over the epochs of the run's log
    (STL: times its tasks, whose models train in turn on the same batches)."""
    if not record["step_ms"]:
        return None
    epoch = record["selected"]["epoch"]
    return (len(epoch) if isinstance(epoch, dict) else 1) * float(np.median(record["step_ms"]))


def mechanism(record):
    """What the method's state was at the end of the run, from its history."""
    history = record["history"]
    if "mpps" in history:
        first, last = history["mpps"][0], history["mpps"][-1]
        return f"EC {first['ec']:.2f} → {last['ec']:.2f} (target {last['ec_target']:.2f})"
    if "roaming" in history:
        done = [h["epoch"] + 1 for h in history["roaming"] if h["update_ratio"] >= 0.999]
        ratio = history["roaming"][-1]["update_ratio"]
        return (f"update ratio 1 at epoch {done[0]}" if done
                else f"update ratio {ratio:.2f} at the end")
    if "smtl" in history:
        alpha = history["smtl"][-1]["alpha"]
        return "a " + " / ".join(f"{alpha[t]:.2f}" for t in sorted(alpha))
    if "passing" in history:
        return f"{len(history['passing'])} adjacent periods"
    return ""


def _mean_ratio(records, references, value):
    ours = [value(r) for r in records]
    theirs = [value(r) for r in references]
    if None in ours or None in theirs or not theirs:
        return None
    return float(np.mean(ours) / np.mean(theirs))


def _name(key, higher_is_better):
    """A metric's column: `<task> <metric>` and which way is better."""
    return f"{key.replace('_', ' ')} {'↑' if higher_is_better else '↓'}"


def _value(key, value):
    return 100 * value if key.endswith("accuracy") else value


def _digits(key):
    return 2 if key.endswith("accuracy") else 4


def _cell(interval, digits=2):
    return "–" if interval is None else interval.format(digits)


def _selected_epoch(record):
    epoch = record["selected"]["epoch"]
    return float(np.mean(list(epoch.values()))) if isinstance(epoch, dict) else epoch


def main_table(dataset, runs):
    """Markdown lines of one data set's main table."""
    stl, hps = runs.get("STL", []), runs.get("HPS", [])
    directions = stats.directions(next(iter(runs.values()))[0])
    keys = list(directions)
    header = (["method", *(_name(k, directions[k]) for k in keys), "Δ vs STL (%)", "Δ vs HPS (%)", "η̂", "η̂ paired",
               "params / HPS", "step time / HPS", "epoch", "seeds", "mechanism at the end"])
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label, records in runs.items():
        accuracy = [stats.Interval([_value(k, r["selected"][k]) for r in records])
                    .format(_digits(k)).lstrip("+") for k in keys]
        safe = ["–", "–"]
        if stl and label != "STL":
            safe = [f"{stats.eta_hat(records, stl):.0f}",
                    f"{stats.paired_eta_hat(records, stl):.0f}"]
        ratios = [_mean_ratio(records, hps, lambda r: r["selected"].get("parameters")),
                  _mean_ratio(records, hps, step_time)]
        row = [label, *accuracy,
               _cell(stats.paired(records, stl, stats.delta_m)) if label != "STL" else "0",
               _cell(stats.paired(records, hps, stats.delta_m)) if label != "HPS" else "0",
               *safe, *("–" if x is None else f"{x:.2f}" for x in ratios),
               f"{np.mean([_selected_epoch(r) for r in records]):.1f}",
               str(len(records)), mechanism(records[-1])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def figure(dataset, runs, path):
    """Bars of Delta against STL with their intervals, one per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stl = runs.get("STL", [])
    bars = [(label, stats.paired(records, stl, stats.delta_m))
            for label, records in runs.items() if label != "STL"]
    bars = [(label, i) for label, i in bars if i is not None]
    if not bars:
        return False
    figure, axis = plt.subplots(figsize=(max(4, 0.45 * len(bars)), 3.2))
    errors = [0 if np.isnan(i.half) else i.half for _, i in bars]
    axis.bar(range(len(bars)), [i.mean for _, i in bars], yerr=errors, capsize=2,
             color=["tab:green" if i.sign() > 0 else "tab:red" if i.sign() < 0 else
                    "tab:gray" for _, i in bars])
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=70,
                    ha="right", fontsize=7)
    axis.set_ylabel("Δ vs STL (%), 95 % CI")
    axis.set_title(dataset, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def table5(dataset, runs):
    """MPPS Table 5: each objective with hard sharing and with MPPS."""
    objectives = [label.split(" + ", 1)[1] for label in runs if label.startswith("HPS + ")]
    lines = ["| objective | Δ HPS+X vs HPS+EW (%) | Δ MPPS+X vs HPS+X (%) | verdict |",
             "|---|---|---|---|"]
    for objective in objectives:
        ours, theirs = runs.get(f"MPPS + {objective}", []), runs[f"HPS + {objective}"]
        gain = stats.paired(ours, theirs, stats.delta_m)
        lines.append(f"| {objective} | "
                     f"{_cell(stats.paired(theirs, runs.get('HPS + EW', []), stats.delta_m))} | "
                     f"{_cell(gain)} | {_verdict(gain)} |")
    return lines


def _verdict(interval):
    if interval is None:
        return "not run"
    return {1: "holds", -1: "does not hold", 0: "inconclusive"}[interval.sign()]


# The main table's runs the ablations are read beside.
ABLATED = ("STL", "HPS", "MPPS", "MR p=0.5", "TR p=0.5", "MR p=0.8", "TR p=0.8",
           "PPNet channel")


def claims(main, table5_runs, ablations=None):
    """Rows `(claim, data set, measure, interval, verdict)` of the four papers'
    headline claims, each decided by a paired interval."""
    rows = []

    def compare(claim, dataset, runs, ours, theirs, measure=stats.delta_m):
        if ours in runs and theirs in runs:
            interval = stats.paired(runs[ours], runs[theirs], measure)
            rows.append((claim, dataset, f"Δ {ours} vs {theirs} (%)", interval,
                         _verdict(interval)))

    for dataset, runs in main.items():
        compare("MPPS > HPS (MPPS)", dataset, runs, "MPPS", "HPS")
        for p in ("0.5", "0.8"):
            compare(f"MR > TR at p = {p} (Maximum Roaming)", dataset, runs,
                    f"MR p={p}", f"TR p={p}")
        for baseline in ("Self-Learn", "HPS", "Adj-only", "Adj-fixed", "Trace fixed",
                         "Trace dynamic"):
            compare(f"PPNet > {baseline} (PPNet)", dataset, runs, "PPNet channel", baseline)
        compare("MTAN > Cross-stitch (MTAN)", dataset, runs, "MTAN", "Cross-stitch")
        for label in ("SMTL", "L-SMTL", "SMTL_c", "L-SMTL_c", "SMTL bi-level"):
            if label in runs and "STL" in runs:
                eta = stats.paired_eta_hat(runs[label], runs["STL"])
                means = stats.eta_hat(runs[label], runs["STL"])
                # Paired 100 with the means below STL on a task: within the noise.
                verdict = ("does not hold" if eta < 100 else
                           "holds" if means == 100 else "inconclusive")
                rows.append((f"{label}: η̂ = 100 (Safe MTL)", dataset, "η̂ paired (paper's)",
                             f"{eta:.0f} ({means:.0f})", verdict))
    for dataset, swept in (ablations or {}).items():
        # The sweep: the main table's p = 0.5 and 0.8 with the ablations' p.
        runs = {**main.get(dataset, {}), **swept}
        for p in ("0.65", "0.9"):
            compare(f"MR > TR at p = {p} (Maximum Roaming)", dataset, runs,
                    f"MR p={p}", f"TR p={p}")
        # p = 1/T is the smallest p there is (`ChannelPartition`); 0.5 for 2 tasks.
        if all(f"{m} p={p}" in runs for m in ("MR", "TR") for p in ("0.5", "0.9")):
            pair = lambda p: (runs[f"MR p={p}"], runs[f"TR p={p}"])
            gap = stats.paired_gap(pair("0.5"), pair("0.9"), stats.delta_m)
            if gap is not None:
                rows.append(("MR's gain over TR is larger at small p (Maximum Roaming)",
                             dataset, "Δ(MR vs TR) at p=0.5 minus at p=0.9 (%)", gap,
                             _verdict(gap)))
    for dataset, runs in table5_runs.items():
        gains = [stats.paired(runs[f"MPPS + {o}"], runs[f"HPS + {o}"], stats.delta_m)
                 for o in (label.split(" + ", 1)[1] for label in runs
                           if label.startswith("HPS + ")) if f"MPPS + {o}" in runs]
        if gains:
            better = sum(g.sign() > 0 for g in gains)
            worse = sum(g.sign() < 0 for g in gains)
            verdict = ("holds" if better > len(gains) / 2 else
                       "does not hold" if worse > len(gains) / 2 else "inconclusive")
            rows.append(("MPPS improves most Table 5 methods (MPPS)", dataset,
                         "objectives better / worse / tied", f"{better} / {worse} / "
                         f"{len(gains) - better - worse}", verdict))
    return rows


def write(records, experiments, page):
    """Writes `page` (and its figures beside it, under `figures/`)."""
    main, objectives = _runs(records, "main"), _runs(records, "table5")
    ablations = _runs(records, "ablations")
    order = {(e.dataset, e.label): i for i, e in enumerate(experiments)}
    for table in (main, objectives, ablations):
        for dataset in table:
            table[dataset] = dict(sorted(table[dataset].items(),
                                         key=lambda kv: order.get((dataset, kv[0]), 1e9)))
    figures = os.path.join(os.path.dirname(page), "figures")
    os.makedirs(figures, exist_ok=True)
    hours = sum(r["seconds"] for r in records.values()) / 3600
    commits = sorted({r["commit"][:7] for r in records.values() if r.get("commit")})
    lines = [
        "# Results",
        "",
        "Generated by `.venv/bin/python benchmarks/harness.py report` from the records "
        f"under `benchmarks/results/` ({len(records)} runs, {hours:.1f} CPU-hours of "
        f"runs, commits {', '.join(commits) or '–'}); do not edit by hand. What each run "
        "is: `benchmarks/experiments.py`; how the page is computed: "
        "`benchmarks/report.py` and `benchmarks/stats.py`.",
        "",
        "Test metrics (accuracies in %) at the epoch the data set's budget selects on "
        "validation (`experiments.BUDGETS`), mean ± half the 95 % t interval over seeds; every Δ is a paired difference over seeds "
        "(same seed: same data order and split) with its 95 % interval. η̂: Safe MTL's "
        "share of tasks whose mean metrics are no worse than STL's; η̂ paired: a metric "
        "counts as no worse unless its paired interval lies below 0.",
        "",
        "## Verdicts",
        "",
        "| claim | data set | measure | value | verdict |",
        "|---|---|---|---|---|",
    ]
    for claim, dataset, measure, value, verdict in claims(main, objectives, ablations):
        value = value.format() if isinstance(value, stats.Interval) else value or "–"
        lines.append(f"| {claim} | {dataset} | {measure} | {value} | {verdict} |")
    for dataset, runs in main.items():
        lines += ["", f"## {dataset}", ""]
        if figure(dataset, runs, os.path.join(figures, f"{dataset}.png")):
            lines += [f"![Δ vs STL on {dataset}](figures/{dataset}.png)", ""]
        lines += main_table(dataset, runs)
    for dataset, runs in objectives.items():
        lines += ["", f"## MPPS Table 5 on {dataset}", ""] + table5(dataset, runs)
    for dataset, runs in ablations.items():
        # Beside the main table's runs they vary (same budget and seeds).
        defaults = {label: main[dataset][label] for label in ABLATED if label in main[dataset]}
        lines += ["", f"## Ablations on {dataset}", "",
                  "The main table's STL, HPS and the defaults each ablation varies, "
                  "then the ablations (`experiments.py`, group `ablations`).", ""]
        lines += main_table(dataset, {**defaults, **runs})
    with open(page, "w") as f:
        f.write("\n".join(lines) + "\n")

