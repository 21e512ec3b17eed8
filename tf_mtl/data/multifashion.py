"""MultiFashion: two overlapping Fashion-MNIST items per image, two tasks.

Sener & Koltun (2018, "Multi-Task Learning as Multi-Objective Optimization")
built MultiMNIST by putting one digit at the top-left and another at the
bottom-right of a 36x36 canvas, where they overlap, then resizing the canvas
to 28x28. Task "left" classifies the top-left item and task "right" the
bottom-right one, so both tasks share every input but need different
features. MultiFashion applies the same procedure to Fashion-MNIST items,
which are harder to tell apart than digits. Every image carries a label for
both tasks (the dataset is jointly labelled).
"""

import numpy as np
import tensorflow as tf

from tf_mtl.data import fashion_mnist

TASK_NAMES = ("left", "right")

# Both tasks classify Fashion-MNIST items.
TASK_NUM_CLASSES = {name: len(fashion_mnist.CLASS_NAMES) for name in TASK_NAMES}

IMAGE_SIZE = 28

# The bottom-right item starts at (OFFSET, OFFSET) of a square canvas of side
# IMAGE_SIZE + OFFSET = 36, the top-left one at (0, 0).
OFFSET = 8


def make_multifashion(images, labels, seed=0):
    """Builds MultiFashion examples from Fashion-MNIST images.

    Each base image `i` is paired with a partner `j != i` drawn uniformly
    among the other base images. Image `i` goes to the top-left and image `j`
    to the bottom-right of a 36x36 canvas; where they overlap, the brighter
    pixel wins. The canvas is resized to 28x28 with bilinear interpolation.

    Args:
        images: uint8 array of shape `(N, 28, 28)`, with N >= 2.
        labels: Integer array of shape `(N,)`, the classes of `images`.
        seed: Seed of the partner draw, anything `np.random.default_rng`
            accepts. The same seed gives the same examples.

    Returns:
        `(x, {"left": y_left, "right": y_right})`: float32 images in [0, 1]
        of shape `(N, 28, 28, 1)`, and int32 labels of shape `(N,)`:
        `y_left[i]` is the class of image `i` and `y_right[i]` the class of
        its partner.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"Expected `images` of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}). "
            f"Received shape {images.shape}."
        )
    if len(images) < 2 or labels.shape != images.shape[:1]:
        raise ValueError(
            "Expected at least 2 `images` and one label per image in "
            f"`labels`. Received {len(images)} images and `labels` of shape "
            f"{labels.shape}."
        )
    count = len(images)
    partners = np.random.default_rng(seed).integers(count - 1, size=count)
    partners += partners >= np.arange(count)  # Skips the image itself.

    canvas_size = IMAGE_SIZE + OFFSET
    canvas = np.zeros((count, canvas_size, canvas_size), np.uint8)
    canvas[:, :IMAGE_SIZE, :IMAGE_SIZE] = images
    canvas[:, OFFSET:, OFFSET:] = np.maximum(
        canvas[:, OFFSET:, OFFSET:], images[partners]
    )
    x = tf.image.resize(
        fashion_mnist.scale_images(canvas),
        (IMAGE_SIZE, IMAGE_SIZE),
        method="bilinear",
    )
    return x.numpy(), {
        "left": labels.astype(np.int32),
        "right": labels[partners].astype(np.int32),
    }
