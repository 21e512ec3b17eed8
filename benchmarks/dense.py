"""Every method on FashionScenes, the offline dense benchmark: semantic
segmentation, depth and surface normals (tf_mtl.data.fashion_scenes).

    .venv/bin/python benchmarks/dense.py > benchmarks/dense.md

Each method runs its `configs/<method>_fashion_scenes.cfg` with the budget
BUDGET (fewer scenes and epochs than the configs, to fit 11 methods x 3
seeds on two cores), seeds 0, 1, 2. The table gives every test metric (mean
+- std over seeds), Delta (MPPS eq. 5 over the 9 metrics) and Delta_I and
eta-hat (Safe MTL 4.1, each task counting once) against STL of the same
seed, averaged over seeds. Runs are kept under benchmarks/runs/dense/.
"""

import os
import sys

import numpy as np
from _runs import ROOT, train

sys.path.insert(0, ROOT)

from tf_mtl import dense_metrics  # noqa: E402
from tf_mtl.data import load  # noqa: E402
from tf_mtl.metrics import directions, relative_improvement, safeness, task_metrics  # noqa: E402

SEEDS = (0, 1, 2)
BUDGET = ["--epochs=4", "--limit=2048"]
METHODS = {"STL": "stl", "HPS": "hps", "MPPS": "mpps", "SMTL": "smtl", "L-SMTL": "lsmtl",
           "SMTL_c": "smtl_c", "MR": "mr", "TR": "tr", "PPNet": "ppnet", "MTAN": "mtan",
           "Cross-stitch": "cross_stitch"}


def run(method, seed):
    flags = [f"--flagfile={os.path.join(ROOT, 'configs', method + '_fashion_scenes.cfg')}",
             f"--seed={seed}", *BUDGET]
    return train(os.path.join("dense", method, str(seed)), flags)[0]


def cell(values, digits):
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def main():
    tasks = load("fashion_scenes", limit=1).tasks
    higher = directions(tasks)
    names = list(higher)
    print(__doc__.split("\n\n")[0].replace("\n", " ") + "\n")
    print("Command: `.venv/bin/python benchmarks/dense.py`, budget "
          f"`{' '.join(BUDGET)}` over each config; 3 seeds (mean ± std).\n")
    arrows = {n: "↑" if h else "↓" for n, h in higher.items()}
    print("| method | " + " | ".join(f"{n} {arrows[n]}" for n in names)
          + " | Delta % | Delta_I % | eta-hat |")
    print("|---" * (len(names) + 4) + "|")
    stl = {seed: run("stl", seed) for seed in SEEDS}
    for label, method in METHODS.items():
        results = [run(method, seed) for seed in SEEDS]
        cells = [cell([r[n] for r in results], 1 if "angle" in n else 4) for n in names]
        if method == "stl":
            compared = ["0", "0", "100"]
        else:
            delta = [relative_improvement(r, stl[s], higher) for r, s in zip(results, SEEDS)]
            safe = [safeness(r, stl[s], task_metrics(tasks)) for r, s in zip(results, SEEDS)]
            compared = [cell(delta, 2), cell([x["delta_i"] for x in safe], 2),
                        cell([x["eta_hat"] for x in safe], 0)]
        print(f"| {label} | " + " | ".join(cells + compared) + " |")
    print("\nFor scale, normals all facing the camera, (0, 0, -1), on the same test "
          "split (seed 0): " + constant_normals())


def constant_normals():
    """Mean and median angle error of the constant prediction (0, 0, -1)."""
    test = load("fashion_scenes", batch_size=256, limit=2048).test
    mean = dense_metrics.MaskedMean("angle_error")
    median = dense_metrics.MedianAngleError()
    for _, labels in test:
        facing = labels["normal"] * 0 + [0.0, 0.0, -1.0]
        mean.update_state(labels["normal"], facing)
        median.update_state(labels["normal"], facing)
    return f"mean angle {float(mean.result()):.1f}, median {float(median.result()):.1f}."


if __name__ == "__main__":
    main()
