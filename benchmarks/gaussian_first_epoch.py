"""The paper's Gaussian mask over the first epochs (issue 22): why it trains
at chance while the exclusive initialisation holds.

    .venv/bin/python benchmarks/gaussian_first_epoch.py

One seed, MultiFashion (6,000 images), LeNet, Adam 1e-3, batch 128; 2
epochs, the first exclusive (EC 1 - eps), the second fully shared. Prints,
per mask distribution, the running mean of `left`'s loss after steps 1, 5,
20 and 47 of the first epoch, and each epoch's training accuracy.
"""

import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tf_mtl import backbones, data, methods  # noqa: E402
from tf_mtl.callbacks import ExclusiveCapacityScheduler  # noqa: E402
from tf_mtl.tasks import classification  # noqa: E402


class _FirstEpochLoss(keras.callbacks.Callback):
    """`left`'s running mean loss after every step of the first epoch."""

    def __init__(self):
        super().__init__()
        self.losses, self.epoch = [], 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 0:
            self.losses.append(float(logs["left_loss"]))


def main():
    multifashion = data.load("multifashion", batch_size=128, limit=6000)
    tasks = [classification(n, k) for n, k in multifashion.task_classes.items()]
    print("| distribution | loss after steps 1, 5, 20, 47 | train accuracy, epochs 1 and 2 |")
    print("|---|---|---|")
    for distribution in ("gaussian", "gaussian_matched", "bernoulli"):
        keras.utils.set_random_seed(0)
        model = methods.progressive_sharing(backbones.lenet(), tasks, (28, 28, 1),
                                            distribution=distribution)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        running = _FirstEpochLoss()
        history = model.fit(multifashion.train, epochs=2, verbose=0, callbacks=[
            ExclusiveCapacityScheduler(2, "linear", frozen_start=1), running]).history
        losses = [round(running.losses[i], 1) for i in (0, 4, 19, 46)]
        print(f"| {distribution} | {losses} | {np.round(history['left_accuracy'], 3).tolist()} |")


if __name__ == "__main__":
    main()
