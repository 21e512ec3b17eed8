"""Train-step time and peak memory of MPPS against hard sharing, of
per-task weights against separate models, of Safe MTL's bi-level step, of
Maximum Roaming, of PPNet's phases and of the loss weightings and gradient
aggregators, one process.

    .venv/bin/python benchmarks/speed.py > benchmarks/speed.md   # every table
    .venv/bin/python benchmarks/speed.py per_task                 # one of them

For each setting it builds an HPS and an MPPS model on the same backbone
(MPPS with both routings of jointly labelled batches: one tiled pass, and one
forward-backward pass per task), times alternating blocks of training steps
on the same random batch (so machine noise hits all alike) and reads
TensorFlow's peak allocator memory over the steps. As a yardstick of the
hardware it also times HPS on a T x B batch: on a CPU, time does not grow
linearly with the batch, so the FLOP bound is not the whole story. Beside the measured time ratio it prints the FLOP bound of
DESIGN.md,

    B = (stem + T * suffix + heads) / (stem + suffix + heads),

with stem = everything before the first mask (run once; within a block, the
convolution and normalisation before the mask too), suffix = the rest (run on
the task-tiled batch): the FLOPs of the MPPS training forward graph over those
of HPS, counted by TensorFlow's profiler. Non-jointly labelled batches are
never tiled (B = 1).
"""

import functools
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow keeps peak-memory statistics of the CPU only with its BFC allocator.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_mtl import backbones  # noqa: E402
from tf_mtl.layers import objective_scope  # noqa: E402
from tf_mtl.methods import (  # noqa: E402
    attention_network,
    cross_stitch,
    hard_sharing,
    maximum_roaming,
    parameter_passing,
    progressive_sharing,
    safe_sharing,
    single_task,
)
from tf_mtl.layers.passing import passed_layers  # noqa: E402
from tf_mtl.model import MultiTaskModel  # noqa: E402
from tf_mtl.tasks import classification  # noqa: E402

BATCH = 128
SHAPE = (28, 28, 1)
SETTINGS = [
    # name, backbone, T, jointly labelled
    ("MultiFashion CNN (lenet, 3 sites masked)", backbones.lenet, 2, True),
    ("ResNet, last 6 convs masked", backbones.resnet, 3, True),
    ("FashionGroups CNN (lenet), non-joint", backbones.lenet, 3, False),
    ("ResNet, last 6 convs masked, non-joint", backbones.resnet, 3, False),
]
PER_TASK_SETTINGS = [
    ("lenet", backbones.lenet, 2),
    ("resnet", backbones.resnet, 3),
]


def _flops(fn, spec):
    from tensorflow.python.profiler import model_analyzer, option_builder

    graph = tf.function(fn).get_concrete_function(spec).graph
    options = option_builder.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return model_analyzer.profile(graph, options=options).total_float_ops


def flop_bound(mpps, hps):
    """B of DESIGN.md: FLOPs of the MPPS (or any routed model's) training
    forward pass over those of hard sharing. The MPPS pass tiles the batch at
    the first mask, so its FLOPs are stem + T * suffix + heads (plus the few
    of the masks)."""
    spec = tf.TensorSpec((BATCH,) + SHAPE)

    def forward(model):
        def training_pass(x):
            with objective_scope():  # the masks draw as in a training step
                return model(x, training=True)
        return _flops(training_pass, spec)

    return forward(mpps) / forward(hps)


def _batch(num_tasks, jointly, size=BATCH):
    rng = np.random.default_rng(0)
    x = rng.random((size,) + SHAPE).astype("float32")
    y = rng.integers(0, 3, size).astype("int32")
    if jointly:
        data = (x, {f"task_{t}": y for t in range(num_tasks)})
    else:
        data = (x, rng.integers(0, num_tasks, size).astype("int32"), y)
    return tf.data.Dataset.from_tensors(data).repeat()


def _trainer(model, num_tasks, jointly, size=BATCH, heldout=False, jit_compile=False,
             **objective):
    model.compile(optimizer="adam", jit_compile=jit_compile, **objective)
    if not jointly:
        model.set_task_frequencies(np.ones(num_tasks))
    model.make_train_function()
    step = model.train_function
    batches = _batch(num_tasks, jointly, size)
    if heldout:  # a bi-level model's (training, held-out) pairs
        batches = tf.data.Dataset.zip((batches, batches))
        model.build_optimizer()
    iterator = iter(batches)

    def run(steps):
        for _ in range(steps):
            logs = step(iterator)
        float(logs["loss"])  # wait for the last step

    run(3)  # trace and warm up
    return run


