"""FashionScenes: dense prediction on scenes of Fashion-MNIST items.

NYUv2 and Cityscapes pair every pixel of an image with a class, a depth and
(NYUv2) a surface normal. FashionScenes gives the same three tasks on images
that this project can build offline: each 32x32 scene holds three
Fashion-MNIST items, halved to 14x14 and placed at random, one behind the
other.

* An item covers the pixels where its intensity is at least `SOLID`; the
  front-most item covering a pixel is visible there, and the image is its
  intensity (0 elsewhere, the background).
* `semantic` (11 classes): the visible item's Fashion-MNIST class + 1, 0 for
  the background; -1 (ignored) where no item covers the pixel but one is
  faintly there (intensity in (0, SOLID): its outline is ambiguous).
* `depth` `(32, 32, 1)`: item k of the three (0 the back one) stands at depth
  `3 - k`, and its brighter pixels come forward, by up to `RELIEF`:
  `z = 3 - k + RELIEF * (1 - intensity)`. The background has no depth (0,
  invalid, as NYUv2's missing depth).
* `normal` `(32, 32, 3)`: the unit normal of that depth surface, a pixel
  being `PIXEL` depth units wide: `n = (dz/dx, dz/dy, -PIXEL) / norm`
  with central differences, where the pixel
  and its four neighbours show the same item; invalid (0) elsewhere, as at
  the occlusion edges, where the surface has no derivative.

So the tasks share their cues (an item's outline, its class, the order of
the items) yet each needs something of its own. Every image is used once
per split: a split of N Fashion-MNIST images makes N // 3 scenes.
"""

import numpy as np

from tf_mtl.data import fashion_mnist

SIZE = 32
ITEMS = 3
ITEM_SIZE = 14
SOLID = 0.1
RELIEF = 0.5
PIXEL = 0.05
NUM_CLASSES = len(fashion_mnist.CLASS_NAMES) + 1  # the background is class 0
IGNORE_LABEL = -1


def _halve(images):
    """Averages 2x2 blocks of float images `(N, 28, 28)` into `(N, 14, 14)`."""
    n = len(images)
    return images.reshape(n, ITEM_SIZE, 2, ITEM_SIZE, 2).mean(axis=(2, 4))


def make_fashion_scenes(images, labels, seed=0):
    """Builds FashionScenes examples from Fashion-MNIST images.

    Args:
        images: uint8 array `(N, 28, 28)`; its images are taken three by
            three, in a seeded random order.
        labels: integer array `(N,)`, their classes in [0, 10).
        seed: seed of the order and the positions of the items.

    Returns:
        `(x, {"semantic": ..., "depth": ..., "normal": ...})` for
        `N // 3` scenes: float32 images `(n, 32, 32, 1)` in [0, 1], int32
        labels `(n, 32, 32)`, float32 depth `(n, 32, 32, 1)` and normals
        `(n, 32, 32, 3)`.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError("Expected `images` of shape (N, 28, 28) and `labels` of shape "
                         f"(N,). Received {images.shape} and {labels.shape}.")
    rng = np.random.default_rng(seed)
    n = len(images) // ITEMS
    order = rng.permutation(len(images))[:n * ITEMS].reshape(n, ITEMS)
    items = _halve(fashion_mnist.scale_images(images)[..., 0])
    corners = rng.integers(0, SIZE - ITEM_SIZE + 1, size=(n, ITEMS, 2))

    intensity = np.zeros((n, SIZE, SIZE), np.float32)
    item = np.full((n, SIZE, SIZE), -1, np.int32)  # which of the three is visible
    faint = np.zeros((n, SIZE, SIZE), bool)
    window = np.arange(ITEM_SIZE)
    for k in range(ITEMS):  # back to front: a later item hides an earlier one
        canvas = np.zeros((n, SIZE, SIZE), np.float32)
        rows = corners[:, k, 0, None, None] + window[None, :, None]
        cols = corners[:, k, 1, None, None] + window[None, None, :]
        canvas[np.arange(n)[:, None, None], rows, cols] = items[order[:, k]]
        solid = canvas >= SOLID
        intensity[solid], item[solid] = canvas[solid], k
        faint |= (canvas > 0) & ~solid

    visible = item >= 0
    classes = np.take_along_axis(labels[order], np.maximum(item, 0).reshape(n, -1), 1)
    semantic = np.where(visible, classes.reshape(item.shape) + 1, 0)
    semantic[~visible & faint] = IGNORE_LABEL
    depth = np.where(visible, ITEMS - item + RELIEF * (1 - intensity), 0).astype(np.float32)
    return (intensity[..., None],
            {"semantic": semantic.astype(np.int32), "depth": depth[..., None],
             "normal": _normals(depth, item)})


def _normals(depth, item):
    """Unit normals of the depth surface where a pixel and its 4 neighbours
    show the same item; 0 elsewhere."""
    padded = np.pad(item, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    same = (item >= 0)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        same &= padded[:, dy:dy + SIZE, dx:dx + SIZE] == item
    dz_dy, dz_dx = np.gradient(depth, axis=(1, 2))
    normal = np.stack([dz_dx, dz_dy, np.full_like(depth, -PIXEL)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return np.where(same[..., None], normal, 0).astype(np.float32)
