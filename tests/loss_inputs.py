"""Deterministic test images for the loss tests and for the stored reference values.

``tests/data/make_torch_reference.py`` computes the torch / pytorch_msssim references from these
inputs once; ``test_losses.py`` compares with the stored values (and live, when torch imports).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

REFERENCE_FILE = Path(__file__).parent / "data" / "torch_reference.json"


def make_pair(shape, seed=0, noise=0.2):
    """A model image in [0, 1] and an observed image correlated with it."""
    rng = np.random.default_rng(seed)
    model = rng.random(shape)
    observed = model + noise * rng.standard_normal(shape)
    return model, observed


def spots_image(shape, seed=0, n_spots=6):
    """Diffraction-like image: flat background of 5 counts and spots up to 1e4."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 5.0)
    for _ in range(n_spots):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        amp = 10 ** rng.uniform(1, 4)
        img += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(1, 3) ** 2))
    return img


def ramp(shape):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy + 2.0 * xx) / (shape[0] + 2.0 * shape[1])


def ms_ssim_inputs(shape):
    """A stack of three images (noise, ramp, spots) and noisy copies, for MS-SSIM."""
    rng = np.random.default_rng(11)
    a = np.stack([rng.random(shape), ramp(shape), spots_image(shape) / 1e4])
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, None)
    return a, b


def ssim_valid_inputs():
    """A stack of two 40 x 33 pairs for SSIM with the Gaussian window and valid borders."""
    return make_pair((2, 40, 33), seed=9)


def huber_inputs():
    """A 17 x 19 pair with unit noise for the pointwise losses."""
    return make_pair((17, 19), seed=2, noise=1.0)


MS_SSIM_SHAPES = [(176, 176), (192, 256), (181, 181), (200, 183)]


@lru_cache(maxsize=1)
def reference_values() -> dict:
    """The stored reference values (see ``tests/data/make_torch_reference.py``)."""
    return json.loads(REFERENCE_FILE.read_text())
