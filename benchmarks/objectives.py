"""Loss weightings and gradient aggregators, each with hard sharing and with
MPPS, on MultiFashion and FashionGroups (MPPS section 4.3.5, Table 5).

    .venv/bin/python benchmarks/objectives.py > benchmarks/objectives.md
    .venv/bin/python benchmarks/objectives.py multifashion   # one data set

Every (data set, seed, sharing, objective) is one `train.py` run with the same
budget (BUDGET: smaller than quality.md's, to fit 2 x 10 objectives x 3 seeds
on this machine), MPPS with `train.py`'s defaults. The table gives test
accuracy per task (mean +- std over seeds) and Delta (eq. 5) against STL of
the same seed and budget, then averaged; the last column says whether MPPS
raised Delta over hard sharing with that objective. Runs are kept under
benchmarks/runs/objectives/.
"""

import os
import sys

import numpy as np
from _runs import ROOT, train

sys.path.insert(0, ROOT)

from tf_mtl.metrics import relative_improvement  # noqa: E402

SEEDS = (0, 1, 2)
DATASETS = ("multifashion", "fashion_groups")
SHAPE = (28, 28, 1)
BUDGET = ["--epochs=3", "--limit=10000", "--batch_size=128", "--backbone=lenet"]
OBJECTIVES = {
    "EW": [],
    "DWA": ["--weighting=dwa"],
    "UW": ["--weighting=uw"],
    "RLW": ["--weighting=rlw"],
    "GradNorm": ["--weighting=gradnorm"],
    "PCGrad": ["--aggregator=pcgrad"],
    "CAGrad": ["--aggregator=cagrad"],
    "GradDrop": ["--aggregator=graddrop", "--aggregate_on=representation"],
    "MGDA-UB": ["--aggregator=mgda", "--aggregate_on=representation"],
    "IMTL-G": ["--aggregator=imtl_g"],
    "Auto-Lambda": ["--weighting=auto_lambda"],
}
# MTL architectures, each with the sum of the losses (EW), in place of HPS.
ARCHITECTURES = {"MTAN": ["--method=mtan"], "Cross-stitch": ["--method=cross_stitch"]}
SHARING = {"HPS": ["--method=hps"], "MPPS": ["--method=mpps"]}


def run(dataset, seed, sharing, objective):
    flags = [f"--dataset={dataset}", f"--seed={seed}", *BUDGET]
    if sharing == "STL":
        return train(os.path.join("objectives", dataset, "STL", str(seed)),
                     flags + ["--method=stl"])[0]
    if sharing in ARCHITECTURES:
        return train(os.path.join("objectives", dataset, sharing, str(seed)),
                     flags + ARCHITECTURES[sharing])[0]
    return train(os.path.join("objectives", dataset, sharing, objective, str(seed)),
                 flags + SHARING[sharing] + OBJECTIVES[objective])[0]


def parameters(dataset, method):
    """Trainable parameters of a method's model (backbone and heads)."""
    from tf_mtl import backbones, methods
    from tf_mtl.data import fashion_groups, multifashion
    from tf_mtl.tasks import classification

    classes, joint = {"multifashion": (multifashion.TASK_NUM_CLASSES, True),
                      "fashion_groups": (fashion_groups.TASK_NUM_CLASSES, False)}[dataset]
    tasks = [classification(n, k) for n, k in classes.items()]
    build = {"HPS": lambda: methods.hard_sharing(backbones.lenet(), tasks, SHAPE, joint),
             "MTAN": lambda: methods.attention_network(backbones.lenet(), tasks, SHAPE, joint),
             "Cross-stitch": lambda: methods.cross_stitch(backbones.lenet, tasks, SHAPE, joint)}
    return sum(int(np.prod(v.shape)) for v in build[method]().trainable_variables)


def architecture_table(dataset):
    """STL, HPS and each architecture with EW; those that cannot run on the
    data set (Cross-stitch on data that is not jointly labelled) left out."""
    stl, keys, higher = reference(dataset)
    lines = [f"\n### {dataset}: architectures (EW)\n",
             "| method | parameters | " + " | ".join(k[:-9] for k in keys) + " | Delta (%) |",
             "|---" * (len(keys) + 3) + "|",
             "| STL | | " + " | ".join(cell([r[k] for r in stl]) for k in keys) + " | 0 |"]
    for method in ["HPS", *ARCHITECTURES]:
        if method == "Cross-stitch" and dataset == "fashion_groups":
            continue
        runs = [run(dataset, s, method, "EW") for s in SEEDS]
        deltas = [relative_improvement(r, ref, higher) for r, ref in zip(runs, stl)]
        lines.append(f"| {method} | {parameters(dataset, method):,} | "
                     + " | ".join(cell([r[k] for r in runs]) for k in keys)
                     + f" | {np.mean(deltas):+.2f} +- {np.std(deltas):.2f} |")
    return "\n".join(lines)


def cell(values):
    return f"{100 * np.mean(values):.2f} +- {100 * np.std(values):.2f}"


def reference(dataset):
    """STL's runs, the accuracy keys, and their directions (for Delta)."""
    stl = [run(dataset, s, "STL", None) for s in SEEDS]
    keys = sorted(k for k in stl[0] if k.endswith("_accuracy"))
    return stl, keys, {k: True for k in keys}


def table(dataset):
    stl, keys, higher = reference(dataset)
    lines = [f"\n### {dataset}\n",
             "| objective | " + " | ".join(f"HPS {k[:-9]}" for k in keys)
             + " | HPS Delta (%) | " + " | ".join(f"MPPS {k[:-9]}" for k in keys)
             + " | MPPS Delta (%) | MPPS better |",
             "|---" * (2 * len(keys) + 4) + "|",
             "| STL | " + " | ".join(cell([r[k] for r in stl]) for k in keys)
             + " | 0 | " + " | ".join("" for _ in keys) + " | | |"]
    better = 0
    for objective in OBJECTIVES:
        cells, deltas = [], {}
        for sharing in SHARING:
            runs = [run(dataset, s, sharing, objective) for s in SEEDS]
            deltas[sharing] = [relative_improvement(r, ref, higher) for r, ref in zip(runs, stl)]
            cells += [cell([r[k] for r in runs]) for k in keys]
            cells.append(f"{np.mean(deltas[sharing]):+.2f} +- {np.std(deltas[sharing]):.2f}")
        gain = np.mean(deltas["MPPS"]) > np.mean(deltas["HPS"])
        better += gain
        lines.append(f"| {objective} | " + " | ".join(cells) + f" | {'yes' if gain else 'no'} |")
    lines.append(f"\nMPPS raised Delta over hard sharing with {better} of "
                 f"{len(OBJECTIVES)} objectives.")
    return "\n".join(lines)


def main(datasets):
    print(f"Seeds {SEEDS}; budget {' '.join(BUDGET)}; test accuracy in %; "
          "Delta against STL of the same seed.")
    for dataset in datasets:
        print(table(dataset), flush=True)
        print(architecture_table(dataset), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or DATASETS)
