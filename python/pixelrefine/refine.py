"""Refinement of still images: ``ShoeboxSet`` → C++ core → ``Results``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from . import _core
from .shoeboxes import ShoeboxSet

__all__ = ["Results", "refine", "refine_options", "STATUS", "FLAGS", "evaluate_image",
           "model_counts"]

#: /images/status codes.
STATUS = {
    0: "converged",
    1: "not converged: the reweighting did not settle within max_outer solves",
    2: "not refined: too few usable reflections (or no starting R1)",
    3: "solver failure (Ceres failure or a non-finite parameter)",
    4: "converged with a parameter on its bound (sigmas unreliable)",
    5: "converged, singular covariance (sigmas NaN)",
}

#: /reflections/flags bits.
FLAGS = {
    1: "no_reference",
    2: "too_few_valid_pixels",
    4: "panel_edge",
    8: "outlier",
    16: "few_background_pixels",
    32: "weak_shape",
    64: "image_not_refined",
    128: "bad_prediction",
}

IMAGE_FLOAT = ("G", "G_sigma", "B", "B_sigma", "R1", "R1_sigma", "detector_shift",
               "detector_shift_sigma", "cost")
IMAGE_INT = ("status", "n_iterations", "n_reflections")
REFLECTION_FLOAT = ("intensity_prf", "intensity_prf_sigma", "intensity_scaled",
                    "intensity_scaled_sigma", "partiality", "excitation_error", "d", "m2_obs",
                    "background")
PARAMETER_NAMES = ("G", "B", "R1", "rotation_x", "rotation_y", "rotation_z", "detector_shift")


@dataclass
class Results:
    """Refined per-image parameters, per-crystal widths and per-reflection intensities.

    Attributes
    ----------
    images : dict of str to ndarray
        One row per image: G, B, R1, rotation [N, 3], detector_shift, each with a ``_sigma``
        twin, status, n_iterations, cost, n_reflections, covariance [N, k, k].
    crystals : dict of str to ndarray
        ``/global``: crystal_id, R0, R0_sigma (NaN: R0 was given, not refined).
    reflections : dict of str to ndarray
        One row per input reflection, same order (see ``shoebox-hdf5.md``).
    parameter_names : list of str
        Names of the covariance's rows.
    objective, options, input_file, package_version
        Provenance written as root attributes.
    """

    images: dict[str, np.ndarray]
    crystals: dict[str, np.ndarray]
    reflections: dict[str, np.ndarray]
    parameter_names: list[str]
    objective: str
    options: dict[str, Any] = field(default_factory=dict)
    input_file: str | None = None
    package_version: str = ""

    @classmethod
    def allocate(cls, n_images: int, n_reflections: int, n_params: int, **meta: Any) -> "Results":
        images = {name: np.full(n_images, np.nan) for name in IMAGE_FLOAT}
        images.update({name: np.zeros(n_images, np.int32) for name in IMAGE_INT})
        images["rotation"] = np.full((n_images, 3), np.nan)
        images["rotation_sigma"] = np.full((n_images, 3), np.nan)
        images["covariance"] = np.full((n_images, n_params, n_params), np.nan)
        reflections = {name: np.full(n_reflections, np.nan) for name in REFLECTION_FLOAT}
        reflections["xyzcal"] = np.full((n_reflections, 2), np.nan)
        reflections["xyzobs"] = np.full((n_reflections, 2), np.nan)
        reflections["flags"] = np.zeros(n_reflections, np.int32)
        return cls(images=images, crystals={}, reflections=reflections,
                   parameter_names=list(PARAMETER_NAMES[:n_params]), **meta)

    @property
    def n_images(self) -> int:
        return len(self.images["G"])

    def correlation(self, a: str, b: str) -> np.ndarray:
        """Per-image correlation coefficient of parameters ``a`` and ``b`` from the covariance."""
        i, j = self.parameter_names.index(a), self.parameter_names.index(b)
        cov = self.images["covariance"]
        return cov[:, i, j] / np.sqrt(cov[:, i, i] * cov[:, j, j])


def refine_options(**options: Any) -> "_core.RefineOptions":
    """A core options object from keywords; unknown names raise ``TypeError``."""
    core = _core.RefineOptions()
    known = {name for name in dir(core) if not name.startswith("_")}
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"unknown refinement option {name!r}; known: {sorted(known)}")
        setattr(core, name, value)
    return core


def _options_dict(core: "_core.RefineOptions") -> dict[str, Any]:
    out = {}
    for name in dir(core):
        if name.startswith("_"):
            continue
        value = getattr(core, name)
        if isinstance(value, float) and math.isinf(value):
            value = "inf"
        out[name] = value
    return out


def _r0_per_crystal(shoeboxes: ShoeboxSet, R0: float | Mapping[int, float] | np.ndarray) -> np.ndarray:
    ids, _ = shoeboxes.crystal_index
    if isinstance(R0, Mapping):
        missing = [int(c) for c in ids if int(c) not in R0]
        if missing:
            raise ValueError(f"R0 has no value for crystal_id {missing[:5]}")
        return np.array([float(R0[int(c)]) for c in ids])
    values = np.atleast_1d(np.asarray(R0, dtype=np.float64))
    if values.size == 1:
        return np.full(len(ids), values[0])
    if values.size != len(ids):
        raise ValueError(f"R0 has {values.size} values for {len(ids)} crystals")
    return values


def refine(shoeboxes: ShoeboxSet, *, R0: float | Mapping[int, float] | np.ndarray,
           objective: str = "factored", n_threads: int = 1, progress: bool = False,
           chunk_size: int | None = None, **options: Any) -> Results:
    """Refine every image of a shoebox set.

    Parameters
    ----------
    shoeboxes : ShoeboxSet
        Input; validated by the core before anything is solved.
    R0 : float, mapping or array
        Radial (partiality) width in Å⁻¹, per crystal: one value for all, a mapping
        crystal_id → R0, or one value per distinct crystal_id in ascending order. Given, not
        refined (``/global/R0_sigma`` is NaN).
    objective : {"factored", "pixel"}
        The factored per-reflection likelihood, or the per-pixel baseline.
    n_threads : int
        Images are refined in parallel on this many threads (the GIL is released).
    progress : bool
        Show a progress bar (tqdm) over images.
    chunk_size : int, optional
        Images per call into the core (default: 64 per thread); progress updates per chunk.
    **options
        Any field of ``_core.RefineOptions`` (see METHODS.md), e.g. ``sigma_G``,
        ``reference_sigma_rel``, ``refine_geometry``, ``loss``.

    Returns
    -------
    Results
    """
    from . import __version__

    core_set = shoeboxes.core()
    ids, _ = shoeboxes.crystal_index
    r0 = _r0_per_crystal(shoeboxes, R0)
    opts = refine_options(objective=objective, R0=[float(v) for v in r0], **options)
    n_params = 7 if opts.refine_geometry else 3
    results = Results.allocate(shoeboxes.n_images, shoeboxes.n_reflections, n_params,
                               objective=objective, options=_options_dict(opts),
                               input_file=shoeboxes.source, package_version=__version__)
    results.crystals = {"crystal_id": ids, "R0": r0, "R0_sigma": np.full(len(ids), np.nan)}
    core_results = {**results.images, **results.reflections}
    n = shoeboxes.n_images
    chunk = chunk_size or 64 * max(1, n_threads)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, unit="image", desc=f"refine ({objective})")
    try:
        for first in range(0, n, chunk):
            last = min(n, first + chunk)
            _core.refine_images(core_set, opts, first, last, n_threads, core_results)
            if bar is not None:
                bar.update(last - first)
    finally:
        if bar is not None:
            bar.close()
    return results


def evaluate_image(shoeboxes: ShoeboxSet, image: int, *, R0: float, G: float, B: float, R1: float,
                   rotation=(0.0, 0.0, 0.0), detector_shift: float = 0.0,
                   weights_at: dict[str, Any] | None = None, objective: str = "factored",
                   **options: Any) -> dict[str, np.ndarray]:
    """Residuals and autodiff Jacobian of one image's problem at given parameters.

    Weights, sigmas, background and statistics are evaluated at ``weights_at`` (a dict with
    any of G, B, R1, rotation, detector_shift overriding the values; default: the values
    themselves), as at the start of a solve. Returns ``residuals``, ``jacobian`` (columns G,
    B, R1[, rotation, shift]), ``term`` (1 intensity, 2 shape, 3 position, 4 pixel, 5 prior),
    ``row`` (reflection row, -1 for a prior), ``intensity_prf`` (J of each reflection of
    the image, at the weights) and ``cost`` (Ceres's ½ Σ ρ(r²), loss functions applied).
    """
    r0 = _r0_per_crystal(shoeboxes, R0)
    opts = refine_options(objective=objective, R0=[float(v) for v in r0], **options)
    values = dict(G=G, B=B, R1=R1, rotation=rotation, detector_shift=detector_shift)
    held = {**values, **(weights_at or {})}

    def flat(p: dict[str, Any]) -> list[float]:
        return [float(p["G"]), float(p["B"]), float(p["R1"]), *map(float, p["rotation"]),
                float(p["detector_shift"])]

    out = _core.evaluate_image(shoeboxes.core(), opts, image, flat(values), flat(held))
    return {k: np.asarray(v) for k, v in out.items()}


def model_counts(shoeboxes: ShoeboxSet, results: Results, *, n_threads: int = 1
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The refinement's model of every shoebox pixel: expected counts and model variance.

    mu_p = Bg + A P_p with A = G B_term p pol I_ref (the fitted J where there is no reference
    or the image was not scaled) and v_p = max(Bg, 0) + A P_p + sigma_read^2, at the refined
    per-image parameters of ``results`` and with its options; NaN where not integrated.

    Returns
    -------
    mu, variance : ndarray, shape (T,)
    """
    options = {k: (float("inf") if v == "inf" else v) for k, v in results.options.items()}
    options["R0"] = [float(v) for v in results.crystals["R0"]]
    opts = refine_options(**options)
    im = results.images
    mu, variance = _core.model_counts(
        shoeboxes.core(), opts, np.ascontiguousarray(im["G"], np.float64),
        np.ascontiguousarray(im["B"], np.float64), np.ascontiguousarray(im["R1"], np.float64),
        np.ascontiguousarray(im["rotation"], np.float64),
        np.ascontiguousarray(im["detector_shift"], np.float64), n_threads)
    return np.asarray(mu), np.asarray(variance)
