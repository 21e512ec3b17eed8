"""Runs that resume: the training state at every epoch's end, the epoch a run
reports (the papers' validation-selected one), one run per folder, its
writer under multi-worker training (`is_chief`), and a refusal to continue
another run's checkpoint (`check_same_run`).

    selection = Selection("val_loss", tasks)
    checkpoint = Checkpoint("out/checkpoint", "out/logs", selection=selection)
    with exclusive_folder("out"):
        done = checkpoint.restore(model)          # 0, or the epochs already trained
        model.fit(train, validation_data=val, epochs=10, initial_epoch=done,
                  callbacks=[checkpoint])
        model.load_weights(checkpoint.weights_path(checkpoint.selected_epoch()))
"""

import contextlib
import fcntl
import json
import math
import os
import re
import shutil

import keras
import tensorflow as tf

WEIGHTS, PROGRESS = "state.weights.h5", "progress.json"


class Selection:
    """Which epoch of a run is reported: the papers report test metrics at
    the epoch of best validation (Maximum Roaming: validation F-score;
    PPNet: validation loss), not at the last one.

    Args:
        criterion: `"last"`; `"val_loss"` (the sum of the task losses,
            lowest); `"val_{metric}"`, the mean over the tasks that have
            `metric` (e.g. `val_accuracy`); or `"val_{task}_{metric}"` (e.g.
            `val_semantic_miou`). Losses are best lowest, metrics by their
            `higher_is_better`.
        tasks: the run's `Task`s.
    """

    def __init__(self, criterion, tasks):
        self.criterion = criterion
        self.keys, self.higher = self._parse(criterion, tasks)

    @staticmethod
    def _parse(criterion, tasks):
        if criterion == "last":
            return [], True
        directions = {"loss": False, **{f"{t.name}_loss": False for t in tasks},
                      **{f"{t.name}_{m.name}": m.higher_is_better
                         for t in tasks for m in t.metrics}}
        name = criterion.removeprefix("val_")
        if criterion.startswith("val_") and name in directions:
            return [criterion], directions[name]
        keys = [k for k in directions if k.endswith(f"_{name}")
                and k.removesuffix(f"_{name}") in {t.name for t in tasks}]
        if not criterion.startswith("val_") or not keys:
            choices = ["last", "val_loss"] + sorted(
                {f"val_{m.name}" for t in tasks for m in t.metrics}) + [
                f"val_{k}" for k in directions if k != "loss"]
            raise ValueError(f"Unknown selection criterion {criterion!r}: expected one of "
                             f"{', '.join(choices)}.")
        return [f"val_{k}" for k in keys], directions[keys[0]]

    def score(self, logs):
        """The epoch's criterion, higher better; -inf where it is missing
        or not finite (a diverged epoch is never selected)."""
        values = [logs.get(k) for k in self.keys]
        if any(v is None or not math.isfinite(v) for v in values):
            return -math.inf
        mean = sum(values) / len(values)
        return mean if self.higher else -mean

    def best(self, epochs):
        """The number of epochs (1-based) of the selected one among the logs
        `epochs`, the earliest of equals; the last with `"last"`."""
        if not self.keys:
            return len(epochs)
        scores = [self.score(logs) for logs in epochs]
        return scores.index(max(scores)) + 1


class CheckpointError(ValueError):
    """A checkpoint a run cannot continue from."""


