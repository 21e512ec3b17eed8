"""Trains one multi-task method on one data set with `model.fit`.

    python train.py                                    # MPPS on MultiFashion
    python train.py --flagfile=configs/hps_multifashion.cfg
    python train.py --method=stl --dataset=fashion_groups --epochs=5

Writes into --output_dir: `history.json` (Keras History, plus the method's
records: MPPS's schedule, the partitions, gates or passing), `results.json`
(test metrics at the epoch --selection picks, by default the lowest
validation loss as the papers report, with that `epoch`, under `last` those
of the last epoch, the model's `parameters`, and `task_metrics`, each
task's metrics with whether higher is better), the model of that epoch
(`model.keras`; STL: `model_<task>.keras`), TensorBoard logs under `logs/`,
figures (`*.png`), the run's flags (`run.json`), and the export (SavedModel
+ .tflite) into --export_dir. One run at a time holds an --output_dir.

Runs resume: the training state is written under `<output_dir>/checkpoint/`
(STL: `checkpoint/<task>/`) at every epoch's end (`Checkpoint`), and
rerunning the same command continues from it, even after a kill: an
interrupted epoch is redone from its start, and since the data order is a
function of seed and epoch (`tf_mtl.data.ordering`) the weights, method
state, history.json and TensorBoard logs end as an uninterrupted run's (on
CPU bit for bit; `--deterministic` for GPUs). A finished run rerun trains
nothing: it says so, then evaluates, saves and exports the checkpoint again.
`--noresume` starts over. A checkpoint of other flags (`run.json`) is
refused, naming them; an unreadable epoch is said and the one before it
resumed.
"""

import contextlib
import functools
import json
import os
import shutil
import time

import keras
import tensorflow as tf
from absl import app, flags

from tf_mtl import aggregation, methods, metrics, optimizers, weighting
from tf_mtl.checkpoint import (
    Checkpoint, CheckpointError, Selection, check_same_run, exclusive_folder, fit_resumed,
    is_chief)

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "mpps", list(methods.METHODS),
                  "Method to train: " + "; ".join(f"{m.name}, {m.help}"
                                                  for m in methods.METHODS.values()) + ".")
flags.DEFINE_enum("dataset", "multifashion",
                  ["multifashion", "multifashion_texture", "fashion_groups",
                   "fashion_domains", "fashion_scenes", "synthetic", "synthetic_groups",
                   "nyuv2", "cityscapes", "multi_cifar100", "celeba"],
                  "Data set (tf_mtl.data.load); the papers' (nyuv2 ... celeba) are read "
                  "from --data_dir (see the README's 'Reproducing the papers').")
flags.DEFINE_enum("backbone", "lenet",
                  ["lenet", "resnet", "resnet18", "resnet34", "resnet50", "vgg16", "segnet"],
                  "Shared backbone (tf_mtl.backbones.BACKBONES).")
flags.DEFINE_enum("output_stride", "8", ["8", "16"],
                  "Dense tasks on resnet18/34/50: the backbone's output stride, its "
                  "later stages dilated instead of strided (DeepLab).")
flags.DEFINE_list("aspp_rates", [],
                  "Dense tasks: the dilation rates of a DeepLab-v3 ASPP head per task "
                  "(e.g. 12,24,36 at output stride 8); empty: MTAN's 3x3 + 1x1 head.")
flags.DEFINE_integer("head_channels", 64, "Dense tasks: channels inside each task's head.",
                     lower_bound=1)
