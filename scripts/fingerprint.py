"""A fingerprint of behaviour: every method's short run, its weights and metrics.

    .venv/bin/python scripts/fingerprint.py /tmp/before.json
    ... refactor ...
    .venv/bin/python scripts/fingerprint.py /tmp/after.json --compare /tmp/before.json

Each entry is a `train.py` run: every method for 2 epochs on the synthetic
data sets (both layouts, jointly labelled and not, where a method takes
them), a few weighting and aggregator compositions, and the default job for
1 epoch. Its fingerprint is a SHA-256 of the final weights of every saved
model (in `get_weights()` order) and the exact test results (or, for a run
train.py refuses, its error). A rerun continues an unfinished output file. On one CPU a
refactor that changes no behaviour leaves every entry bit for bit equal.
"""

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = ("hps", "stl", "mpps", "smtl", "lsmtl", "smtl_c", "lsmtl_c", "mr", "tr", "ppnet",
           "self_learn", "adj_only", "adj_fixed", "trace_fixed", "trace_dynamic", "mtan",
           "cross_stitch")
SHORT = ("--epochs=2", "--width=0.5", "--ppnet_period=1")


def entries():
    """`{name: train.py flags}`."""
    runs = {}
    for dataset in ("synthetic", "synthetic_groups"):
        for method in METHODS:
            runs[f"{method}/{dataset}"] = (f"--method={method}", f"--dataset={dataset}", *SHORT)
    runs["smtl_bilevel/synthetic"] = ("--method=smtl", "--smtl_bilevel",
                                      "--dataset=synthetic", *SHORT)
    for method, objective in (("hps", "--weighting=uw"), ("hps", "--weighting=gradnorm"),
                              ("hps", "--weighting=auto_lambda"), ("hps", "--aggregator=pcgrad"),
                              ("hps", "--aggregator=mgda"), ("mpps", "--aggregator=cagrad"),
                              ("mpps", "--weighting=dwa"), ("mr", "--aggregator=graddrop")):
        name = f"{method}+{objective.split('=')[1]}/synthetic"
        runs[name] = (f"--method={method}", objective, "--dataset=synthetic", *SHORT)
    runs["default_job"] = ("--epochs=1",)
    return runs


def _weights_sha256(folder):
    import keras
    import numpy as np

    import tf_mtl  # noqa: F401  registers the layers for loading

    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "model*.keras"))):
        model = keras.saving.load_model(path)
        for weight in model.get_weights():
            digest.update(np.ascontiguousarray(weight).tobytes())
        keras.backend.clear_session()
    return digest.hexdigest()


def fingerprint(output, names=None):
    """Runs the entries (`names`, default all) missing from `output`, writing
    it after each: a rerun continues where one stopped. A run that
    train.py refuses is fingerprinted by its error's last line."""
    prints = {}
    if os.path.exists(output):
        with open(output) as f:
            prints = json.load(f)
    with tempfile.TemporaryDirectory() as scratch:
        for name, flags in entries().items():
            if (names and name not in names) or name in prints:
                continue
            out = os.path.join(scratch, name.replace("/", "_"))
            run = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags,
                                  f"--output_dir={out}", "--export=false", "--verbose=0"],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if run.returncode:
                prints[name] = {"error": run.stderr.strip().splitlines()[-1]}
            else:
                with open(os.path.join(out, "results.json")) as f:
                    results = json.load(f)
                prints[name] = {"weights": _weights_sha256(out), "results": results}
            print(name, prints[name].get("weights", prints[name].get("error")), flush=True)
            with open(output, "w") as f:
                json.dump(prints, f, indent=1, sort_keys=True)
    return prints


def compare(after, before):
    """Lines naming every entry that differs. Results keys only `after` has
    are named apart: an addition to results.json changes no behaviour."""
    lines = []
    for name in sorted(set(before) | set(after)):
        if name not in after or name not in before:
            lines.append(f"{name}: only in {'before' if name in before else 'after'}")
            continue
        ours, theirs = after[name], before[name]
        what = [k for k in ("weights", "error") if ours.get(k) != theirs.get(k)]
        results, earlier = ours.get("results", {}), theirs.get("results", {})
        what += [f"results[{k!r}]" for k in sorted(earlier) if results.get(k) != earlier[k]]
        if what:
            lines.append(f"{name}: {', '.join(what)} differ")
    return lines


def added_keys(after, before):
    """The results keys every entry of `after` has and its `before` lacks."""
    added = [set(a["results"]) - set(before[n]["results"]) for n, a in after.items()
             if "results" in a and "results" in before.get(n, {})]
    return sorted(set.intersection(*added)) if added else []


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output")
    parser.add_argument("--compare", help="an earlier fingerprint to compare with")
    parser.add_argument("--only", action="append", help="entries to run (default: all)")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    prints = fingerprint(args.output, args.only)
    if args.compare:
        with open(args.compare) as f:
            before = {k: v for k, v in json.load(f).items() if not args.only or k in prints}
        differ = compare(prints, before)
        print("\n".join(differ) or f"all {len(prints)} entries equal, bit for bit")
        print("results keys added:", ", ".join(added_keys(prints, before)) or "none")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