class Checkpoint(keras.callbacks.Callback):
    """The training state at every epoch's end, for a rerun to continue from.

    `<folder>/epoch_<k>/` holds the state after k epochs: `state.weights.h5`
    (the model's weights and method state - Phi, targets, draw counts, random
    generator states - and its optimizers') and `progress.json` (every
    epoch's logs and the `history` of the `tracked` callbacks: the MPPS
    schedule, the gates). Both are written into a scratch folder renamed
    once complete, so a kill at any instant leaves the last complete epoch
    whole. (Keras' `BackupAndRestore` writes its weights, then its epoch
    count: a kill between the two would train an epoch twice.) List it after
    the callbacks that add to the logs and histories. With a `selection`,
    the selected epoch's folder is kept too, for the weights a run reports.

    It writes the TensorBoard logs too (`epoch_<metric>` in `train/` and
    `validation/`, the layout of `keras.callbacks.TensorBoard`), from the
    same logs: `restore` rewrites them from the checkpoint, then every epoch
    is added once its checkpoint is whole, so they never hold two runs'
    values of an epoch (an epoch killed in between is written again).

    Under multi-worker training only the chief writes (`writes`): every
    worker restores from the chief's folder, on a file system they share.

    Args:
        folder: where the epochs' states go.
        log_dir: where the TensorBoard logs go (None: none).
        tracked: `{name: callback}` whose `history` is saved and restored.
        writes: whether this process writes (the chief).
        selection: a `Selection`, or None (the last epoch).
    """

    def __init__(self, folder, log_dir=None, tracked=None, writes=True, selection=None):
        super().__init__()
        self.folder, self.log_dir, self.tracked = folder, log_dir, dict(tracked or {})
        self.writes = writes
        self.selection = selection
        self.epochs = []
        self._writers = None

    def weights_path(self, epoch):
        """The state file after `epoch` epochs."""
        return os.path.join(self.folder, f"epoch_{epoch}", WEIGHTS)

    def selected_epoch(self):
        """The epoch (1-based) the run reports: `selection`'s best, or the last."""
        return self.selection.best(self.epochs) if self.selection else len(self.epochs)

    def restore(self, model):
        """Loads the last readable epoch into `model` and the tracked
        callbacks, and rewrites the TensorBoard logs; returns the number of
        epochs trained (0: no checkpoint). An unreadable epoch (a file cut
        short by a full disk, say) is said, removed, and the one before it
        restored; where none can be read, the error names the files."""
        unreadable, saved = [], sorted(self._saved(), reverse=True)
        if saved:
            model.build_optimizer()  # its slots must exist to be loaded
        for epoch in saved:
            path = os.path.join(self.folder, f"epoch_{epoch}")
            try:
                model.load_weights(os.path.join(path, WEIGHTS))
                with open(os.path.join(path, PROGRESS)) as f:
                    progress = json.load(f)
            except (OSError, ValueError, KeyError) as error:
                unreadable.append(f"{path}: {type(error).__name__}: {str(error)[:300]}")
                continue
            if unreadable:
                print("Checkpoint: could not read\n  " + "\n  ".join(unreadable)
                      + f"\nresuming from {path} instead")
                if self.writes:
                    for later in self._saved():
                        if later > epoch:
                            shutil.rmtree(os.path.join(self.folder, f"epoch_{later}"))
            self.epochs = progress["epochs"]
            for name, callback in self.tracked.items():
                callback.history = progress["tracked"][name]
            break
        else:
            if unreadable:
                raise CheckpointError(
                    "No epoch of the checkpoint can be read into this model:\n  "
                    + "\n  ".join(unreadable) + "\nStart over (train.py: --noresume) or "
                    "give another output folder.")
        if self.writes and self.log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            for epoch, logs in enumerate(self.epochs):
                self._log(epoch, logs)
            self._close()
        return len(self.epochs)

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({k: float(v) for k, v in (logs or {}).items()})
        if not self.writes:
            return
        scratch = os.path.join(self.folder, "partial")
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(scratch)
        self.model.save_weights(os.path.join(scratch, WEIGHTS))
        with open(os.path.join(scratch, PROGRESS), "w") as f:
            json.dump({"epochs": self.epochs,
                       "tracked": {n: c.history for n, c in self.tracked.items()}},
                      f, default=float)
        os.rename(scratch, os.path.join(self.folder, f"epoch_{epoch + 1}"))
        keep = {epoch + 1, self.selected_epoch()}
        for saved in self._saved():
            if saved not in keep:
                shutil.rmtree(os.path.join(self.folder, f"epoch_{saved}"))
        if self.log_dir:
            self._log(epoch, self.epochs[-1])
            for writer in self._writers.values():
                writer.flush()

    def on_train_end(self, logs=None):
        self._close()

    def history(self):
        """Every epoch's logs, as `keras.callbacks.History.history`."""
        keys = {k for logs in self.epochs for k in logs}
        return {k: [logs.get(k) for logs in self.epochs] for k in sorted(keys)}

    def _saved(self):
        """The numbers of epochs of the whole checkpoints in the folder."""
        names = os.listdir(self.folder) if os.path.isdir(self.folder) else []
        return [int(n[6:]) for n in names if re.fullmatch(r"epoch_\d+", n)]

    def _log(self, epoch, logs):
        if self._writers is None:
            self._writers = {split: tf.summary.create_file_writer(
                os.path.join(self.log_dir, split)) for split in ("train", "validation")}
        for name, value in logs.items():
            split = "validation" if name.startswith("val_") else "train"
            with self._writers[split].as_default():
                tf.summary.scalar(f"epoch_{name.removeprefix('val_')}", value, step=epoch)

    def _close(self):
        for writer in (self._writers or {}).values():
            writer.close()
        self._writers = None


