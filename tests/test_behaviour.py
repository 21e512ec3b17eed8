"""What each method does over a short real run (Fashion-MNIST subsets, a few
epochs): what its paper says happens over training, and that every task
leaves chance. Equations are tested elsewhere; these catch mechanisms that
are exact step by step and wrong over a run (a target update that handed
one task every channel; evaluation statistics no task trained with)."""

import functools
import math
import os

import keras
import numpy as np
import pytest

from tf_mtl import backbones, data, methods
from tf_mtl.callbacks import ExclusiveCapacityScheduler, GateHistory, MaximumRoaming
from tf_mtl.data.fashion_mnist import DEFAULT_DATA_DIR
from tf_mtl.layers import ChannelPartition, ProgressiveMask
from tf_mtl.tasks import classification
from tf_mtl.training import conditioned_layers

pytestmark = [
    pytest.mark.behaviour,
    pytest.mark.skipif(
        not os.path.exists(os.path.join(DEFAULT_DATA_DIR, "train-images-idx3-ubyte.gz")),
        reason="apt-get install dataset-fashion-mnist",
    ),
]

SHAPE = (28, 28, 1)
# 1536 training images, batch 64: 24 steps an epoch.
LIMIT, BATCH = 1536, 64


@pytest.fixture(scope="module")
def multifashion():
    return data.load("multifashion", batch_size=BATCH, limit=LIMIT)


@pytest.fixture(scope="module")
def fashion_groups():
    return data.load("fashion_groups", batch_size=BATCH, limit=LIMIT)


def _tasks(dataset):
    return [classification(n, k) for n, k in dataset.task_classes.items()]


def _fit(model, dataset, epochs, callbacks=(), learning_rate=2e-3):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return model.fit(dataset.train, epochs=epochs, verbose=0, callbacks=list(callbacks),
                     validation_data=dataset.validation.take(4)).history


def assert_every_task_leaves_chance(history, task_classes, epoch=0, inference=True):
    """After `epoch`, every task has left chance: its training accuracy is
    above 1.5 times chance (1/K) and, with `inference`, its validation loss
    is below chance, ln K. (The epoch's mean training loss can stay near
    ln K for a run that starts above it, L-SMTL's hard gates; validation is
    the state the epoch ends in.)"""
    for name, classes in task_classes.items():
        accuracy = history[f"{name}_accuracy"][epoch]
        assert accuracy > 1.5 / classes, (
            f"task {name!r} at chance after epoch {epoch}: training accuracy {accuracy:.3f}")
        loss = history[f"val_{name}_loss"][epoch]
        assert not inference or loss < math.log(classes) - 0.1, (
            f"task {name!r} at chance after epoch {epoch}: validation loss {loss:.4f}, "
            f"ln {classes} = {math.log(classes):.4f}")


def _owners(model):
    return [np.argmax(m.mask_probs.numpy(), 0) for m in conditioned_layers(model)
            if isinstance(m, ProgressiveMask)]


# The paper's eq. 3 and Algorithm 1 (`progressive_sharing`'s defaults), and
# train.py's defaults (Phi held on the target's EC).
HELD = {"hold_capacity": True, "beta": 0.01, "sample_per": "example",
        "mask_learning_rate": 0.05}


@pytest.mark.parametrize("name, options, ec_tolerance", [
    ("multifashion", {}, 0.02),
    # The paper's free Phi lags this short schedule on FashionGroups (EC 0.52
    # where the target is 0.01: each task's KL is weighted N_t / N ~ 1/3,
    # over 24 steps an epoch); held, it cannot.
    ("fashion_groups", HELD, 1e-4),
], ids=["multifashion-paper", "fashion_groups-held"])
def test_mpps_keeps_its_owners_through_the_exclusive_epochs(name, options, ec_tolerance,
                                                             request):
    # 2 exclusive epochs, then the linear schedule to full sharing.
    dataset = request.getfixturevalue(name)
    tasks, joint = _tasks(dataset), dataset.jointly_labelled
    model = methods.progressive_sharing(backbones.lenet(0.5), tasks, SHAPE, joint, **options)
    initial = _owners(model)
    scheduler = ExclusiveCapacityScheduler(4, "linear", frozen_start=2, frozen_end=1)
    history = _fit(model, dataset, 4, [scheduler])
    for record in scheduler.history[:2]:
        owners = [np.argmax(np.array(p), 0) for p in record["mask_probs"].values()]
        for before, after in zip(initial, owners, strict=True):
            np.testing.assert_array_equal(after, before)
    eps = 0.01
    for epoch, record in enumerate(scheduler.history):
        assert record["ec_target"] == pytest.approx(scheduler.capacity_at(epoch, eps), abs=1e-4)
        assert record["ec"] == pytest.approx(record["ec_target"], abs=ec_tolerance)
    # Inference is the fully shared backbone, whose channels each head meets
    # all at once only as sharing grows: validation in the exclusive epochs
    # measures that (0.23-0.37 accuracy on MultiFashion), not what the tasks
    # learned.
    assert_every_task_leaves_chance(history, dataset.task_classes, inference=False)
    assert_every_task_leaves_chance(history, dataset.task_classes, epoch=3)
    # In the exclusive epochs each task trains on its own channels: about
    # what a fixed disjoint partition (Task Routing at p = 1/T) reaches.
    routing = methods.maximum_roaming(backbones.lenet(0.5), tasks, SHAPE, joint,
                                      sharing_ratio=1 / len(tasks))
    disjoint = _fit(routing, dataset, 2, [MaximumRoaming(completion=0.0)])
    for task in dataset.task_classes:
        for epoch in range(2):
            assert history[f"{task}_accuracy"][epoch] > \
                disjoint[f"{task}_accuracy"][epoch] - 0.1, (task, epoch)


