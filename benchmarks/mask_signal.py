"""How strong is the task signal that reaches MPPS's Phi, against the KL?

    (.venv/bin/python benchmarks/mask_signal.py 0 task; echo;
     .venv/bin/python benchmarks/mask_signal.py 0 example) > benchmarks/mask_signal.md

On `multifashion_texture` (left, right: two related item tasks; texture: an
unrelated one), an MPPS+B model (the quality budget's LeNet) is trained for
`PRETRAIN` epochs of a linear EC schedule over 6, so its target stands at EC
0.5. Then, with the network and Pi fixed, for every guest (task t, channel c)
of every mask layer:

- `exact`: d E[L_t] / d phi[t, c] = E[L_t | m = 1] - E[L_t | m = 0] (E[L_t]
  is linear in phi[t, c]), by paired forward passes that share the data and
  every other mask, on `EXACT_BATCHES` batches, for the guests of a few
  channels per layer (the check that the score-function mean is unbiased);
- `signal`, `noise`: mean and standard deviation over `PASSES` passes over
  the training batches of the per-step score-function gradient (beta = 0:
  the surrogate alone);
- `pull`: the curvature of the KL term, beta / (pi (1 - pi)), so that the
  KL holds Phi at `signal / pull` from the target (the `drift`);
- `jitter`: the spread SGD at rate `lr` gives Phi around that point,
  `lr * noise / sqrt(2 lr pull)` (a discrete Ornstein-Uhlenbeck process).

The tables compare, on the channels each task owns, the two guests: the
related item task against the unrelated texture task.
"""

import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tf_mtl import backbones, data as datasets  # noqa: E402
from tf_mtl.callbacks import ExclusiveCapacityScheduler  # noqa: E402
from tf_mtl.layers.base import objective_scope  # noqa: E402
from tf_mtl.layers.progressive_mask import ProgressiveMask  # noqa: E402
from tf_mtl.methods import progressive_sharing  # noqa: E402
from tf_mtl.tasks import classification  # noqa: E402
from tf_mtl.training import conditioned_layers  # noqa: E402

PRETRAIN, EPOCHS, PASSES, EXACT_BATCHES, EXACT_CHANNELS = 3, 6, 4, 40, 4
LIMIT, WIDTH, LR = 20000, 1.0, 0.01


def measure(seed, sample_per):
    import keras

    keras.utils.set_random_seed(seed)
    mf = datasets.load("multifashion_texture", 128, seed, limit=LIMIT)
    tasks = [classification(n, k) for n, k in mf.task_classes.items()]
    model = progressive_sharing(backbones.lenet(WIDTH), tasks, (28, 28, 1), seed=seed,
                                sample_per=sample_per, routing="tiled")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    scheduler = ExclusiveCapacityScheduler(EPOCHS, "linear", 1, 1)
    stop = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: setattr(
        model, "stop_training", epoch + 1 == PRETRAIN))
    model.fit(mf.train, epochs=EPOCHS, callbacks=[scheduler, stop], verbose=0)
    scheduler.on_epoch_begin(PRETRAIN)  # the next course's target
    masks = [l for l in conditioned_layers(model) if isinstance(l, ProgressiveMask)]
    for mask in masks:
        mask.beta = 0.0  # the score-function surrogate alone
    probs = [m.mask_probs for m in masks]

    @tf.function
    def surrogate_gradient(batch):
        with tf.GradientTape() as tape:
            loss = model._step(batch, training=True)
        return tape.gradient(loss, probs)

    batches = list(mf.train)
    grads = [[g.numpy() for g in surrogate_gradient(b)] for b in batches * PASSES]
    report = []
    for i, mask in enumerate(masks):
        g = np.stack([step[i] for step in grads])  # (steps, T, C)
        phi, pi = mask.mask_probs.numpy(), mask.target_probs.numpy()
        report.append({"name": mask.name, "phi": phi, "pi": pi,
                       "signal": g.mean(0), "noise": g.std(0),
                       "exact": exact_gradients(model, masks, mask, batches[:EXACT_BATCHES])})
    return report, len(grads)


def exact_gradients(model, masks, mask, batches):
    """E[L_t | m = 1] - E[L_t | m = 0] for the guests of the first
    `EXACT_CHANNELS` channels each task owns; NaN elsewhere."""
    phi = mask.mask_probs.numpy()
    if mask.sample_per != "task":  # the forced draw below is one mask per task
        return np.full(phi.shape, np.nan)
    owners = phi.argmax(0)
    chosen = np.concatenate([np.flatnonzero(owners == o)[:EXACT_CHANNELS]
                             for o in range(phi.shape[0])])
    forced = tf.Variable(tf.zeros(phi.shape), trainable=False)
    override = tf.Variable(tf.zeros(phi.shape, tf.bool), trainable=False)
    sample = mask._sample
    mask._sample = lambda dist: tf.where(override, forced, sample(dist))

    @tf.function
    def task_losses(batch):
        x, labels = batch
        with objective_scope():
            features, _ = model.features(x, None, True)
        preds, _ = model._heads(features, tf.repeat(tf.range(model.num_tasks),
                                                    tf.shape(x)[0]), True, tiled=True)
        return tf.stack([tf.reduce_mean(t.loss(labels[t.name], preds[t.name]))
                         for t in model.tasks])

    exact = np.full(phi.shape, np.nan)
    for c in chosen:
        for t in range(phi.shape[0]):
            if t == owners[c]:
                continue
            where = np.zeros(phi.shape, bool)
            where[t, c] = True
            override.assign(where)
            total = 0.0
            for batch in batches:
                draws = [m.draws.numpy() for m in masks]
                forced.assign(where.astype("float32"))
                on = task_losses(batch)[t]
                for m, d in zip(masks, draws):  # the paired pass draws the same masks
                    m.draws.assign(d)
                forced.assign(np.zeros(phi.shape, "float32"))
                off = task_losses(batch)[t]
                total += float(on - off)
            exact[t, c] = total / len(batches)
    override.assign(np.zeros(phi.shape, bool))
    mask._sample = sample
    return exact


def main():
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    sample_per = sys.argv[2] if len(sys.argv) > 2 else "task"
    report, steps = measure(seed, sample_per)
    tasks = ("left", "right", "texture")
    print(f"Seed {seed}; after {PRETRAIN} of {EPOCHS} epochs (linear schedule, 1 "
          f"frozen at each end), beta = 1, SGD lr {LR} on Phi; {steps} steps; one mask per {sample_per}.\n")
    print("| layer | owner | guest | phi | pi | exact dE[L]/dphi | score-function mean "
          "| its std per step | KL pull | drift = mean / pull | SGD jitter |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report:
        owners = r["phi"].argmax(0)
        for o in range(3):
            for t in range(3):
                if t == o or not (owners == o).any():
                    continue
                cols = owners == o
                phi, pi = r["phi"][t, cols], r["pi"][t, cols]
                pull = 1.0 / (pi * (1 - pi))
                mean, std = r["signal"][t, cols], r["noise"][t, cols]
                jitter = LR * std / np.sqrt(2 * LR * pull)
                exact = r["exact"][t, cols]
                exact = exact[~np.isnan(exact)]
                print(f"| {r['name']} | {tasks[o]} | {tasks[t]} | {phi.mean():.3f} | "
                      f"{pi.mean():.3f} | {exact.mean():+.4f} (n={exact.size}) | "
                      f"{mean.mean():+.4f} | {std.mean():.4f} | {pull.mean():.1f} | "
                      f"{(mean / pull).mean():+.5f} | {jitter.mean():.4f} |", flush=True)


if __name__ == "__main__":
    main()
