"""Is Safe MTL safe where hard sharing is not? MultiFashion + an unrelated task.

    .venv/bin/python benchmarks/safeness.py > benchmarks/safeness.md

Data: `multifashion_texture` (`tf_mtl.data.multifashion_texture`): the two
MultiFashion tasks and a third, `texture`, whose label (the frequency band
of a noise texture) is independent of the items and needs other features.
Bi-level SMTL is not in the table: this machine's time went to the
methods the claim is about. Every (method, seed) is one `train.py` run with the same budget (BUDGET),
compared with the STL run of the same seed (`--reference`): test accuracy
per task, Delta_I and eta-hat (Safe MTL section 4.1), and the learned a_t
(the gate's weight or probability of the public encoder after the last
epoch). Method flags were fixed before any run and not tuned. Runs are
kept under benchmarks/runs/safeness/.
"""

import os

import numpy as np
from _runs import train
from quality import PAPER_MPPS

SEEDS = (0, 1, 2)
DATASET = "multifashion_texture"
BUDGET = ["--epochs=6", "--limit=20000", "--batch_size=128", "--backbone=lenet",
          "--width=0.5"]
METHODS = {
    "STL": ["--method=stl"],
    "HPS": ["--method=hps"],
    "SMTL": ["--method=smtl"],
    "L-SMTL": ["--method=lsmtl"],
    "SMTL_c": ["--method=smtl_c"],
    "L-SMTL_c": ["--method=lsmtl_c"],
    "MPPS+B": PAPER_MPPS,
}


def run(method, seed):
    reference = [] if method == "STL" else [f"--reference={run('STL', seed)[2]}"]
    return train(os.path.join("safeness", method.replace(" ", "_"), str(seed)),
                 [f"--dataset={DATASET}", f"--seed={seed}", *BUDGET, *METHODS[method],
                  *reference])


def main():
    print(f"Data set {DATASET}; seeds {SEEDS}; budget {' '.join(BUDGET)}; test "
          "accuracy in %, mean +- std over seeds; Delta_I and eta-hat against the "
          "STL run of the same seed; a_t: public-encoder weight (SMTL, SMTL_c) or "
          "probability (lite) after the last epoch, mean over seeds.\n")
    runs = {m: [run(m, s) for s in SEEDS] for m in METHODS}
    tasks = sorted(k[:-9] for k in runs["STL"][0][0] if k.endswith("_accuracy"))
    print("| method | " + " | ".join(tasks) + " | Delta_I (%) | eta-hat | eta-hat per seed"
          " | " + " | ".join(f"a_{t}" for t in tasks) + " |")
    print("|---" * (2 * len(tasks) + 4) + "|")
    cell = lambda v: f"{np.mean(v):.2f} +- {np.std(v):.2f}"
    for method, seeds in runs.items():
        accuracy = [cell([100 * r[f"{t}_accuracy"] for r, _, _ in seeds]) for t in tasks]
        if method == "STL":
            compared = ["0", "100", "-"]
        else:
            vs = [r["vs_reference"] for r, _, _ in seeds]
            compared = [cell([v["delta_i"] for v in vs]),
                        f"{np.mean([v['eta_hat'] for v in vs]):.1f}",
                        " / ".join(f"{v['eta_hat']:.0f}" for v in vs)]
        gates = ["-"] * len(tasks)
        if "smtl" in seeds[0][1]:
            gates = [f"{np.mean([h['smtl'][-1]['alpha'][t] for _, h, _ in seeds]):.2f}"
                     for t in tasks]
        print(f"| {method} | " + " | ".join(accuracy + compared + gates) + " |", flush=True)


if __name__ == "__main__":
    main()
