"""MultiFashion plus an unrelated task: which frequency band a texture has.

Safe MTL (papers/002) exists for negative sharing: a task that shares no
structure with the others can make hard sharing worse than single-task
learning. MultiFashion's two tasks are related (both classify Fashion-MNIST
items, at two places of one image), so this dataset adds a third task that
is not: every MultiFashion image carries an additive noise texture, and task
`"texture"` says which of `NUM_BANDS` rings of spatial frequency the noise
was drawn from.

Why it is unrelated to the other two tasks:

- its label is drawn independently of the items' classes, and its noise is
  fresh per image: nothing about the items predicts it, and nothing about
  it predicts the items;
- it is solved by frequency-selective filters spread over the whole image
  (a texture statistic), where the item tasks need shape features at two
  places; a shared encoder has to spend channels on both;
- for the item tasks the texture is pure nuisance, present alike for every
  method (single-task models see the same images).

The noise of band k is white Gaussian noise filtered to radial frequencies
in `[edges[k], edges[k + 1])` cycles per pixel (`BAND_EDGES`), scaled to a
standard deviation of `amplitude` and added without clipping. The default,
0.06 of the [0, 1] pixel range, makes the texture hard enough to need a
share of the encoder: a single-task LeNet (width 0.5, 3 epochs on 10,000
images) reaches 61% test accuracy at 0.05, 82% at 0.08 and 100% at 0.15.
"""

import numpy as np

from tf_mtl.data import multifashion

TASK_NAMES = ("left", "right", "texture")

# Rings of radial frequency (cycles per pixel) of the texture classes.
BAND_EDGES = (0.05, 0.16, 0.27, 0.38, 0.5)
NUM_BANDS = len(BAND_EDGES) - 1

TASK_NUM_CLASSES = {**multifashion.TASK_NUM_CLASSES, "texture": NUM_BANDS}

DEFAULT_AMPLITUDE = 0.06


def band_masks(size=multifashion.IMAGE_SIZE, edges=BAND_EDGES):
    """The Fourier masks of the bands, `(K, size, size)` booleans."""
    frequencies = np.fft.fftfreq(size)
    radius = np.hypot(*np.meshgrid(frequencies, frequencies, indexing="ij"))
    return np.stack([(radius >= lo) & (radius < hi) for lo, hi in zip(edges, edges[1:])])


def band_noise(bands, seed=0, size=multifashion.IMAGE_SIZE, chunk=4096):
    """One texture per entry of `bands` (band indices, `(N,)`): unit-variance
    noise of that band, float32 `(N, size, size)`.

    Filtered `chunk` images at a time (the float64 spectra of a whole
    training split would take gigabytes); consecutive draws are one draw,
    so `chunk` does not change the result."""
    bands = np.asarray(bands)
    rng = np.random.default_rng(seed)
    # The masks are radial, so symmetric in frequency: a real FFT suffices.
    masks = band_masks(size)[..., :size // 2 + 1]
    noise = np.empty((len(bands), size, size), np.float32)
    for start in range(0, len(bands), chunk):
        rows = bands[start:start + chunk]
        white = rng.standard_normal((len(rows), size, size))
        filtered = np.fft.irfft2(np.fft.rfft2(white) * masks[rows], s=(size, size))
        noise[start:start + chunk] = filtered / filtered.std(axis=(1, 2), keepdims=True)
    return noise


def make_multifashion_texture(images, labels, seed=0, amplitude=DEFAULT_AMPLITUDE):
    """MultiFashion examples (`multifashion.make_multifashion`) with a
    texture of a random band added to each.

    Args:
        images, labels: Fashion-MNIST images `(N, 28, 28)` and classes.
        seed: seed of the partners, the bands and the noise.
        amplitude: standard deviation of the texture, in pixel units.

    Returns:
        `(x, {"left": ..., "right": ..., "texture": band})`: float32 images
        `(N, 28, 28, 1)` (MultiFashion in [0, 1] plus the texture), int32
        labels `(N,)` each.
    """
    if not amplitude >= 0:
        raise ValueError(f"`amplitude` must be >= 0. Received: amplitude={amplitude}")
    partner_seed, band_seed, noise_seed = np.random.default_rng(seed).integers(2**63, size=3)
    x, y = multifashion.make_multifashion(images, labels, partner_seed)
    bands = np.random.default_rng(band_seed).integers(NUM_BANDS, size=len(x))
    x = x + amplitude * band_noise(bands, noise_seed)[..., None]
    return x.astype(np.float32), {**y, "texture": bands.astype(np.int32)}