def fit_resumed(model, checkpoint, x, epochs, test, callbacks=(), resume=True, **fit_kwargs):
    """Trains `model` to `epochs` from where `checkpoint` left it, and
    evaluates it on `test` at the last epoch and at the one its selection
    picks (the papers' protocol: the model reported is the validated one).

    Continues from the checkpoint's last whole epoch (with `resume=False`,
    only a process that writes it does: a multi-worker run's other workers
    start afresh rather than read a folder their chief may be emptying),
    runs `model.fit(x, epochs=epochs, callbacks=callbacks + [checkpoint],
    **fit_kwargs)` for the epochs left, then leaves the model at the
    selected epoch's weights.

    Returns `(history, selected, last)`: every epoch's logs, and the test
    results at the selected and the last epoch, each with its `epoch`
    (1-based). Raises a `CheckpointError` when the checkpoint holds more
    epochs than `epochs`, or none that fits the model.
    """
    done = checkpoint.restore(model) if resume or checkpoint.writes else 0
    if done > epochs:
        raise CheckpointError(f"{checkpoint.folder} holds {done} epochs, more than the "
                              f"{epochs} to train: train to {done} or more, or start over "
                              "(train.py: --noresume).")
    if done == epochs:
        print(f"{checkpoint.folder}: all {done} epochs trained already; evaluating it")
    else:
        if done:
            print(f"Resuming at epoch {done + 1} from {checkpoint.folder}")
        model.fit(x, epochs=epochs, initial_epoch=done,
                  callbacks=list(callbacks) + [checkpoint], **fit_kwargs)
    last = {**model.evaluate(test, return_dict=True, verbose=0), "epoch": epochs}
    selected = checkpoint.selected_epoch()
    if selected == epochs:
        return checkpoint.history(), dict(last), last
    model.load_weights(checkpoint.weights_path(selected))
    best = {**model.evaluate(test, return_dict=True, verbose=0), "epoch": selected}
    return checkpoint.history(), best, last


@contextlib.contextmanager
def exclusive_folder(folder):
    """Holds `folder` for one run: a second process asking for it while the
    first runs gets a `RuntimeError` naming the holder. The hold (an
    advisory lock on `<folder>/.lock`) ends with the process, a killed one
    included."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RuntimeError(f"{folder} is in use by another run ({holder}): wait for "
                               "it, or give another output folder.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_chief(strategy):
    """Whether this process writes a run's outputs under `strategy`: always,
    except under multi-worker training, where the chief does (the `chief`
    task, or worker 0 of a cluster without one)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


def check_same_run(folder, flag_values):
    """Refuses to continue another run's checkpoint: `<folder>/run.json`
    keeps the flags (`{name: value}`, JSON values) of the run that wrote
    `<folder>/checkpoint`; a `ValueError` names every flag that differs.
    Then writes `flag_values` there."""
    path = os.path.join(folder, "run.json")
    checkpoint = os.path.join(folder, "checkpoint")
    if os.path.exists(path) and os.path.isdir(checkpoint) and os.listdir(checkpoint):
        with open(path) as f:
            before = json.load(f)
        differ = sorted(k for k in set(before) | set(flag_values)
                        if before.get(k) != flag_values.get(k))
        if differ:
            raise ValueError(
                f"{folder} holds the checkpoint of a run with other flags ("
                + "; ".join(f"--{k}: {before.get(k)!r} there, {flag_values.get(k)!r} here"
                            for k in differ)
                + "). Rerun with that run's flags to continue it, --noresume to start over "
                "in that folder, or give another --output_dir.")
    with open(path, "w") as f:
        json.dump(flag_values, f, indent=1)