def _peak_memory(run, steps=5):
    tf.config.experimental.reset_memory_stats("CPU:0")
    run(steps)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"]


def _step_times(runs, blocks, steps):
    """Median seconds per step of each run, over alternating blocks of steps
    (so machine noise hits every run alike)."""
    times = {name: [] for name in runs}
    for _ in range(blocks):
        for name, run in runs.items():
            start = time.perf_counter()
            run(steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(backbone, num_tasks, jointly, blocks=7, steps=10):
    """Median step time and peak memory of each run, and B."""
    tasks = [classification(f"task_{t}", 3) for t in range(num_tasks)]
    mpps = lambda routing: progressive_sharing(
        backbone(), tasks, SHAPE, jointly, num_masked=6, routing=routing)
    hps = lambda: hard_sharing(backbone(), tasks, SHAPE, jointly)
    runs = {"hps": _trainer(hps(), num_tasks, jointly),
            "tiled": _trainer(mpps("tiled"), num_tasks, jointly)}
    bound = 1.0
    if jointly:
        bound = flop_bound(mpps("tiled"), hps())
        runs["sequential"] = _trainer(mpps("sequential"), num_tasks, jointly)
        runs["hps_tb"] = _trainer(hps(), num_tasks, jointly, num_tasks * BATCH)
    step = _step_times(runs, blocks, steps)
    memory = {name: _peak_memory(run) for name, run in runs.items()}
    return bound, step, memory


def measure_per_task(backbone, num_tasks, blocks=7, steps=10):
    """Per-task weights (DESIGN.md): the per-task twin of a backbone trained
    as one model on the T x B tiled rows, against T separate Keras models on
    B rows each (the Safe MTL reference code's way, one step each) and
    against hard sharing. Returns the FLOP bound and each run's step time."""
    tasks = [classification(f"task_{t}", 3) for t in range(num_tasks)]
    twin = MultiTaskModel(backbone(num_tasks=num_tasks), tasks, SHAPE)
    hps = hard_sharing(backbone(), tasks, SHAPE)
    # Independent models: each trains its own copy of task_0's batch.
    separate = [_trainer(single_task(backbone(), classification("task_0", 3), SHAPE),
                         1, True) for _ in tasks]
    runs = {"hps": _trainer(hps, num_tasks, True),
            "twin": _trainer(twin, num_tasks, True),
            "separate": lambda n: [run(n) for run in separate]}
    bound = flop_bound(twin, hard_sharing(backbone(), tasks, SHAPE))
    return bound, _step_times(runs, blocks, steps)


def measure_bilevel(num_tasks, blocks=7, steps=10):
    """Safe MTL's step, single-level and bi-level (first order, and second
    order through the virtual step), and the relative distance between the
    two orders' gate gradients on one batch, from the same weights."""
    tasks = [classification(f"task_{t}", 3) for t in range(num_tasks)]
    backbone = functools.partial(backbones.lenet, 1.0)
    build = lambda **kw: safe_sharing(backbone, tasks, SHAPE, seed=0, **kw)
    models = {"single": build(), "first": build(bilevel=True, virtual_learning_rate=0.0),
              "second": build(bilevel=True)}
    models["first"].set_weights(models["second"].get_weights())
    runs = {name: _trainer(model, num_tasks, True, heldout=name != "single")
            for name, model in models.items()}
    batch = next(iter(_batch(num_tasks, True)))
    gradients = []
    for name in ("first", "second"):
        model = models[name]
        gates = [g.logits for g in model.gates]
        network = [v for v in model.trainable_variables if all(v is not g for g in gates)]
        gradients.append(model._hypergradients(batch, batch, network, gates)[0])
    distance = float(tf.norm(gradients[1] - gradients[0]) / tf.norm(gradients[0]))
    return _step_times(runs, blocks, steps), distance


def measure_roaming(backbone, num_tasks, blocks=7, steps=10):
    """Maximum Roaming's step in one tiled pass and in T per-task passes
    (the paper's way: `routing="sequential"`), against HPS; and B."""
    tasks = [classification(f"task_{t}", 3) for t in range(num_tasks)]
    mr = lambda routing: maximum_roaming(backbone(), tasks, SHAPE, routing=routing)
    hps = lambda: hard_sharing(backbone(), tasks, SHAPE)
    runs = {"hps": _trainer(hps(), num_tasks, True),
            "tiled": _trainer(mr("tiled"), num_tasks, True),
            "sequential": _trainer(mr("sequential"), num_tasks, True)}
    return flop_bound(mr("tiled"), hps()), _step_times(runs, blocks, steps)


def measure_passing(backbone, num_tasks, passing, blocks=7, steps=10):
    """PPNet's step in each phase against Self-Learn's (the same per-task
    copies, no passing): self-learning computes W' = W A (A = I) and trains
    W; adjacent learning trains only A, which still needs dL/dW'."""
    tasks = [classification(f"task_{t}", 3) for t in range(num_tasks)]

    def phase(adjacent):
        model = parameter_passing(backbone, tasks, SHAPE, passing=passing)
        matrices = {id(layer.passing_matrix) for layer in passed_layers(model)}
        for variable in model.trainable_variables:  # what ParameterPassing freezes
            variable.trainable = (id(variable) in matrices) == adjacent
        return _trainer(model, num_tasks, True)

    runs = {"self_learn": _trainer(parameter_passing(backbone, tasks, SHAPE, passing=None),
                                   num_tasks, True),
            "self": phase(False), "adjacent": phase(True)}
    return _step_times(runs, blocks, steps)


PRECISION_METHODS = {
    "HPS": lambda backbone, tasks, joint: hard_sharing(backbone(), tasks, SHAPE, joint),
    "MPPS": lambda backbone, tasks, joint: progressive_sharing(backbone(), tasks, SHAPE,
                                                               joint, routing="tiled"),
    "SMTL": lambda backbone, tasks, joint: safe_sharing(backbone, tasks, SHAPE, joint),
    "MR": lambda backbone, tasks, joint: maximum_roaming(backbone(), tasks, SHAPE, joint),
    "PPNet": lambda backbone, tasks, joint: parameter_passing(backbone, tasks, SHAPE, joint),
}
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def measure_precision(build, num_tasks=2, blocks=3, steps=3):
    """A method's step (LeNet, jointly labelled) under each dtype policy, and
    in float32 compiled by XLA. (Not jointly labelled, the tasks' partitions
    change size every batch and XLA compiles again for each new size: too
    slow to time here.)"""
    tasks = [classification(f"task_{t}", 3) for t in range(num_tasks)]
    runs = {}
    for policy in POLICIES:
        keras.mixed_precision.set_dtype_policy(policy)
        try:
            runs[policy] = _trainer(build(backbones.lenet, tasks, True), num_tasks, True)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
    runs["xla"] = _trainer(build(backbones.lenet, tasks, True), num_tasks, True,
                           jit_compile=True)
    return _step_times(runs, blocks, steps)


# name: compile options of the objective (tf_mtl.weighting, tf_mtl.aggregation)
OBJECTIVES = {
    "EW": {},
    "DWA": dict(weighting="dwa"),
    "UW": dict(weighting="uw"),
    "GradNorm (parameters)": dict(weighting="gradnorm"),
    "PCGrad (parameters, loop)": dict(aggregator="pcgrad"),
    "PCGrad (parameters, vectorized)": dict(aggregator="pcgrad",
                                            per_task_gradients="vectorized"),
    "PCGrad (representation)": dict(aggregator="pcgrad", aggregate_on="representation"),
    "CAGrad (parameters)": dict(aggregator="cagrad"),
    "MGDA-UB (representation)": dict(aggregator="mgda", aggregate_on="representation"),
    "GradDrop (representation)": dict(aggregator="graddrop", aggregate_on="representation"),
    "Auto-Lambda": dict(weighting="auto_lambda"),
}
# MTL architectures trained with EW, against the same HPS step.
ARCHITECTURES = {
    "MTAN": lambda backbone, tasks: attention_network(backbone(), tasks, SHAPE),
    "Cross-stitch": lambda backbone, tasks: cross_stitch(backbone, tasks, SHAPE),
}


def measure_objectives(backbone, num_tasks, blocks=5, steps=5):
    """Each objective's step on hard sharing and on MPPS (its default,
    sequential routing), and HPS's forward pass alone."""
    tasks = [classification(f"task_{t}", 3) for t in range(num_tasks)]
    builders = {"HPS": lambda: hard_sharing(backbone(), tasks, SHAPE),
                "MPPS": lambda: progressive_sharing(backbone(), tasks, SHAPE, num_masked=6)}
    runs = {(sharing, name): _trainer(build(), num_tasks, True,
                                      heldout=options.get("weighting") == "auto_lambda",
                                      **options)
            for sharing, build in builders.items() for name, options in OBJECTIVES.items()}
    for name, build in ARCHITECTURES.items():
        runs[(name, "EW")] = _trainer(build(backbone, tasks), num_tasks, True)
    hps = builders["HPS"]()
    x = next(iter(_batch(num_tasks, True)))[0]
    forward = tf.function(lambda: hps(x, training=True))

    def run_forward(steps):
        for _ in range(steps):
            out = forward()
        float(out["task_0"][0, 0])

    run_forward(2)
    runs["forward"] = run_forward
    return _step_times(runs, blocks, steps)


def main(sections):
    keras.utils.set_random_seed(0)
    if "mpps" in sections:
        mpps_table()
    if "per_task" in sections:
        per_task_table()
    if "bilevel" in sections:
        bilevel_table()
    if "roaming" in sections:
        roaming_table()
    if "passing" in sections:
        passing_table()
    if "precision" in sections:
        precision_table()
    if "objectives" in sections:
        objectives_table()


def mpps_table():
    print(f"batch {BATCH}, {SHAPE} inputs, {os.cpu_count()} CPU cores, "
          f"TensorFlow {tf.__version__}; median of 7 blocks of 10 steps. "
          "Ratios are MPPS / HPS on the same batch; peak memory in MiB.\n")
    print("| setting | T | B (FLOPs) | HPS ms/step | MPPS tiled: time ratio "
          "(/ B) | memory ratio | MPPS sequential: time ratio (/ B) "
          "| memory ratio | HPS on T x B rows: time ratio | peak MiB HPS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, backbone, num_tasks, jointly in SETTINGS:
        bound, step, memory = measure(backbone, num_tasks, jointly)
        cells = []
        for run in ("tiled", "sequential"):
            if run in step:
                ratio = step[run] / step["hps"]
                cells += [f"{ratio:.2f} ({ratio / bound:.2f})",
                          f"{memory[run] / memory['hps']:.2f}"]
            else:
                cells += ["-", "-"]
        yardstick = (f"{step['hps_tb'] / step['hps']:.2f}" if "hps_tb" in step
                     else "-")
        print(f"| {name} | {num_tasks} | {bound:.2f} | {1e3 * step['hps']:.1f} | "
              + " | ".join(cells) + f" | {yardstick} | "
              f"{memory['hps'] / 2**20:.1f} |", flush=True)


def per_task_table():
    print("\nPer-task weights: the per-task twin of the backbone (one model, "
          "T x B tiled rows) against T separate Keras models on B rows each, "
          "one step each. Time ratios are over HPS on B rows; B is the FLOP "
          "bound of the twin over HPS.\n")
    print("| backbone | T | B (FLOPs) | HPS ms/step | twin: time ratio (/ B) "
          "| T separate models: time ratio (/ B) | twin / separate |")
    print("|---|---|---|---|---|---|---|")
    for name, backbone, num_tasks in PER_TASK_SETTINGS:
        bound, step = measure_per_task(backbone, num_tasks)
        twin, separate = step["twin"] / step["hps"], step["separate"] / step["hps"]
        print(f"| {name} | {num_tasks} | {bound:.2f} | {1e3 * step['hps']:.1f} | "
              f"{twin:.2f} ({twin / bound:.2f}) | {separate:.2f} ({separate / bound:.2f}) "
              f"| {step['twin'] / step['separate']:.2f} |", flush=True)


def bilevel_table():
    print("\nSafe MTL bi-level (section 4.4): step time over the single-level SMTL "
          "step (LeNet, width 1; the gates on a held-out batch of the same size), "
          "and ||g_2 - g_1|| / ||g_1|| of the gates' gradients, first (g_1) and "
          "second order (g_2, virtual SGD step at 1e-4), on one batch.\n")
    print("| T | SMTL ms/step | bi-level first order: time ratio | second order: "
          "time ratio | gradient distance |")
    print("|---|---|---|---|---|")
    for num_tasks in (2, 3):
        step, distance = measure_bilevel(num_tasks)
        print(f"| {num_tasks} | {1e3 * step['single']:.1f} | "
              f"{step['first'] / step['single']:.2f} | "
              f"{step['second'] / step['single']:.2f} | {distance:.1e} |", flush=True)


def roaming_table():
    print("\nMaximum Roaming (a partition at every site, p = 0.5): one tiled pass "
          "against T per-task passes (the paper's way), time ratios over HPS on B "
          "rows (/ B, the FLOP bound of the tiled pass over HPS).\n")
    print("| backbone | T | B (FLOPs) | HPS ms/step | MR tiled: time ratio (/ B) "
          "| MR, T per-task passes: time ratio (/ B) |")
    print("|---|---|---|---|---|---|")
    for name, backbone, num_tasks in PER_TASK_SETTINGS:
        bound, step = measure_roaming(backbone, num_tasks)
        cells = [f"{step[r] / step['hps']:.2f} ({step[r] / step['hps'] / bound:.2f})"
                 for r in ("tiled", "sequential")]
        print(f"| {name} | {num_tasks} | {bound:.2f} | {1e3 * step['hps']:.1f} | "
              + " | ".join(cells) + " |", flush=True)


def passing_table():
    print("\nParameter Passing Networks: the train step of each phase over "
          "Self-Learn's (the same per-task copies without passing).\n")
    print("| backbone | T | Self-Learn ms/step | layer passing: self / adjacent "
          "| channel passing: self / adjacent |")
    print("|---|---|---|---|---|")
    for name, backbone, num_tasks in PER_TASK_SETTINGS:
        cells = []
        for passing in ("layer", "channel"):
            step = measure_passing(backbone, num_tasks, passing)
            cells.append(f"{step['self'] / step['self_learn']:.2f} / "
                         f"{step['adjacent'] / step['self_learn']:.2f}")
        print(f"| {name} | {num_tasks} | {1e3 * step['self_learn']:.1f} | "
              + " | ".join(cells) + " |", flush=True)


def precision_table():
    print("\nMixed precision and XLA: each method's train step (LeNet, T = 2) over "
          "its float32 step, one run, median of 3 blocks of 3 steps (float16 is "
          "slow on this CPU).\n")
    print("| method | float32 ms/step | mixed_float16 | mixed_bfloat16 | float32, XLA |")
    print("|---|---|---|---|---|")
    for name, build in PRECISION_METHODS.items():
        step = measure_precision(build)
        print(f"| {name} | {1e3 * step['float32']:.1f} | "
              + " | ".join(f"{step[r] / step['float32']:.2f}"
                           for r in ("mixed_float16", "mixed_bfloat16", "xla"))
              + " |", flush=True)


def objectives_table():
    print("\nLoss weighting and gradient aggregation: each objective's train step "
          "over plain hard sharing's (EW on HPS), one run, median of 5 blocks of 5 "
          "steps. LibMTL's gradient methods cost T backward passes of the shared "
          "part: the bound printed per setting is HPS's step with T backward passes, "
          "`(F + T (S - F)) / S`, S its step and F its forward pass, measured.\n")
    for name, backbone, num_tasks, jointly in SETTINGS:
        if not jointly:  # the objectives' costs do not depend on the layout
            continue
        step = measure_objectives(backbone, num_tasks)
        base = step[("HPS", "EW")]
        bound = (step["forward"] + num_tasks * (base - step["forward"])) / base
        print(f"\n{name}, T = {num_tasks}: HPS {1e3 * base:.1f} ms/step, "
              f"T backward passes bound {bound:.2f}\n")
        print("| objective | HPS | MPPS |")
        print("|---|---|---|")
        for objective in OBJECTIVES:
            print(f"| {objective} | " + " | ".join(
                f"{step[(sharing, objective)] / base:.2f}" for sharing in ("HPS", "MPPS"))
                + " |", flush=True)
        for name in ARCHITECTURES:
            print(f"| {name} (EW), in place of HPS | {step[(name, 'EW')] / base:.2f} | |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["mpps", "per_task", "bilevel", "roaming", "passing", "precision",
                          "objectives"])
