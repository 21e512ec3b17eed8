"""One `train.py` run per (benchmark, data set, method, seed), cached."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(out, flags):
    """Runs `train.py --output_dir=benchmarks/runs/<out> *flags` unless its
    results exist; returns `(results, history, path of results.json)`."""
    out = os.path.join(ROOT, "benchmarks", "runs", out)
    results = os.path.join(out, "results.json")
    if not os.path.exists(results):
        # After `flags`: a --flagfile's own --output_dir must not win.
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                        *flags, f"--output_dir={out}", "--verbose=0"],
                       check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    with open(results) as f, open(os.path.join(out, "history.json")) as h:
        return json.load(f), json.load(h), results
