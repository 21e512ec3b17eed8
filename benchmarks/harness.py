"""Runs declared experiments with `train.py` and keeps one record per run.

    .venv/bin/python benchmarks/harness.py status            # what is done, what is left
    .venv/bin/python benchmarks/harness.py cost              # CPU-hours of what is left
    .venv/bin/python benchmarks/harness.py run --jobs=2 --group=main --dataset=multifashion
    .venv/bin/python benchmarks/harness.py report            # benchmarks/RESULTS.md

An experiment (`experiments.py`) is data: a group, a data set, a label, the
flags of `train.py` and the seeds. Each (experiment, seed) is one run of
`train.py` in its own output folder under `--scratch_dir`; when it ends its
record, a small JSON file (flags, commit, per-epoch history, test results at
the selected and at the last epoch, wall time), is written under
`--results_dir/<group>/<data set>/<label>/seed<k>.json`. A run whose record
has its flags is never redone, so a later session continues where one
stopped (a record of flags since changed is redone); an interrupted run
resumes from its checkpoint (`train.py` resumes by itself).

Run it from a git worktree pinned to a commit, writing the records into the
main checkout, so that editing code meanwhile cannot change an experiment:

    git worktree add --detach /tmp/bench HEAD && ln -s "$PWD/.venv" /tmp/bench/.venv
    (cd /tmp/bench && .venv/bin/python benchmarks/harness.py run --jobs=2 \\
        --results_dir="$OLDPWD/benchmarks/results") &

`report` reads the records alone.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One configuration of `train.py`, run once per seed.

    Attributes:
        group: the question it belongs to (`main`, `table5`, an ablation).
        dataset: `--dataset`.
        label: the method's name in the tables (`MR p=0.5`).
        flags: `train.py` flags beyond the data set, the seed and the output.
        seeds: `--seed` of each run.
    """

    group: str
    dataset: str
    label: str
    flags: tuple
    seeds: tuple = (0, 1, 2)

    def __post_init__(self):
        reserved = [f for f in self.flags
                    if re.match(r"--(no)?(dataset|seed|output_dir|export_dir|resume)\b", f)]
        if reserved:
            raise ValueError(f"Experiment {self.label!r} on {self.dataset}: the harness "
                             f"sets {reserved[0]!r} itself.")

    def runs(self):
        return [Run(self, seed) for seed in self.seeds]


@dataclasses.dataclass(frozen=True)
class Run:
    experiment: Experiment
    seed: int

    @property
    def key(self):
        """`<group>/<data set>/<label>/seed<k>`, the label made a file name."""
        e = self.experiment
        label = re.sub(r"[^A-Za-z0-9.=+-]+", "_", e.label).strip("_")
        return f"{e.group}/{e.dataset}/{label}/seed{self.seed}"

    def flags(self):
        """`train.py`'s flags but the output folder. The harness's own come
        after the experiment's: on a repeated flag absl keeps the last."""
        e = self.experiment
        return [*e.flags, f"--dataset={e.dataset}", f"--seed={self.seed}", "--export=false",
                "--verbose=2"]

    def argv(self, output_dir):
        return [sys.executable, os.path.join(ROOT, "train.py"), *self.flags(),
                f"--output_dir={output_dir}"]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def step_ms(log):
    """Milliseconds per step of each epoch in a `--verbose=2` Keras log."""
    return [float(value) * _UNITS[unit] for value, unit in
            re.findall(r"\d+/\d+ - \S+ - (\d+(?:\.\d+)?)(us|ms|s)/step", log)]


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def record_path(results_dir, run):
    return os.path.join(results_dir, f"{run.key}.json")


def load_records(results_dir):
    """Every record under `results_dir`, by key."""
    records = {}
    for folder, _, files in os.walk(results_dir):
        for name in sorted(files):
            if name.endswith(".json"):
                record = _read_json(os.path.join(folder, name))
                records[record["key"]] = record
    return records


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def is_recorded(run, results_dir):
    """Whether `run` has a record made with its flags as declared now."""
    path = record_path(results_dir, run)
    return os.path.exists(path) and _read_json(path)["flags"] == run.flags()


