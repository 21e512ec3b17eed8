"""FashionDomains: one task, Fashion-MNIST classes, in four domains.

PPNet's distributed scenario (papers/004, B.1, Tables 7-8) learns one task
on the data of several buildings, each building a "task" with data of its
own. Here the task is Fashion-MNIST's 10-way classification and the domains
are four fixed, documented transformations of the images, as different as
buildings' photographs and as learnable from each other:

- `upright`: the images as they are;
- `rotated`: turned a quarter turn counter-clockwise (`np.rot90`);
- `inverted`: photographic negatives, `1 - x`;
- `flipped`: upside down (rows reversed).

Every image belongs to one domain, drawn uniformly from the seed, so each
split holds a quarter of its images per domain (a per-domain split of the
same Fashion-MNIST split), and the domains share no image. An example is
labelled for its own domain only (not jointly labelled); each domain's task
has the 10 Fashion-MNIST classes.
"""

import numpy as np

from tf_mtl.data import fashion_mnist

TRANSFORMS = {
    "upright": lambda x: x,
    "rotated": lambda x: np.rot90(x, axes=(1, 2)),
    "inverted": lambda x: 1.0 - x,
    "flipped": lambda x: x[:, ::-1, :],
}
DOMAIN_NAMES = tuple(TRANSFORMS)
TASK_NUM_CLASSES = {name: len(fashion_mnist.CLASS_NAMES) for name in DOMAIN_NAMES}


def make_fashion_domains(images, labels, seed=0):
    """Builds FashionDomains examples from Fashion-MNIST images.

    Args:
        images: uint8 array `(N, 28, 28)`.
        labels: Fashion-MNIST classes `(N,)`.
        seed: seed of each image's domain.

    Returns:
        `(x, task_ids, y)`: float32 images in [0, 1] `(N, 28, 28, 1)`, each in
        its domain's transformation; int32 domain ids `(N,)` (indices into
        `DOMAIN_NAMES`); int32 classes `(N,)`.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError("Expected `images` of shape (N, 28, 28) and `labels` of shape (N,). "
                         f"Received {images.shape} and {labels.shape}.")
    x = fashion_mnist.scale_images(images)[..., 0]
    domains = np.random.default_rng(seed).integers(len(DOMAIN_NAMES), size=len(x))
    for index, transform in enumerate(TRANSFORMS.values()):
        rows = domains == index
        x[rows] = transform(x[rows])
    return x[..., None], domains.astype(np.int32), labels.astype(np.int32)