class _PartitionRecord(keras.callbacks.Callback):
    """The partitions and the step count after every training batch."""

    def __init__(self):
        super().__init__()
        self.steps, self.partitions = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(int(self.model.optimizer.iterations.numpy()))
        self.partitions.append([l.partition.numpy().copy() for l in conditioned_layers(
            self.model) if isinstance(l, ChannelPartition)])


@pytest.mark.parametrize("completion", [1.0, 0.0], ids=["mr", "tr"])
def test_roaming_partitions_change_only_at_update_steps(multifashion, completion,
                                                        own_inference_results):
    model = methods.maximum_roaming(backbones.lenet(0.5), _tasks(multifashion), SHAPE,
                                    sharing_ratio=0.5)
    initial = [l.partition.numpy().copy() for l in model.conditioned_layers]
    record = _PartitionRecord()
    history = _fit(model, multifashion, 2, [MaximumRoaming(0.25, completion), record])
    interval = round(0.25 * 24)
    before = initial
    for step, partitions in zip(record.steps, record.partitions):
        changed = any((a != b).any() for a, b in zip(before, partitions))
        # Definition 1: one swap per task and layer at each update, never between.
        assert changed == (completion > 0 and step % interval == 0), step
        for a, b in zip(before, partitions):
            assert (a != b).sum() <= 2 * a.shape[0]
            np.testing.assert_array_equal(a.sum(1), b.sum(1))  # p * C channels each
        before = partitions
    assert_every_task_leaves_chance(history, multifashion.task_classes)
    test = multifashion.test.take(4)
    evaluated = model.evaluate(test, return_dict=True, verbose=0)
    for key, value in own_inference_results(model, test).items():
        assert evaluated[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("lite, after", [(False, False), (True, False), (False, True)],
                         ids=["smtl", "lsmtl", "smtl_c"])
def test_safe_mtl_gates_move_and_every_task_learns(multifashion, lite, after):
    tasks = _tasks(multifashion)
    model = methods.safe_sharing(functools.partial(backbones.lenet, 0.5), tasks, SHAPE,
                                 lite=lite, gates_after_decoders=after)
    gates = GateHistory([t.name for t in tasks])
    history = _fit(model, multifashion, 2, [gates])
    for name in multifashion.task_classes:
        alphas = [0.5] + [record["alpha"][name] for record in gates.history]
        assert abs(alphas[-1] - alphas[0]) > 1e-3, (name, alphas)
    assert_every_task_leaves_chance(history, multifashion.task_classes)


@pytest.mark.parametrize("build", [
    lambda tasks: methods.hard_sharing(backbones.lenet(0.5), tasks, SHAPE),
    lambda tasks: methods.attention_network(backbones.lenet(0.5), tasks, SHAPE),
    lambda tasks: methods.cross_stitch(functools.partial(backbones.lenet, 0.5), tasks, SHAPE),
    lambda tasks: methods.parameter_passing(functools.partial(backbones.lenet, 0.5), tasks,
                                            SHAPE, passing=None),
], ids=["hps", "mtan", "cross_stitch", "self_learn"])
def test_every_task_leaves_chance(multifashion, build):
    history = _fit(build(_tasks(multifashion)), multifashion, 1)
    assert_every_task_leaves_chance(history, multifashion.task_classes)


def test_single_task_runs_leave_chance(multifashion):
    for index, task in enumerate(_tasks(multifashion)):
        view = lambda split: methods.task_view(split, index, task.name, True)
        model = methods.single_task(backbones.lenet(0.5), task, SHAPE)
        model.compile(optimizer=keras.optimizers.Adam(2e-3))
        history = model.fit(view(multifashion.train), epochs=1, verbose=0,
                            validation_data=view(multifashion.validation.take(4))).history
        assert_every_task_leaves_chance(history, {task.name: task.classes})
