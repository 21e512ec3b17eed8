"""MPPS with Gaussian masks: the paper's N(1, r(phi)^2) against the same
family with the Bernoulli's moments, N(phi, phi (1 - phi)).

    .venv/bin/python benchmarks/gaussian.py > benchmarks/gaussian.md

The budget, flags and seeds of `quality.py` (whose table holds STL, HPS and
MPPS+B on the same runs' settings); the two Gaussian forms differ in
`--mpps_distribution` only. The default is chosen on the validation split
(last epoch's mean validation accuracy), and the test accuracy is reported
beside it.
"""

import os

import numpy as np
from _runs import train
from quality import BUDGET, DATASETS, PAPER_MPPS, SEEDS

FORMS = {"N(1, r(phi)^2), the paper's": "gaussian",
         "N(phi, phi (1 - phi)), matched": "gaussian_matched"}


def run(dataset, seed, distribution):
    return train(os.path.join("gaussian", dataset, distribution, str(seed)),
                 [f"--dataset={dataset}", f"--seed={seed}", *BUDGET, *PAPER_MPPS,
                  f"--mpps_distribution={distribution}"])


def main():
    print(f"Seeds {SEEDS}; budget {' '.join(BUDGET)}, MPPS in the paper's setting; accuracy in %, "
          "mean +- std over seeds.\n")
    print("| data set | Gaussian mask | validation (last epoch) | test | train accuracy, "
          "first exclusive epoch |")
    print("|---|---|---|---|---|")
    for dataset in DATASETS:
        for label, distribution in FORMS.items():
            runs = [run(dataset, seed, distribution) for seed in SEEDS]
            tasks = sorted(k[:-9] for k in runs[0][0] if k.endswith("_accuracy"))
            mean = lambda values: f"{100 * np.mean(values):.2f} +- {100 * np.std(values):.2f}"
            history = [h["history"] for _, h, _ in runs]
            validation = [np.mean([h[f"val_{t}_accuracy"][-1] for t in tasks]) for h in history]
            test = [np.mean([r[f"{t}_accuracy"] for t in tasks]) for r, _, _ in runs]
            first = [np.mean([h[f"{t}_accuracy"][0] for t in tasks]) for h in history]
            print(f"| {dataset} | {label} | {mean(validation)} | {mean(test)} | "
                  f"{mean(first)} |", flush=True)


if __name__ == "__main__":
    main()
