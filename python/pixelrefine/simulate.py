"""A still-image simulator from ground truth that follows ``conventions.md``.

Every prediction and profile comes from the C++ core's forward model (the same templated
formulas the refinement uses), so the partiality formula stands in one place only; the
simulator adds what a refinement does not model: pixel-integrated profiles (sub-pixel
sampling), Poisson noise, reference intensities with a controlled error, masked pixels, a
module gap and the panel edge.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from . import _core
from .shoeboxes import Detector, Images, Pixels, Reflections, ShoeboxSet

__all__ = ["simulate", "reciprocal_basis", "random_rotation", "miller_indices", "LYSOZYME_CELL"]

#: Tetragonal hen egg-white lysozyme-like cell (Å, degrees).
LYSOZYME_CELL = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)

#: Value a dead or hot masked pixel holds in the simulated counts (ignored: mask = 0).
MASKED_COUNTS = 65535.0


def reciprocal_basis(cell: tuple[float, ...]) -> np.ndarray:
    """B (Å⁻¹): columns a*, b*, c* in a Cartesian frame with a along x (Busing & Levy)."""
    a, b, c, alpha, beta, gamma = cell
    al, be, ga = np.radians([alpha, beta, gamma])
    # Direct basis as columns, then B = (direct^T)^-1.
    ax = np.array([a, 0.0, 0.0])
    bx = np.array([b * np.cos(ga), b * np.sin(ga), 0.0])
    cx = c * np.cos(be)
    cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    cz = np.sqrt(c * c - cx * cx - cy * cy)
    direct = np.column_stack([ax, bx, np.array([cx, cy, cz])])
    return np.linalg.inv(direct).T


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix uniform on SO(3) (from a uniform unit quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def miller_indices(B: np.ndarray, d_min: float) -> np.ndarray:
    """All h ≠ 0 with d = 1/|B h| ≥ d_min, [K, 3] int32."""
    direct_lengths = np.linalg.norm(np.linalg.inv(B).T, axis=0)  # |a|, |b|, |c|
    limits = np.floor(direct_lengths / d_min).astype(int)
    grids = np.meshgrid(*[np.arange(-n, n + 1) for n in limits], indexing="ij")
    hkl = np.stack([g.reshape(-1) for g in grids], axis=1)
    q = hkl @ B.T
    keep = (np.einsum("ij,ij->i", q, q) <= 1.0 / d_min**2) & np.any(hkl != 0, axis=1)
    return hkl[keep].astype(np.int32)


def simulate(n_images: int = 20, *, seed: int = 0,
             cell: tuple[float, ...] = LYSOZYME_CELL, d_min: float = 2.0,
             wavelength: float = 1.3, bandwidth: float = 1e-3, polarization_fraction: float = 0.99,
             distance: float = 60.0, pixel_size: float = 0.075,
             panel_size: tuple[int, int] = (1030, 1064),
             beam_centre: tuple[float, float] = (515.3, 532.7), read_noise: float = 0.0,
             R0: float = 5e-4, eta: float = 0.0, R1: float = 1.0e-3, R1_spread: float = 0.15,
             G_range: tuple[float, float] = (0.6, 1.4), B_sigma: float = 4.0,
             background: float = 1.0, intensity_scale: float = 2000.0, wilson_B: float = 20.0,
             reference_error: float = 0.05, reference_missing: float = 0.0,
             min_partiality: float = 0.1, max_reflections: int | None = None,
             shoebox_size: int = 7, subsample: int = 8, dead_pixel_fraction: float = 0.005,
             gap_columns: tuple[int, int] | None = (700, 702),
             orientations: np.ndarray | None = None, truth_override: dict | None = None,
             keep_expected: bool = False) -> ShoeboxSet:
    """Simulate still images of one crystal form and cut shoeboxes around the predictions.

    Parameters
    ----------
    n_images : int
        Number of stills, each with its own random orientation and true G, B, R1, background.
    seed : int
        Seed of every random draw (the same seed gives the same set).
    cell, d_min
        Unit cell (Å, °) and resolution limit (Å); intensities are P1, one per h.
    wavelength, bandwidth, polarization_fraction
        Beam (Å, rms σλ/λ, fraction along lab x).
    distance, pixel_size, panel_size, beam_centre, read_noise
        One flat panel perpendicular to the beam (mm, mm, pixels (nx, ny), pixels, photons).
    R0, eta
        True partiality width (Å⁻¹) and mosaic spread (rad), shared by all images.
    R1, R1_spread
        Mean true profile width (Å⁻¹) and its relative spread (uniform ±) across images.
    G_range, B_sigma
        True G uniform in ``G_range``; true B normal with sd ``B_sigma`` (Å²).
    background
        Mean background (photons/pixel); each image's level is uniform in [0.5, 1.5]× it.
    intensity_scale, wilson_B
        Wilson statistics: I_true ~ Exponential(mean = intensity_scale·exp(−wilson_B/(2d²))).
    reference_error
        Relative error of the reference: I_ref = I_true·exp(σ z − σ²/2), z ~ N(0, 1).
    reference_missing
        Fraction of reflections written with I_ref = NaN (no reference).
    min_partiality, max_reflections
        Reflections with partiality ≥ ``min_partiality`` whose prediction falls on the panel;
        at most ``max_reflections`` per image (a random subset), if given.
    shoebox_size, subsample
        Square shoebox side (pixels), clipped by the panel edge; each pixel's expected counts
        integrate the profile on subsample × subsample points.
    dead_pixel_fraction, gap_columns
        Random masked pixels, and a masked band of columns [x0, x1) (a module gap).
    orientations : ndarray, optional
        [n_images, 3, 3] U matrices to use instead of random ones.
    truth_override : dict, optional
        Per-image truth arrays to use instead of random ones ("G", "B", "R1", "background").
    keep_expected : bool
        Also keep every pixel's expected counts in ``truth["pixels"]["expected"]`` (to redraw
        the noise without re-simulating).

    Returns
    -------
    ShoeboxSet
        With ``truth`` holding ``images`` (G, B, R1, background), ``global`` (R0, eta) and
        ``reflections`` (intensity_true, intensity_model = J_true, partiality, d).
    """
    parameters = {k: v for k, v in locals().items()
                  if k not in ("orientations", "truth_override", "keep_expected")}
    rng = np.random.default_rng(seed)
    detector = Detector.single_panel(distance, beam_centre, pixel_size, panel_size, read_noise)
    B_matrix = reciprocal_basis(cell)
    hkl_all = miller_indices(B_matrix, d_min)
    d_all = 1.0 / np.linalg.norm(hkl_all @ B_matrix.T, axis=1)
    intensity_true_all = intensity_scale * np.exp(-wilson_B / (2 * d_all**2)) * rng.exponential(size=len(hkl_all))

    U = orientations if orientations is not None else np.stack([random_rotation(rng) for _ in range(n_images)])
    images = Images(wavelength=np.full(n_images, wavelength), bandwidth=np.full(n_images, bandwidth),
                    A_matrix=U @ B_matrix, polarization_fraction=np.full(n_images, polarization_fraction))
    truth_images = {
        "G": rng.uniform(*G_range, n_images),
        "B": rng.normal(0.0, B_sigma, n_images),
        "R1": R1 * rng.uniform(1 - R1_spread, 1 + R1_spread, n_images),
        "background": background * rng.uniform(0.5, 1.5, n_images),
    }
    if truth_override:
        truth_images.update({k: np.broadcast_to(np.asarray(v, float), (n_images,)).copy()
                             for k, v in truth_override.items()})

    geometry_only = ShoeboxSet(detector, images, _no_reflections(), Pixels(np.zeros(0), np.zeros(0)))
    core = geometry_only.core()
    R0_per_image = np.full(n_images, R0)
    nx, ny = panel_size
    chosen_image, chosen_index = [], []
    for i in range(n_images):
        pred = _core.predict(core, np.full(len(hkl_all), i, np.int32), np.zeros(len(hkl_all), np.int16),
                             hkl_all, R0_per_image, eta)
        x, y = pred["xyzcal"][:, 0], pred["xyzcal"][:, 1]
        keep = np.flatnonzero((pred["hits_panel"] == 1) & (pred["partiality"] >= min_partiality)
                              & (x >= 0) & (x < nx) & (y >= 0) & (y < ny))
        if max_reflections is not None and len(keep) > max_reflections:
            keep = np.sort(rng.choice(keep, max_reflections, replace=False))
        chosen_image.append(np.full(len(keep), i, np.int32))
        chosen_index.append(keep)
    image_id = np.concatenate(chosen_image)
    index = np.concatenate(chosen_index)
    hkl = hkl_all[index]
    M = len(index)

    pred = _core.predict(core, image_id, np.zeros(M, np.int16), hkl, R0_per_image, eta,
                         G=truth_images["G"], B=truth_images["B"])
    half = shoebox_size // 2
    x0 = np.floor(pred["xyzcal"][:, 0]).astype(np.int64) - half
    y0 = np.floor(pred["xyzcal"][:, 1]).astype(np.int64) - half
    bbox = np.stack([np.clip(x0, 0, nx), np.clip(x0 + shoebox_size, 0, nx),
                     np.clip(y0, 0, ny), np.clip(y0 + shoebox_size, 0, ny)], axis=1).astype(np.int32)
    area = (bbox[:, 1] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 2])
    pixel_offset = np.concatenate([[0], np.cumsum(area)[:-1]]).astype(np.int64)

    intensity_true = intensity_true_all[index]
    intensity_ref = intensity_true * np.exp(reference_error * rng.normal(size=M) - reference_error**2 / 2)
    intensity_ref[rng.random(M) < reference_missing] = np.nan
    # Weak Wilson draws can be ~0; a reference is positive by the format's rule.
    intensity_ref = np.where(np.isnan(intensity_ref), np.nan, np.maximum(intensity_ref, 1e-6))
    reflections = Reflections(image_id=image_id, miller_index=hkl, intensity_ref=intensity_ref,
                              bbox=bbox, pixel_offset=pixel_offset)
    T = int(area.sum())
    shoeboxes = ShoeboxSet(detector, images, reflections,
                           Pixels(np.zeros(T, np.float32), np.ones(T, np.uint8)))
    profile = _core.shoebox_profiles(shoeboxes.core(), truth_images["R1"], subsample=subsample)

    amplitude = pred["scale"] * intensity_true  # J_true = G B_term p pol I_true
    pixel_image = np.repeat(image_id, area)
    expected = truth_images["background"][pixel_image] + np.repeat(amplitude, area) * profile
    counts = rng.poisson(expected).astype(np.float64)
    if read_noise > 0:
        counts += rng.normal(0.0, read_noise, T)
    mask = np.ones(T, np.uint8)
    mask[rng.random(T) < dead_pixel_fraction] = 0
    if gap_columns is not None:
        pixel_x = _pixel_columns(bbox, area)
        mask[(pixel_x >= gap_columns[0]) & (pixel_x < gap_columns[1])] = 0
    counts[mask == 0] = MASKED_COUNTS
    shoeboxes.pixels = Pixels(counts.astype(np.float32), mask)
    shoeboxes._core_set = None
    shoeboxes.truth = {
        "images": truth_images,
        "global": {"R0": np.array([R0]), "eta": np.array([eta]), "crystal_id": np.array([0], np.int32)},
        "reflections": {"intensity_true": intensity_true, "intensity_model": amplitude,
                        "partiality": pred["partiality"], "d": pred["d"],
                        "xyzcal": pred["xyzcal"]},
        "@parameters": json.dumps(_jsonable(parameters)),
    }
    if keep_expected:
        shoeboxes.truth["pixels"] = {"expected": expected}
    return shoeboxes


def _no_reflections() -> Reflections:
    empty = np.zeros(0)
    return Reflections(image_id=empty, miller_index=np.zeros((0, 3)), intensity_ref=empty,
                       bbox=np.zeros((0, 4)), pixel_offset=empty)


def _pixel_columns(bbox: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Panel x index of every stored pixel (row-major boxes)."""
    width = bbox[:, 1] - bbox[:, 0]
    start = np.repeat(np.concatenate([[0], np.cumsum(area)[:-1]]), area)
    local = np.arange(int(area.sum())) - start
    return np.repeat(bbox[:, 0], area) + local % np.repeat(width, area)


def _jsonable(parameters: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in parameters.items()}
