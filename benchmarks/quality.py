"""STL, HPS and MPPS (Bernoulli, Gaussian) on MultiFashion and FashionGroups.

    .venv/bin/python benchmarks/quality.py > benchmarks/quality.md

Every (data set, seed, method) is one `train.py` run with the same budget
(BUDGET flags); MPPS runs use the trainer's defaults plus the method flags
below, chosen before any run and never tuned on test. The table gives test
accuracy per task (mean +- std over seeds), Delta of MPPS eq. (5) against
STL of the same seed (then averaged), and the lowest / median / average
task accuracy (Table 3 style). Runs are kept under benchmarks/runs/.
"""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tf_mtl.metrics import accuracy_summary, relative_improvement  # noqa: E402

SEEDS = (0, 1, 2)
DATASETS = ("multifashion", "fashion_groups")
BUDGET = ["--epochs=6", "--limit=20000", "--batch_size=128", "--backbone=lenet"]
METHODS = {
    "STL": ["--method=stl"],
    "HPS": ["--method=hps"],
    "MPPS+B": ["--method=mpps", "--mpps_distribution=bernoulli"],
    "MPPS+G": ["--method=mpps", "--mpps_distribution=gaussian"],
}


def run(dataset, seed, method):
    out = os.path.join(ROOT, "benchmarks", "runs", dataset, method, str(seed))
    results = os.path.join(out, "results.json")
    if not os.path.exists(results):
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "train.py"), f"--dataset={dataset}",
             f"--seed={seed}", f"--output_dir={out}", "--verbose=0", *BUDGET,
             *METHODS[method]],
            check=True, stdout=subprocess.DEVNULL, cwd=ROOT,
        )
    with open(results) as f:
        return json.load(f)


def table(dataset):
    results = {m: [run(dataset, s, m) for s in SEEDS] for m in METHODS}
    keys = sorted(k for k in results["STL"][0] if k.endswith("_accuracy"))
    lines = [f"\n### {dataset}\n",
             "| method | " + " | ".join(k[:-9] for k in keys)
             + " | lowest | median | average | Delta vs STL (%) |",
             "|---" * (len(keys) + 5) + "|"]
    for method, runs in results.items():
        acc = np.array([[r[k] for k in keys] for r in runs])
        summary = [accuracy_summary(row) for row in acc]
        deltas = [relative_improvement(r, ref, {k: True for k in keys})
                  for r, ref in zip(runs, results["STL"])]
        cell = lambda v: f"{100 * np.mean(v):.2f} +- {100 * np.std(v):.2f}"
        lines.append(
            f"| {method} | " + " | ".join(cell(acc[:, i]) for i in range(len(keys)))
            + " | " + " | ".join(cell([s[k] for s in summary])
                                 for k in ("lowest", "median", "average"))
            + f" | {np.mean(deltas):+.2f} +- {np.std(deltas):.2f} |")
    return "\n".join(lines)


def main():
    print(f"Seeds {SEEDS}; budget {' '.join(BUDGET)}; test accuracy in %.")
    for dataset in DATASETS:
        print(table(dataset), flush=True)


if __name__ == "__main__":
    main()