flags.DEFINE_float("width", 1.0, "Width multiplier of the backbone.", lower_bound=0.01)
flags.DEFINE_integer("epochs", 8, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Global batch size.", lower_bound=1)
flags.DEFINE_enum("cityscapes_classes", "7", ["7", "10", "19"],
                  "Semantic classes of --dataset=cityscapes: MTAN's 7, MPPS's 10 (its "
                  "labelling unverified) or the benchmark's 19 (Auto-Lambda's).")
flags.DEFINE_integer("seed", 0, "Seed of data, initialisation and masks.", lower_bound=0)
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy: default (one device), mirrored (all local "
                  "devices) or multi_worker (the devices of every worker of the cluster "
                  "in TF_CONFIG).")
flags.DEFINE_enum("routing", None, ["tiled", "sequential"],
                  "How jointly labelled batches cross task-conditioned layers: one "
                  "tiled pass (fastest) or one pass per task (least memory); default: "
                  "the method's (sequential for MPPS, tiled for the others).")
flags.DEFINE_enum("mixed_precision", "none", ["none", "mixed_float16", "mixed_bfloat16"],
                  "Keras dtype policy: float16 or bfloat16 computation with float32 "
                  "weights (float16 with loss scaling); the methods' masks, gates, "
                  "partitions and passing matrices stay float32.")
flags.DEFINE_bool("jit_compile", False,
                  "Compile the train step with XLA (see the README for what it costs).")
flags.DEFINE_string("output_dir", "runs/latest", "Where history, logs and figures go.")
flags.DEFINE_string("export_dir", None, "Where the export goes (default: <output_dir>/export).")
flags.DEFINE_bool("export", True, "Export the trained model (SavedModel + .tflite).")
flags.DEFINE_string("data_dir", None,
                    "Folder of the Fashion-MNIST IDX files, of NYUv2's or Cityscapes' "
                    ".npy files, or the TensorFlow Datasets folder (multi_cifar100, "
                    "celeba).")
flags.DEFINE_bool("download", False,
                  "Let TensorFlow Datasets download what --data_dir lacks "
                  "(Fashion-MNIST, CIFAR-100, CelebA; needs a network).")
flags.DEFINE_integer("limit", None, "Keep at most this many examples per split.",
                     lower_bound=1)
flags.DEFINE_string("reference", None,
                    "results.json of a single-task run: prints Delta (MPPS eq. 5), "
                    "Delta_I and eta-hat (Safe MTL 4.1) against it.")
flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"], "Keras fit verbosity.")
flags.DEFINE_string("selection", "val_loss",
                    "The epoch whose test results are reported (and the model saved and "
                    "exported): the best by a validation criterion, val_loss (lowest), "
                    "val_<metric> (mean over the tasks; e.g. val_accuracy) or "
                    "val_<task>_<metric>; or last. results.json holds the last epoch's too.")
flags.DEFINE_float("heldout_fraction", 0.2,
                   "Share of the training split held out for what is fitted on held-out "
                   "data (bi-level Safe MTL's gates, Auto-Lambda's weights); the "
                   "validation split selects the epoch, so it is never used for that.",
                   lower_bound=0.01, upper_bound=0.99)
flags.DEFINE_bool("resume", True,
                  "Continue from <output_dir>/checkpoint if there is one; false: "
                  "start over (clears the output dir's checkpoint, logs and results).")
flags.DEFINE_bool("deterministic", False,
                  "Deterministic ops (tf.config.experimental.enable_op_determinism): "
                  "bit-identical reruns and resumes on GPUs too, slower. CPU runs "
                  "are bit-identical without it.")

optimizers.define_flags()
weighting.define_flags()
aggregation.define_flags()
methods.define_flags()


def _dense_tasks(tasks):
    """The tasks, dense ones with the head of --aspp_rates and --head_channels."""
    from tf_mtl import tasks as task_specs

    rates = [int(r) for r in FLAGS.aspp_rates]
    if any(r < 1 for r in rates):
        raise app.UsageError(f"--aspp_rates must be positive integers. Received: "
                             f"{','.join(FLAGS.aspp_rates)}")
    if not any(t.dense for t in tasks):
        if rates:
            raise app.UsageError("--aspp_rates is for dense tasks; the tasks of "
                                 f"--dataset={FLAGS.dataset} are not.")
        return tasks
    head = {"aspp_rates": rates or None, "head_channels": FLAGS.head_channels}
    return [task_specs.from_config({**t.get_config(), **head}) if t.dense else t
            for t in tasks]


def _backbone(dense):
    """`backbone(**options)` of --backbone and --width; dense tasks get its
    feature map (no final pooling; dilated ResNets at --output_stride)."""
    from tf_mtl import backbones

    options = {}
    if dense:
        if FLAGS.backbone in ("lenet", "vgg16"):
            raise app.UsageError(
                f"--backbone={FLAGS.backbone} flattens its features: the dense tasks of "
                f"--dataset={FLAGS.dataset} need resnet, resnet18/34/50 or segnet.")
        if FLAGS.backbone == "resnet":
            options["dense_prediction"] = True
        elif FLAGS.backbone != "segnet":
            options["output_stride"] = int(FLAGS.output_stride)
    elif FLAGS.backbone == "segnet":
        raise app.UsageError(f"--backbone=segnet outputs a full-resolution map: it is for "
                             f"dense tasks, and --dataset={FLAGS.dataset} has none.")
    return functools.partial(backbones.BACKBONES[FLAGS.backbone], FLAGS.width, **options)


def _optimizer(train):
    try:
        return optimizers.from_flags(FLAGS, FLAGS.epochs, int(train.cardinality()))
    except ValueError:
        raise app.UsageError(f"--lr_schedule={FLAGS.lr_schedule} needs the number of "
                             "steps per epoch, and the training split does not say it.") from None


def _strategy():
    if FLAGS.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if FLAGS.strategy == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise app.UsageError(
                "--strategy=multi_worker reads the cluster and this worker's place in "
                "it from the TF_CONFIG environment variable, which is not set "
                "(see the README's multi-worker section).")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _fit(model, strategy, train, validation, test, callbacks, name=None, carve=None):
    """Trains from the checkpoint in `<output_dir>/checkpoint[/name]`, if
    any, to --epochs, with TensorBoard logs in `<output_dir>/logs[/name]`,
    and leaves the model at the epoch --selection picks. A model with a
    bi-level part trains on the data `carve(--heldout_fraction)` leaves
    and fits that part on what it holds out (`MultiTaskData.with_heldout`).
    Returns the history of every epoch and the test results there and at
    the last epoch, each with its `epoch` (1-based)."""
    def compile_for(train):  # its steps per epoch drive the learning-rate schedule
        with strategy.scope():  # the optimizer's variables are mirrored too
            model.compile(optimizer=_optimizer(train),
                          jit_compile=FLAGS.jit_compile,
                          weighting=weighting.from_flags(FLAGS),
                          aggregator=aggregation.from_flags(FLAGS),
                          aggregate_on=FLAGS.aggregate_on,
                          per_task_gradients=FLAGS.per_task_gradients)

    compile_for(train)  # which says whether the model takes held-out data
    heldout = {}
    if model.takes_heldout_data():
        try:
            if carve is None:
                raise ValueError("this run's data has no training split to carve it from.")
            carved = carve(FLAGS.heldout_fraction)
        except ValueError as error:
            raise app.UsageError(
                f"--dataset={FLAGS.dataset}: held-out data for --method={FLAGS.method}'s "
                f"bi-level part or --weighting=auto_lambda: {error}") from None
        train, heldout = carved.train, {"heldout_data": carved.heldout}
        compile_for(train)
    for split, data in (("training", train), ("validation", validation), ("test", test)):
        model.check_dataset(data, f"the {split} split")  # all before the first step
    where = lambda folder: os.path.join(FLAGS.output_dir, folder, *([name] if name else []))
    tracked = {type(c).__name__: c for c in callbacks if hasattr(c, "history")}
    try:
        selection = Selection(FLAGS.selection, model.tasks)
    except ValueError as error:
        raise app.UsageError(f"--selection: {error}") from None
    checkpoint = Checkpoint(where("checkpoint"), where("logs"), tracked,
                            writes=is_chief(strategy), selection=selection)
    verbose = FLAGS.verbose if FLAGS.verbose == "auto" else int(FLAGS.verbose)
    try:
        history, best, last = fit_resumed(
            model, checkpoint, train, FLAGS.epochs, test, callbacks, resume=FLAGS.resume,
            validation_data=validation, verbose=verbose, **heldout)
    except CheckpointError as error:
        raise app.UsageError(f"--output_dir={FLAGS.output_dir}: {error}") from None
    if best["epoch"] != last["epoch"]:
        print(f"{name or FLAGS.method}: epoch {best['epoch']} of {FLAGS.epochs} selected by "
              f"--selection={FLAGS.selection}")
    return history, best, last


def _train_single_tasks(data, tasks, input_shape, strategy, backbone, export_dir):
    """STL: one run per task on that task's view of the data; results with
    each task's selected epoch (`epoch`, by task)."""
    from tf_mtl import export
    from tf_mtl.methods import single_task, task_view

    histories, results, last = {}, {"epoch": {}, "parameters": 0}, {"epoch": {}}
    for index, task in enumerate(tasks):
        view = lambda d: task_view(d, index, task.name, data.jointly_labelled)
        with strategy.scope():
            model = single_task(backbone(), task, input_shape)
        histories[task.name], *task_results = _fit(
            model, strategy, view(data.train), view(data.validation), view(data.test), [],
            task.name)
        for merged, values in zip((results, last), task_results):
            merged.update({k: v for k, v in values.items() if k not in ("loss", "epoch")})
            merged["epoch"][task.name] = values["epoch"]
        results["parameters"] += model.count_params()
        if is_chief(strategy):
            model.save(os.path.join(FLAGS.output_dir, f"model_{task.name}.keras"))
            if FLAGS.export:
                export.export(model, os.path.join(export_dir, task.name))
    return histories, results, last


def _load_reference(tasks):
    """The single-task results of --reference, checked before training."""
    if not FLAGS.reference:
        return None
    try:
        with open(FLAGS.reference) as f:
            reference = json.load(f)
    except (OSError, ValueError) as error:
        raise app.UsageError(f"--reference={FLAGS.reference}: {error}") from None
    missing = [k for t in tasks for k in (f"{t.name}_{m.name}" for m in t.metrics)
               if not isinstance(reference, dict) or k not in reference]
    if missing:
        raise app.UsageError(
            f"--reference={FLAGS.reference} lacks the metrics {missing} of this "
            "run's tasks: give the results.json of an STL run on the same data set.")
    return reference


def _compare(tasks, results, reference):
    """Delta (MPPS eq. 5), Delta_I and eta-hat (Safe MTL 4.1) against STL."""
    safeness = metrics.safeness(results, reference, metrics.task_metrics(tasks))
    return {"delta": metrics.relative_improvement(results, reference,
                                                  metrics.directions(tasks)),
            "delta_i": safeness["delta_i"], "eta_hat": safeness["eta_hat"]}


def _print_table(tasks, results):
    last = results["last"]
    print(f"\ntest at epoch {results['epoch']} (--selection={results['selection']}); "
          f"last: epoch {last['epoch']}")
    print(f"{'task':<12}{'metric':<12}{'selected':>10}{'last':>10}")
    for task in tasks:
        for name in ["loss"] + [m.name for m in task.metrics]:
            key = f"{task.name}_{name}"
            print(f"{task.name:<12}{name:<12}{results[key]:>10.4f}{last[key]:>10.4f}")
    accuracies = [results[f"{t.name}_accuracy"] for t in tasks
                  if f"{t.name}_accuracy" in results]
    if accuracies:
        summary = metrics.accuracy_summary(accuracies)
        print("accuracy   " + "  ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    if "vs_reference" in results:
        compared = results["vs_reference"]
        print(f"vs {FLAGS.reference}: Delta {compared['delta']:+.2f}%  "
              f"Delta_I {compared['delta_i']:+.2f}%  eta-hat {compared['eta_hat']:.0f}")


# Flags a rerun may change: where the outputs go and how they are shown,
# how long it runs and on what devices; not what is trained.
RERUN_MAY_CHANGE = frozenset({
    "output_dir", "export_dir", "export", "verbose", "resume", "data_dir", "download",
    "reference", "epochs", "strategy", "deterministic", "selection"})


def _check_same_run():
    """Refuses to continue another run's checkpoint (`check_same_run`): the
    flags of this file and of tf_mtl but `RERUN_MAY_CHANGE`."""
    ours = FLAGS.find_module_defining_flag("method")
    flag_values = {f.name: f.value for module, defined in FLAGS.flags_by_module_dict().items()
                   if module == ours or module.startswith("tf_mtl.") for f in defined
                   if f.name not in RERUN_MAY_CHANGE}
    try:  # the values as run.json will read them
        check_same_run(FLAGS.output_dir, json.loads(json.dumps(flag_values)))
    except ValueError as error:
        raise app.UsageError(f"--output_dir: {error}") from None


def main(argv):
    del argv
    strategy = _strategy()  # first: MultiWorkerMirroredStrategy precedes every op
    with contextlib.ExitStack() as stack:
        if is_chief(strategy):  # the one writer of the output folder
            try:
                stack.enter_context(exclusive_folder(FLAGS.output_dir))
            except RuntimeError as error:
                raise app.UsageError(f"--output_dir: {error}") from None
        _run(strategy)


def _run(strategy):
    from tf_mtl import data as datasets, export

    start = time.time()
    chief = is_chief(strategy)
    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.mixed_precision != "none":
        keras.mixed_precision.set_dtype_policy(FLAGS.mixed_precision)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:
        options = ({"num_classes": int(FLAGS.cityscapes_classes)}
                   if FLAGS.dataset == "cityscapes" else {})
        data = datasets.load(FLAGS.dataset, FLAGS.batch_size, FLAGS.seed,
                             FLAGS.data_dir, FLAGS.limit, FLAGS.download, **options)
    except (FileNotFoundError, ValueError) as error:
        raise app.UsageError(f"--dataset={FLAGS.dataset}: {error}") from None
    tasks = _dense_tasks(list(data.tasks))
    reference = _load_reference(tasks)
    input_shape = tuple(data.train.element_spec[0].shape[1:])
    backbone = _backbone(dense=any(t.dense for t in tasks))
    print(f"{FLAGS.strategy} strategy: {strategy.num_replicas_in_sync} replicas")
    export_dir = FLAGS.export_dir or os.path.join(FLAGS.output_dir, "export")
    if not FLAGS.resume and chief:
        for name in ("checkpoint", "logs", "history.json", "results.json", "run.json"):
            path = os.path.join(FLAGS.output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    if chief:
        _check_same_run()

    extra = {}
    method = methods.METHODS[FLAGS.method]
    if method.single_task:
        history, results, last = _train_single_tasks(
            data, tasks, input_shape, strategy, backbone, export_dir)
        if not chief:
            return
    else:
        with strategy.scope():
            model, callbacks = method.build(
                FLAGS, backbone, tasks, input_shape, data.jointly_labelled,
                FLAGS.epochs)
        history, results, last = _fit(model, strategy, data.train, data.validation,
                                      data.test, callbacks, carve=data.with_heldout)
        results["parameters"] = model.count_params()
        if not chief:  # its replica of the model, in a folder of its own
            resolver = strategy.cluster_resolver
            folder = os.path.join(FLAGS.output_dir, "workers",
                                  f"{resolver.task_type}_{resolver.task_id}")
            os.makedirs(folder, exist_ok=True)
            model.save(os.path.join(folder, "model.keras"))
            return
        model.save(os.path.join(FLAGS.output_dir, "model.keras"))
        if FLAGS.export:
            export.export(model, export_dir)
        for callback in callbacks:  # the method's records, and their figures
            if getattr(callback, "history_key", None) and callback.history:
                extra[callback.history_key] = callback.history
                callback.plot(FLAGS.output_dir, [t.name for t in tasks])

    results = {**results, "selection": FLAGS.selection, "last": last,
               "task_metrics": metrics.task_metrics(tasks)}
    if reference is not None:
        results["vs_reference"] = _compare(tasks, results, reference)
    with open(os.path.join(FLAGS.output_dir, "history.json"), "w") as f:
        json.dump({"history": history, **extra}, f, default=float)
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    _print_table(tasks, results)
    print(f"\n{FLAGS.method} on {FLAGS.dataset}: {time.time() - start:.0f} s; "
          f"outputs in {FLAGS.output_dir}" + (f", export in {export_dir}" if FLAGS.export else ""))


if __name__ == "__main__":
    app.run(main)