def execute(run, results_dir, scratch_dir):
    """Runs `run` unless it is recorded; returns its record path, or raises
    naming the run and its log. A run of other flags (the declaration
    changed), recorded or interrupted, is redone from the start."""
    path = record_path(results_dir, run)
    if is_recorded(run, results_dir):
        return path
    output_dir = os.path.join(scratch_dir, run.key)
    started = os.path.join(output_dir, "harness_flags.json")
    if os.path.exists(output_dir) and (not os.path.exists(started)
                                       or _read_json(started) != run.flags()):
        shutil.rmtree(output_dir)  # a checkpoint of other flags: start over
    os.makedirs(output_dir, exist_ok=True)
    with open(started, "w") as f:
        json.dump(run.flags(), f)
    log = os.path.join(output_dir, "train.log")
    start = time.perf_counter()
    with open(log, "a") as out:
        status = subprocess.run(run.argv(output_dir), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"{run.key}: train.py exited with {status}; see {log}.")
    results, history, run_flags = (_read_json(os.path.join(output_dir, name))
                                   for name in ("results.json", "history.json", "run.json"))
    with open(log) as f:
        steps = step_ms(f.read())
    last = results.pop("last")
    record = {
        "key": run.key,
        **{f.name: getattr(run.experiment, f.name) for f in dataclasses.fields(Experiment)
           if f.name != "seeds"},
        "seed": run.seed,
        "flags": run.flags(),
        "run_flags": run_flags,
        "commit": _commit(),
        # A run resumed after a kill counts only its last process's time.
        "seconds": seconds,
        "step_ms": steps,
        "selected": results,
        "last": last,
        "history": history,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)  # a record is whole or absent
    return path


def pending(experiments, results_dir):
    return [run for e in experiments for run in e.runs()
            if not is_recorded(run, results_dir)]


def run_all(experiments, results_dir, scratch_dir, jobs=1,
            report=lambda line: print(line, flush=True)):
    """Runs every pending run, `jobs` at a time; failures are reported, not
    fatal. Returns the keys of the failed runs."""
    todo = pending(experiments, results_dir)
    failed = []
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(execute, run, results_dir, scratch_dir): run for run in todo}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            run = futures[future]
            try:
                future.result()
                report(f"[{done}/{len(todo)}] {run.key}")
            except RuntimeError as error:
                failed.append(run.key)
                report(f"[{done}/{len(todo)}] FAILED {error}")
    return failed


def _select(experiments, groups, datasets):
    chosen = [e for e in experiments
              if (not groups or e.group in groups) and (not datasets or e.dataset in datasets)]
    if not chosen:
        raise SystemExit(f"No experiment in groups {groups or 'any'} on data sets "
                         f"{datasets or 'any'}.")
    return chosen


def main(argv=None):
    import experiments as declared

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run", "status", "cost", "report"])
    parser.add_argument("--group", action="append", default=[])
    parser.add_argument("--dataset", action="append", default=[])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--results_dir", default=RESULTS_DIR)
    parser.add_argument("--scratch_dir", default=os.path.join(ROOT, "benchmarks", "runs"))
    parser.add_argument("--page", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    args = parser.parse_args(argv)
    chosen = _select(declared.EXPERIMENTS, args.group, args.dataset)
    if args.command == "run":
        failed = run_all(chosen, args.results_dir, args.scratch_dir, args.jobs)
        return 1 if failed else 0
    if args.command == "report":
        import report

        report.write(load_records(args.results_dir), chosen, args.page)
        return 0
    todo = pending(chosen, args.results_dir)
    if args.command == "cost":
        records = load_records(args.results_dir)
        hours = sum(declared.cost_seconds(run, records) for run in todo) / 3600
        print(f"{len(todo)} runs left: about {hours:.1f} CPU-hours.")
        return 0
    total = sum(len(e.seeds) for e in chosen)
    print(f"{total - len(todo)} of {total} runs recorded.")
    for run in todo:
        print("  left:", run.key)
    return 0


if __name__ == "__main__":
    sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), ROOT]  # experiments, tf_mtl
    sys.exit(main())
