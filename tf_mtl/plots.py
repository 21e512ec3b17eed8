"""Figures of a training run, written as PNG files."""

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_capacity(records, path):
    """EC of the masks and of their target per epoch (MPPS Figure 3 style).

    `records` is `ExclusiveCapacityScheduler.history`.
    """
    epochs = [r["epoch"] + 1 for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["ec_target"] for r in records], "k--", label="target EC")
    ax.plot(epochs, [r["ec"] for r in records], "C0", lw=2, label="EC (all masks)")
    layers = [k for k in records[0] if k.startswith("ec_") and k != "ec_target"]
    for name in sorted(layers):
        ax.plot(epochs, [r[name] for r in records], lw=0.8, alpha=0.6,
                label=name[3:])
    ax.set(xlabel="epoch", ylabel="exclusive capacity", ylim=(0, 1.02),
           title="MPPS exclusive capacity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def share_proportions(mask_probs):
    """For every owner o and pair of other tasks (a, b): the mean over the
    channels o owns of phi_a / (phi_a + phi_b) (MPPS Figures 6 and 7).

    `mask_probs` is `(T, C)`. Returns `{(o, a, b): value}`.
    """
    probs = np.asarray(mask_probs)
    owners = probs.argmax(0)
    out = {}
    for owner in range(probs.shape[0]):
        owned = probs[:, owners == owner]
        others = [t for t in range(probs.shape[0]) if t != owner]
        for a, b in itertools.combinations(others, 2):
            share = owned[a] / (owned[a] + owned[b])
            out[owner, a, b] = float(share.mean()) if share.size else np.nan
    return out


def plot_share_proportions(records, task_names, path):
    """One panel per owner task: the share proportions of each mask layer
    per epoch. Only meaningful for 3 tasks or more."""
    num_tasks = len(task_names)
    if num_tasks < 3:
        raise ValueError(f"Share proportions need >= 3 tasks; got {num_tasks}.")
    epochs = [r["epoch"] + 1 for r in records]
    layers = list(records[0]["mask_probs"])
    series = [
        {layer: share_proportions(r["mask_probs"][layer]) for layer in layers}
        for r in records
    ]
    # A task that owns no channel (under full sharing argmax ties go to
    # task 0) has no proportion: its lines stop there.
    fig, axes = plt.subplots(1, num_tasks, figsize=(4 * num_tasks, 3.5),
                             sharex=True, sharey=True, squeeze=False)
    for owner, ax in enumerate(axes[0]):
        others = [t for t in range(num_tasks) if t != owner]
        for (a, b), layer in itertools.product(
            itertools.combinations(others, 2), layers
        ):
            ax.plot(epochs, [s[layer][owner, a, b] for s in series],
                    label=f"{layer}: {task_names[a]}/({task_names[a]}+{task_names[b]})")
        ax.axhline(0.5, color="k", lw=0.5, ls=":")
        ax.set(title=f"channels owned by {task_names[owner]}", xlabel="epoch",
               ylim=(0, 1))
        ax.legend(fontsize=5)
    axes[0][0].set_ylabel("share proportion")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gates(records, path):
    """Each task's Safe MTL gate a_t per epoch: 1 is the public encoder
    (hard sharing), 0 the task's private one (single-task learning).

    `records` is `GateHistory.history`.
    """
    epochs = [r["epoch"] + 1 for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in records[0]["alpha"]:
        ax.plot(epochs, [r["alpha"][name] for r in records], lw=2, label=name)
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.set(xlabel="epoch", ylabel="a_t (weight of the public encoder)",
           ylim=(-0.02, 1.02), title="Safe MTL gates")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roaming(records, path):
    """Maximum Roaming per epoch: the update ratio r(c) (eq. 6) and the mean
    overlap of the task partitions, averaged over layers.

    `records` is `MaximumRoaming.history`.
    """
    epochs = [r["epoch"] + 1 for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["update_ratio"] for r in records], lw=2, label="update ratio r(c)")
    ax.plot(epochs, [r["overlap"] for r in records], lw=2,
            label="overlap (channels two tasks share)")
    ax.set(xlabel="epoch", ylim=(-0.02, 1.02), title="Maximum Roaming")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_affinity(records, task_names, path, max_panels=6):
    """PPNet's task affinity (appendix I.2) of the last passed layer: after
    the tau-th adjacent phase, the mean over phases 1..tau of what they
    changed in the reduced passing matrix, `(1 / tau) sum (A'(tau) - I)`;
    column t is what every task passes to task t. One heat map per phase
    (at most `max_panels`, evenly spaced).

    `records` is `ParameterPassing.history`.
    """
    layer = list(records[0]["affinity"])[-1]
    changes = np.array([r["affinity"][layer] for r in records])
    means = np.cumsum(changes, axis=0) / np.arange(1, len(changes) + 1)[:, None, None]
    shown = np.unique(np.linspace(0, len(records) - 1, min(max_panels, len(records))).round()
                      .astype(int))
    bound = max(np.abs(means[shown]).max(), 1e-12)
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown) + 1, 2.8),
                             squeeze=False)
    for ax, index in zip(axes[0], shown):
        image = ax.imshow(means[index], cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_title(f"phase {index + 1} (epoch {records[index]['epoch'] + 1})", fontsize=8)
        ticks = range(len(task_names))
        ax.set_xticks(ticks, task_names, rotation=90, fontsize=7)
        ax.set_yticks(ticks, task_names, fontsize=7)
    axes[0][0].set_ylabel("passes from")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"Task affinity of {layer} (to: columns)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
