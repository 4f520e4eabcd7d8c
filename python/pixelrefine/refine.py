"""Refinement of still images: ``ShoeboxSet`` → C++ core → ``Results``.

Two levels (METHODS.md §I.12): the core refines every image on its own at given per-crystal
values (R0, the error model, the tail of the profile); this module's loop sums the images'
contributions to each crystal's values (a reduction, so that it can run across processes),
takes a Newton step on them and refines the images again from where they stopped, until the
per-crystal values settle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from . import _core
from .shoeboxes import ShoeboxSet

__all__ = ["Results", "refine", "refine_options", "STATUS", "FLAGS", "evaluate_image",
           "model_counts", "CrystalModel"]

#: /images/status codes.
STATUS = {
    0: "converged",
    1: "not converged: the reweighting did not settle within max_outer solves",
    2: "not scaled: too few usable reflections with a reference (G, B NaN)",
    3: "solver failure (Ceres failure or a non-finite parameter)",
    4: "converged with a parameter on its bound (sigmas unreliable)",
    5: "converged, singular covariance (sigmas NaN)",
    6: "no reference: profile refined and every spot integrated, not scaled (G, B NaN)",
    7: "implausible profile: spot width outside [spot_sd_min, half the box] pixels",
    8: "poor fit: pooled pixel chi^2 per degree of freedom above chi2_max",
    9: "reference contradicted: the crystal's reference error f reached REFERENCE_ERROR_MAX "
       "or its intensities' rank correlation with I_ref is below REFERENCE_AGREEMENT_MIN, "
       "or more than half of the image's reflections with a reference are outliers against "
       "the scale found (G, B and intensity_scaled rest on a minority)",
}

#: The reference error (relative) from which a crystal's reference is taken to say nothing.
REFERENCE_ERROR_MAX = 1.0
#: Spearman's correlation of intensity_scaled with I_ref below which it says nothing either.
REFERENCE_AGREEMENT_MIN = 0.2

#: /reflections/flags bits.
FLAGS = {
    1: "no_reference",
    2: "too_few_valid_pixels",
    4: "panel_edge",
    8: "outlier",
    16: "pixel_outliers",
    32: "no_shape",
    64: "image_not_scaled",
    128: "bad_prediction",
    256: "profile_outside_box",
    512: "low_partiality",
    1024: "plane_background",
    2048: "poor_fit",
    4096: "neighbour_modelled",
}

# (dtype, columns): 0 a vector, n a [rows, n] array, -1 the [N, k, k] covariance. Names and
# shapes are those of the core's result arrays (cpp/bindings.cpp kResultFields).
IMAGE_FIELDS = {
    "G": ("f8", 0), "G_sigma": ("f8", 0), "B": ("f8", 0), "B_sigma": ("f8", 0),
    "R1": ("f8", 0), "R1_sigma": ("f8", 0), "R1_tensor": ("f8", 3), "shape": ("f8", 5),
    "rotation": ("f8", 3), "rotation_sigma": ("f8", 3), "detector_shift": ("f8", 0),
    "detector_shift_sigma": ("f8", 0), "status": ("i4", 0), "n_iterations": ("i4", 0),
    "n_outer": ("i4", 0), "cost": ("f8", 0), "n_reflections": ("i4", 0),
    "n_integrated": ("i4", 0), "chi2_pixel": ("f8", 0), "chi2_intensity": ("f8", 0),
    "chi2_shape": ("f8", 0), "chi2_position": ("f8", 0), "position_sigma": ("f8", 0),
    "spot_sd": ("f8", 0), "covariance": ("f8", -1),
    "R0_gradient": ("f8", 0), "R0_curvature": ("f8", 0), "tail_gradient": ("f8", 2),
    "tail_curvature": ("f8", 3), "background_residual_sq": ("f8", 0),
    "background_dof": ("f8", 0), "background_poisson": ("f8", 0), "background_read": ("f8", 0),
}
REFLECTION_FIELDS = {
    "intensity_prf": ("f8", 0), "intensity_prf_sigma": ("f8", 0),
    "intensity_scaled": ("f8", 0), "intensity_scaled_sigma": ("f8", 0),
    "intensity_model": ("f8", 0), "intensity_count_sigma": ("f8", 0),
    "partiality": ("f8", 0), "excitation_error": ("f8", 0), "d": ("f8", 0),
    "xyzcal": ("f8", 2), "xyzobs": ("f8", 2), "m2_obs": ("f8", 0), "background": ("f8", 0),
    "background_plane": ("f8", 3), "centre_offset": ("f8", 2), "profile_fraction": ("f8", 0),
    "chi2_pixel_reflection": ("f8", 0), "flags": ("i4", 0),
}
#: The images' contributions to the global step: internal, not written to results files.
GLOBAL_CONTRIBUTIONS = ("R0_gradient", "R0_curvature", "tail_gradient", "tail_curvature",
                        "background_residual_sq", "background_dof", "background_poisson",
                        "background_read")


@dataclass
class Results:
    """Refined per-image parameters, per-crystal values and per-reflection intensities.

    Attributes
    ----------
    images : dict of str to ndarray
        One row per image (``IMAGE_FIELDS``): G, B, R1 (R1_tensor [N, 3] = Σ11, Σ12, Σ22),
        rotation [N, 3], detector_shift, each with a ``_sigma`` twin, status, iteration counts,
        cost, n_reflections, the pooled χ² of the pixels and of each term, covariance [N, k, k].
    crystals : dict of str to ndarray
        ``/global``, one row per crystal: crystal_id, R0, R0_sigma, eta, error_scale,
        reference_error, tail_fraction(_sigma), tail_scale(_sigma).
    reflections : dict of str to ndarray
        One row per input reflection, same order (``REFLECTION_FIELDS``).
    parameter_names : list of str
        Names of the covariance's rows.
    objective, options, input_file, package_version
        Provenance written as root attributes; ``options`` holds the final options, the
        profile model chosen and the global loop's history.
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
    def allocate(cls, n_images: int, n_reflections: int, parameter_names: list[str],
                 **meta: Any) -> "Results":
        """NaN-filled (integer fields zero) arrays of every field, ready for the core."""
        k = len(parameter_names)

        def make(spec: tuple[str, int], rows: int) -> np.ndarray:
            dtype, columns = spec
            shape = (rows,) if columns == 0 else (rows, k, k) if columns < 0 else (rows, columns)
            return np.zeros(shape, np.int32) if dtype == "i4" else np.full(shape, np.nan)

        images = {name: make(spec, n_images) for name, spec in IMAGE_FIELDS.items()}
        reflections = {name: make(spec, n_reflections) for name, spec in REFLECTION_FIELDS.items()}
        return cls(images=images, crystals={}, reflections=reflections,
                   parameter_names=list(parameter_names), **meta)

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
        try:
            setattr(core, name, value)
        except TypeError:
            raise TypeError(f"refinement option {name!r}: {value!r} has the wrong type") from None
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


def _per_crystal(shoeboxes: ShoeboxSet, value, name: str) -> np.ndarray | None:
    """One value per distinct crystal_id (ascending) from a scalar, mapping or sequence."""
    if value is None:
        return None
    ids, _ = shoeboxes.crystal_index
    if isinstance(value, Mapping):
        missing = [int(c) for c in ids if int(c) not in value]
        if missing:
            raise ValueError(f"{name} has no value for crystal_id {missing[:5]}")
        return np.array([float(value[int(c)]) for c in ids])
    values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if values.size == 1:
        return np.full(len(ids), values[0])
    if values.size != len(ids):
        raise ValueError(f"{name} has {values.size} values for {len(ids)} crystals")
    return values


@dataclass
class CrystalModel:
    """The per-crystal values the images share (``/global``), one entry per crystal."""

    crystal_id: np.ndarray
    R0: np.ndarray
    R0_sigma: np.ndarray
    eta: np.ndarray
    error_scale: np.ndarray
    reference_error: np.ndarray
    reference_error_sigma: np.ndarray
    tail_fraction: np.ndarray
    tail_fraction_sigma: np.ndarray
    tail_scale: np.ndarray
    tail_scale_sigma: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(getattr(self, name)) for name in self.__dataclass_fields__}

    def core_options(self) -> dict[str, list[float]]:
        return {"R0": list(map(float, self.R0)), "eta": list(map(float, self.eta)),
                "error_scale": list(map(float, self.error_scale)),
                "reference_error": list(map(float, self.reference_error)),
                "tail_fraction": list(map(float, self.tail_fraction)),
                "tail_scale": list(map(float, self.tail_scale)),
                "R0_sigma": list(map(float, np.nan_to_num(self.R0_sigma)))}


def initial_R0(shoeboxes: ShoeboxSet) -> np.ndarray:
    """Starting R0 per crystal from the spread of the excitation errors of the reflections the
    pipeline chose: for points spread evenly through a shell where p > 0.1, rms(ε_r) ≈ 0.87·R0.
    """
    ids, index = shoeboxes.crystal_index
    refl = shoeboxes.reflections
    pred = _core.predict(shoeboxes.core(), refl.image_id, refl.panel, refl.miller_index,
                         np.zeros(shoeboxes.n_images))
    eps = pred["excitation_error"]
    crystal = index[refl.image_id]
    out = np.empty(len(ids))
    for c in range(len(ids)):
        e = eps[(crystal == c) & np.isfinite(eps)]
        out[c] = 1.15 * np.sqrt(np.mean(e * e)) if e.size else 5e-4
    return np.where(out > 0, out, 5e-4)


def refine(shoeboxes: ShoeboxSet, *, R0: float | Mapping[int, float] | np.ndarray | None = None,
           objective: str = "factored", profile: str = "auto", eta: Any = 0.0,
           R0_prior: tuple[float, float] | None = None, error_scale: Any = None,
           reference_error: Any = None, error_model: str = "gain",
           tail: tuple[Any, Any] | None = None,
           max_global: int = 10, n_threads: int = 1,
           progress: bool = False, chunk_size: int | None = None, **options: Any) -> Results:
    """Refine every image of a shoebox set, and the per-crystal values they share.

    Parameters
    ----------
    shoeboxes : ShoeboxSet
        Input; validated by the core before anything is solved.
    R0 : float, mapping or array, optional
        Radial (partiality) width in Å⁻¹ per crystal (one value, a mapping crystal_id → R0,
        or one value per distinct crystal_id in ascending order). Given: held fixed. None
        (default): refined per crystal by the two-level fit (factored objective only).
    objective : {"factored", "pixel"}
        The factored per-reflection likelihood, or the per-pixel baseline.
    profile : {"auto", "isotropic", "anisotropic", "tail"}
        The spot's profile model; "auto" chooses by the data (METHODS.md §I.4): a heavy tail
        where its fraction is significant, an anisotropic tensor where the images' anisotropy
        is, else the isotropic Gaussian.
    eta : float, mapping or array
        Mosaic spread (rad) per crystal, given (default 0).
    R0_prior : (mean, sd), optional
        Gaussian prior on R0 (Å⁻¹) for every crystal.
    error_scale, reference_error : float, mapping or array, optional
        The error model's σ inflation k and the reference's relative error f per crystal;
        given: held; None (default): estimated from the data (METHODS.md §I.10).
    error_model : {"gain", "scale"}
        How k enters the pixels' variance: "gain" (default), counts that are k² × photons,
        v = k²(Bg + J·P) + k⁴σ_read² (the read noise in photons, as the file gives it);
        "scale", every sigma times k, v = k²(Bg + J·P + σ_read²). The same without read noise.
    tail : (fraction, scale), optional
        The heavy tail's fraction t and width s per crystal (each a float, mapping or array)
        for profile "tail", held; None (default): refined per crystal (factored objective).
        The per-pixel objective cannot refine them: with "auto" it chooses between the
        isotropic and the anisotropic Gaussian only, unless ``tail`` is given.
    max_global : int
        At most this many rounds of the global loop.
    n_threads : int
        Images are refined in parallel on this many threads (the GIL is released).
    progress : bool
        Show a progress bar (tqdm) over images.
    chunk_size : int, optional
        Images per call into the core (default: 64 per thread); progress updates per chunk.
    **options
        Any field of ``_core.RefineOptions`` (METHODS.md §I.13), e.g. ``sigma_G``,
        ``refine_geometry`` (default: on for the factored objective), ``background``, ``loss``.

    Returns
    -------
    Results
        Checked on the way out (``validation.check_results``): nothing that is not finite
        without a status or flag that explains it.

    Raises
    ------
    ValueError
        For an invalid set (naming its source, the dataset and the first bad row) or option.
    TypeError
        For an unknown option or one of the wrong type.
    validation.ResultsCheckError
        For a result the checks find unexplained (an internal error: please report).
    """
    from . import __version__

    for name in ("R0", "eta", "error_scale", "reference_error", "tail_fraction", "tail_scale",
                 "profile", "objective"):
        if name in options:
            raise TypeError(f"pass {name} as refine()'s own argument")
    if "read_variance_scale" in options:
        raise TypeError("read_variance_scale is set by error_model and k; choose error_model "
                        "('gain' or 'scale') and, to hold k, error_scale")
    if error_model not in ("gain", "scale"):
        raise ValueError(f"error_model must be 'gain' or 'scale', not {error_model!r}")
    if profile not in ("auto", "isotropic", "anisotropic", "tail"):
        raise ValueError(f"profile must be 'auto', 'isotropic', 'anisotropic' or 'tail', not {profile!r}")
    if not isinstance(shoeboxes, ShoeboxSet):
        raise TypeError(f"shoeboxes must be a ShoeboxSet, not {type(shoeboxes).__name__}")
    if not (isinstance(max_global, int) and max_global >= 1):
        raise ValueError("max_global must be an integer >= 1")
    if not (isinstance(n_threads, (int, np.integer)) and 1 <= n_threads <= 4096):
        raise ValueError(f"n_threads must be an integer in [1, 4096], not {n_threads!r}")
    n_threads = int(n_threads)
    if R0_prior is not None and not (np.isfinite(R0_prior[0]) and R0_prior[1] > 0):
        raise ValueError("R0_prior must be (finite mean, sd > 0)")
    shoeboxes.core()
    # Term 3 (rotation, detector shift) is part of the default factored fit: a stored
    # orientation off by a fraction of a mrad puts every partiality wrong (METHODS.md §I.9).
    options.setdefault("refine_geometry", objective == "factored")
    ids, index = shoeboxes.crystal_index
    given_R0 = _per_crystal(shoeboxes, R0, "R0")
    if objective == "pixel" and given_R0 is None:
        raise ValueError("the per-pixel objective needs R0 given (the two-level R0 fit uses the "
                         "factored objective's terms)")
    if given_R0 is not None and not np.all(np.isfinite(given_R0) & (given_R0 >= 0)):
        raise ValueError("R0 must be finite and >= 0")
    n = len(ids)
    given_tail = None if tail is None else (_per_crystal(shoeboxes, tail[0], "tail fraction"),
                                            _per_crystal(shoeboxes, tail[1], "tail scale"))
    if given_tail is not None and not (np.all((given_tail[0] >= 0) & (given_tail[0] < 1))
                                       and np.all(given_tail[1] > 1)):
        raise ValueError("tail must be (fraction in [0, 1), scale > 1)")
    if objective == "pixel" and profile == "auto" and given_tail is None:
        profile = "auto-gaussian"
    given_k = _per_crystal(shoeboxes, error_scale, "error_scale")
    given_f = _per_crystal(shoeboxes, reference_error, "reference_error")
    crystals = CrystalModel(
        crystal_id=ids, R0=given_R0 if given_R0 is not None else initial_R0(shoeboxes),
        R0_sigma=np.full(n, np.nan), eta=_per_crystal(shoeboxes, eta, "eta"),
        error_scale=given_k if given_k is not None else np.ones(n),
        reference_error=given_f if given_f is not None else np.full(n, 0.1),
        reference_error_sigma=np.full(n, np.nan),
        tail_fraction=(given_tail[0] if given_tail is not None
                       else np.full(n, 0.05 if profile in ("auto", "tail") else 0.0)),
        tail_fraction_sigma=np.full(n, np.nan),
        tail_scale=given_tail[1] if given_tail is not None else np.full(n, 3.0),
        tail_scale_sigma=np.full(n, np.nan))
    loop = _GlobalLoop(shoeboxes, objective, options, crystals, n_threads, progress, chunk_size,
                       refine_R0=given_R0 is None, refine_k=given_k is None,
                       refine_f=given_f is None and objective == "factored",
                       refine_tail=given_tail is None and objective == "factored",
                       R0_prior=R0_prior, error_model=error_model)
    results = loop.run(profile, max_global)
    results.package_version = __version__
    from .validation import check_results
    check_results(results, shoeboxes.reflections.image_id)
    return results


def reference_error_gaussian(squared_residual: np.ndarray, counting_variance: np.ndarray,
                             squared_intensity: np.ndarray, *, start: float = 0.1,
                             trim: float = 6.0, max_f: float = 2.0) -> tuple[float, float]:
    """f by maximum likelihood with e ~ N(0, k²σ_J² + f²J²) over the residuals within ``trim``
    sd (re-decided as f moves): Newton in f². Returns f and the Fisher information of f² (NaN,
    f = ``start``, where nothing is informative). Arguments as ``reference_error_mixture``."""
    e2, v0, m2 = squared_residual, counting_variance, squared_intensity
    f2, fisher = max(start, 1e-3) ** 2, np.nan
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(100):
            s2 = v0 + f2 * m2
            keep = e2 < trim * trim * s2
            step = _f2_newton_step(e2, s2, m2, f2, keep.astype(float), keep, max_f)
            if step is None:
                return max(start, 0.0), np.nan  # no residual left inside the trim: f held
            new, fisher = step
            settled = abs(new - f2) <= 1e-10 + 1e-7 * f2
            f2 = new
            if settled:
                break
    return min(math.sqrt(f2), max_f), float(fisher)


def _f2_newton_step(e2: np.ndarray, s2: np.ndarray, m2: np.ndarray, f2: float,
                    weight: np.ndarray, keep: np.ndarray, max_f: float) -> tuple[float, float] | None:
    """One Newton step in f² on Σ_kept weight·[−½ log s² − ½ e²/s²] (s² = k²σ_J² + f²J²):
    the new f² (within [0, max_f²]) and the Fisher information; None where it is not
    informative."""
    ratio = m2[keep] / s2[keep]
    grad = 0.5 * np.sum(weight[keep] * ratio * (e2[keep] / s2[keep] - 1.0))
    fisher = 0.5 * np.sum(weight[keep] * ratio * ratio)
    if not (np.isfinite(grad) and np.isfinite(fisher) and fisher > 0):
        return None
    return min(max(f2 + grad / fisher, 0.0), max_f * max_f), float(fisher)


def _mixture_log_terms(e2: np.ndarray, v0: np.ndarray, m2: np.ndarray, f2: float,
                       wrong: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log[(1 − π) N(e; s²)] and log[π N(e; b²)] per reflection (up to −½ log 2π), and s²."""
    s2 = v0 + f2 * m2
    b2 = v0 + max(4.0, 25.0 * f2) * m2
    log_right = np.log1p(-wrong) - 0.5 * (np.log(s2) + e2 / s2)
    log_wrong = math.log(wrong) - 0.5 * (np.log(b2) + e2 / b2)
    return log_right, log_wrong, s2


#: The smallest tail fraction the "auto" profile keeps (with t > 3 sigma_t): on spots that fill
#: 7x7 boxes with no tail at all (``filling``, 100 stills) the tail model's t comes out at
#: 0.011 +- 0.003 (0.006 before the cell correction), 0 on the same spots without noise, so a
#: statistical bias of t where the tail is nearly collinear with the box's background, not a
#: tail; kept, it made J +0.44 % high through the tail extrapolated beyond the box
#: (METHODS.md §I.4).
MIN_TAIL_FRACTION = 0.02

#: The images' stopping tolerance (in units of each parameter's sigma) in the global rounds
#: before the last: their per-crystal values still move, so converging the images to the full
#: `outer_tolerance` there is wasted. Once the per-crystal steps settle, one round more at the
#: full tolerance gives the results written (METHODS.md §I.12).
EARLY_OUTER_TOLERANCE = 0.5

#: 2Δlog L per reflection above which the mixture replaces the single Gaussian.
MIXTURE_GAIN_PER_REFLECTION = 0.04


def reference_error_fit(squared_residual: np.ndarray, counting_variance: np.ndarray,
                        squared_intensity: np.ndarray, *, start: float = 0.1,
                        trim: float = 6.0) -> tuple[float, float, float]:
    """f, its Fisher information and the fraction π of the reference taken for wrong: the
    mixture (``reference_error_mixture``) where it explains the residuals better than the
    single Gaussian (``reference_error_gaussian``) by more than MIXTURE_GAIN_PER_REFLECTION
    in 2 log L per reflection, else the Gaussian's, π = 0. Measured (20 stills each, nothing
    given): a 30 % lognormal reference error alone gains 0.017 (the mixture would take the
    lognormal's skewed tail for wrong and f 8 % low); 5 % of the reference replaced by
    Wilson draws 0.066, 20 % 0.77."""
    e2, v0, m2 = squared_residual, counting_variance, squared_intensity
    f_single, fisher_single = reference_error_gaussian(e2, v0, m2, start=start, trim=trim)
    f_mix, fisher_mix, wrong = reference_error_mixture(e2, v0, m2, start=start, trim=trim)
    if not (np.isfinite(fisher_single) and np.isfinite(fisher_mix)):
        return f_single, fisher_single, 0.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s2 = v0 + f_single**2 * m2
        keep = e2 < trim * trim * s2
        single = np.sum(-0.5 * (np.log(s2) + e2 / s2)[keep])
        log_right, log_wrong, _ = _mixture_log_terms(e2, v0, m2, f_mix**2, wrong)
        mixture = np.sum(np.logaddexp(log_right, log_wrong)[keep])
    if np.isfinite(mixture) and 2.0 * (mixture - single) > MIXTURE_GAIN_PER_REFLECTION * keep.sum():
        return f_mix, fisher_mix, wrong
    return f_single, fisher_single, 0.0


def reference_error_mixture(squared_residual: np.ndarray, counting_variance: np.ndarray,
                            squared_intensity: np.ndarray, *, start: float = 0.1,
                            trim: float = 6.0, max_f: float = 2.0) -> tuple[float, float, float]:
    """The reference's relative error f from intensity residuals, a wrong part of the
    reference allowed for.

    Residuals e (J − J_model) within ``trim`` sd are modelled as the mixture
    (1 − π) N(0, s²) + π N(0, b²), s² = k²σ_J² + f²J², b² = k²σ_J² + max(4, 25 f²) J²: the
    reference's error, and reflections whose reference is wrong (another crystal's, a
    misindexed or permuted entry: off by a factor, not by f). EM: the responsibilities, then one
    Newton step in f² on the weighted log-likelihood and π their mean, to convergence. A
    trimmed single-Gaussian fit absorbs the wrong part into f and, f grown, keeps it (20 %
    of a reference replaced by Wilson draws: f 0.31 for 0.05, G −13 % at status 0).

    Parameters
    ----------
    squared_residual, counting_variance, squared_intensity : ndarray
        e², k²σ_J² and (J² − k²σ_J²)₊ per reflection, in any per-reflection unit.
    start : float
        Starting f.
    trim, max_f : float
        Residuals beyond ``trim`` s are left out (Term 1's outliers); f at most ``max_f``.

    Returns
    -------
    f, fisher, wrong : float
        The estimate, the Fisher information of f² (NaN where nothing is informative: f is
        then ``start``) and π, the fraction of the reference taken for wrong (at most 0.5).
    """
    e2, v0, m2 = squared_residual, counting_variance, squared_intensity
    f2, wrong, fisher = max(start, 1e-3) ** 2, 0.05, np.nan
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        for _ in range(200):
            log_right, log_wrong, s2 = _mixture_log_terms(e2, v0, m2, f2, wrong)
            keep = e2 < trim * trim * s2
            r = np.where(keep, 1.0 / (1.0 + np.exp(np.clip(log_wrong - log_right, -700, 700))), 0.0)
            step = _f2_newton_step(e2, s2, m2, f2, r, keep, max_f)
            if step is None:
                return max(start, 0.0), np.nan, np.nan  # nothing informative: f held
            new, fisher = step
            new_wrong = float(np.clip(1.0 - np.sum(r[keep]) / max(keep.sum(), 1), 1e-4, 0.5))
            settled = abs(new - f2) <= 1e-10 + 1e-7 * f2 and abs(new_wrong - wrong) <= 1e-6
            f2, wrong = new, new_wrong
            if settled:
                break
    return min(math.sqrt(f2), max_f), float(fisher), wrong


class _GlobalLoop:
    """The two-level fit: rounds of per-image refinements at the held per-crystal values, each
    followed by the per-crystal steps from the images' summed contributions."""

    def __init__(self, shoeboxes, objective, options, crystals, n_threads, progress, chunk_size,
                 *, refine_R0, refine_k, refine_f, refine_tail, R0_prior, error_model):
        self.shoeboxes = shoeboxes
        self.objective = objective
        self.options = dict(options)
        self.crystals = crystals
        self.n_threads = n_threads
        self.progress = progress
        self.chunk = chunk_size or 64 * max(1, n_threads)
        self.refine_R0, self.refine_k, self.refine_f = refine_R0, refine_k, refine_f
        self.refine_tail = refine_tail
        self.R0_prior = R0_prior
        self.error_model = error_model
        self.G_prior = None
        # Per crystal (tt, ts, ss): the refined tail's covariance, propagated into each image's
        # parameters and intensity_scaled (zero while the tail is given or absent).
        self.tail_covariance = np.zeros((len(crystals.R0), 3))
        _, self.image_crystal = shoeboxes.crystal_index
        self.reflection_crystal = self.image_crystal[shoeboxes.reflections.image_id]
        self.history: list[dict[str, Any]] = []

    def core_options(self, profile: str, final: bool = True) -> "_core.RefineOptions":
        """The core's options for a round of the image fits; `final` False: a round before the
        last, the images converged only to EARLY_OUTER_TOLERANCE."""
        options = dict(self.options)
        if not final:
            tolerance = float(options.get("outer_tolerance", _core.RefineOptions().outer_tolerance))
            options["outer_tolerance"] = max(tolerance, EARLY_OUTER_TOLERANCE)
        if self.G_prior is not None and "G_prior" not in options:
            options["G_prior"] = list(map(float, self.G_prior))
        if self.error_model == "gain":
            options["read_variance_scale"] = list(map(float, self.crystals.error_scale ** 2))
        if profile == "tail" and self.refine_tail and "tail_covariance" not in options:
            options["tail_covariance"] = list(map(float, self.tail_covariance.ravel()))
        return refine_options(objective=self.objective, profile=profile,
                              **self.crystals.core_options(), **options)

    def scale_found(self, results: Results) -> None:
        """The centre of the G prior (when sigma_G is finite and no G_prior is given): each
        crystal's median G of its scaled images after the first round — the prior is relative
        to the scale the data show, whatever the units of I_ref, not to 1."""
        if not np.isfinite(float(self.options.get("sigma_G", np.inf))) or "G_prior" in self.options:
            return
        G = results.images["G"]
        self.G_prior = np.array([np.nanmedian(G[self.image_crystal == c])
                                 if np.isfinite(G[self.image_crystal == c]).any() else 0.0
                                 for c in range(len(self.crystals.R0))])

    def refine_images(self, opts, results: Results, label: str) -> None:
        n = self.shoeboxes.n_images
        arrays = {**results.images, **results.reflections}
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n, unit="image", desc=label, leave=False)
        try:
            for first in range(0, n, self.chunk):
                last = min(n, first + self.chunk)
                _core.refine_images(self.shoeboxes.core(), opts, first, last, self.n_threads, arrays)
                if bar is not None:
                    bar.update(last - first)
        finally:
            if bar is not None:
                bar.close()

    def allocate(self, opts, previous: Results | None) -> Results:
        """Result arrays for these options; a previous round's state is the warm start."""
        names = list(_core.covariance_names(opts))
        results = Results.allocate(self.shoeboxes.n_images, self.shoeboxes.n_reflections, names,
                                   objective=self.objective, input_file=self.shoeboxes.source)
        if previous is not None:
            for group in ("images", "reflections"):
                for name, value in getattr(previous, group).items():
                    target = getattr(results, group)[name]
                    if target.shape == value.shape:
                        target[...] = value
        return results

    def run(self, profile: str, max_global: int) -> Results:
        # "auto" starts from the richest model it can refine and simplifies (choose_profile);
        # "auto-gaussian" (the per-pixel objective) starts from the anisotropic Gaussian.
        model = {"auto": "tail", "auto-gaussian": "anisotropic"}.get(profile, profile)
        results = None
        settling = False  # the per-crystal steps settled after a round at the early tolerance
        for round_ in range(1, max_global + 1):
            final = settling or round_ == max_global
            opts = self.core_options(model, final=final)
            results = self.allocate(opts, results)
            self.refine_images(opts, results, f"refine ({self.objective}, round {round_})")
            first_prior = self.G_prior is None
            self.scale_found(results)
            changes = self.step(results, model)
            if first_prior and self.G_prior is not None:
                changes["settled"] = False  # the prior is on from the next round
            self.history.append({"round": round_, "profile": model,
                                 "outer_tolerance": opts.outer_tolerance, **changes})
            chosen = self.choose_profile(results, profile, model, round_)
            if chosen != model:  # the per-crystal values are near settled by then
                model = chosen
                settling = True
                continue
            if changes["settled"]:
                if final:
                    break
                settling = True
        self.finish(results, model)
        return results

    # --- the per-crystal steps --------------------------------------------------------
    def step(self, results: Results, model: str) -> dict[str, Any]:
        c = self.crystals
        before = {"R0": c.R0.copy(), "k": c.error_scale.copy(), "f": c.reference_error.copy(),
                  "t": c.tail_fraction.copy(), "s": c.tail_scale.copy()}
        if self.refine_k:
            c.error_scale = self.error_scale(results)
        if self.refine_f:
            c.reference_error, c.reference_error_sigma = self.reference_error(results)
        r0_step = self.R0_step(results)
        tail_step = (self.tail_step(results) if model == "tail" and self.refine_tail
                     else np.zeros((len(c.R0), 2)))
        settled = bool(
            np.all(np.abs(r0_step) <= np.fmax(1e-4, 0.02 * c.R0_sigma / np.maximum(c.R0, 1e-30)))
            and np.all(np.abs(c.error_scale - before["k"]) <= 2e-3 * before["k"])
            and np.all(np.abs(c.reference_error - before["f"]) <= 2e-3)
            and np.all(np.abs(tail_step[:, 0]) <= 2e-3) and np.all(np.abs(tail_step[:, 1]) <= 1e-2))
        return {"settled": settled, "R0": before["R0"].tolist(), "error_scale": before["k"].tolist(),
                "reference_error": before["f"].tolist(), "tail_fraction": before["t"].tolist(),
                "tail_scale": before["s"].tolist()}

    def crystal_sum(self, values: np.ndarray, per_image: bool = True) -> np.ndarray:
        index = self.image_crystal if per_image else self.reflection_crystal
        n = len(self.crystals.R0)
        values = np.nan_to_num(np.asarray(values, float))
        if values.ndim == 1:
            return np.bincount(index, values, n)
        return np.stack([np.bincount(index, values[:, j], n) for j in range(values.shape[1])], 1)

    def error_scale(self, results: Results) -> np.ndarray:
        """k per crystal from the background-dominated pixels at the held weights (METHODS.md
        §I.10), a ratio of sums: E = Σe², their variance's Poisson part A = Σ(1 − h)(v − ρσ²)
        and read-noise part R = Σ(1 − h)ρσ² at the held read scale ρ = k_held². "scale":
        k² = E/(A + R). "gain": k² = g, the root of g·A + g²·R/k_held² = E, the expected E of
        counts that are g × photons (variance g·μ + g²σ_read²); without read noise (R = 0) the
        two are the same."""
        e2 = self.crystal_sum(results.images["background_residual_sq"])
        dof = self.crystal_sum(results.images["background_dof"])
        poisson = self.crystal_sum(results.images["background_poisson"])   # A
        read_share = self.crystal_sum(results.images["background_read"])   # R
        g = e2 / np.maximum(poisson + read_share, 1e-300)
        if self.error_model == "gain":
            read = read_share / self.crystals.error_scale ** 2                # R / k_held²
            root = poisson + np.sqrt(poisson ** 2 + 4.0 * read * e2)
            g = np.where(read > 0, 2.0 * e2 / np.maximum(root, 1e-300), g)
        k = np.sqrt(np.where(dof > 50, g, 1.0))
        return np.clip(k, 0.3, 30.0)

    def reference_error(self, results: Results) -> tuple[np.ndarray, np.ndarray]:
        """f per crystal by maximum likelihood on the intensity residuals J − J_model
        (``reference_error_fit``). The reference's share is scaled by the measured J
        (less its counting variance), not by J_model = G·K·I_ref: I_ref's own error in the
        variance would bias f (for a lognormal error of 30 % by +15 %), and f² must be the
        variance of the reference's relative error for the scale's bias correction
        (METHODS.md §I.10)."""
        refl = results.reflections
        J, Jm, sc = refl["intensity_prf"], refl["intensity_model"], refl["intensity_count_sigma"]
        trim = float(self.options.get("outlier_sigma", 6.0)) or np.inf
        f_out = self.crystals.reference_error.copy()
        f_sigma = np.full(len(f_out), np.nan)
        for c in range(len(f_out)):
            ok = (self.reflection_crystal == c) & np.isfinite(J) & np.isfinite(Jm) & np.isfinite(sc)
            ok &= sc > 0
            if ok.sum() < 10:
                continue
            # Each reflection in units of its largest of |J|, |J_model| and kσ_J: every term
            # below is a ratio of its squares, and none overflows.
            k_sc = self.crystals.error_scale[c] * sc[ok]
            unit = np.maximum(np.maximum(np.abs(J[ok]), np.abs(Jm[ok])), k_sc)
            e2 = ((J[ok] - Jm[ok]) / unit) ** 2
            v0 = (k_sc / unit) ** 2
            m2 = np.maximum((J[ok] / unit) ** 2 - v0, 0.0)
            f, fisher, _ = reference_error_fit(e2, v0, m2, start=f_out[c], trim=trim)
            f_out[c] = f
            f_sigma[c] = (1.0 / math.sqrt(fisher) / (2 * max(f, 1e-6))
                          if np.isfinite(fisher) and fisher > 0 else np.nan)
        return f_out, f_sigma

    def R0_step(self, results: Results) -> np.ndarray:
        """Newton step on log R0 per crystal from the images' reduced gradients and
        curvatures (their Schur complements), with the optional prior."""
        c = self.crystals
        g = self.crystal_sum(results.images["R0_gradient"])
        H = self.crystal_sum(results.images["R0_curvature"])
        if self.R0_prior is not None:
            mean, sd = self.R0_prior
            g = g + c.R0 * (c.R0 - mean) / sd**2
            H = H + (c.R0 / sd) ** 2
        ok = H > 0
        c.R0_sigma = np.where(ok, c.R0 / np.sqrt(np.where(ok, H, 1.0)), np.nan)
        if not self.refine_R0:
            c.R0_sigma = np.full(len(c.R0), np.nan)
            return np.zeros(len(c.R0))
        step = np.where(ok, np.clip(-g / np.where(ok, H, 1.0), -0.7, 0.7), 0.0)
        c.R0 = c.R0 * np.exp(step)
        return step

    def tail_scale_limit(self, results: Results) -> np.ndarray:
        """The widest tail a crystal's boxes can tell from their background: its scale s times
        the core's sd no more than the boxes' median half-side (a wider tail is flat over the
        box, the background's double), within [1.5, 20]."""
        half = 0.5 * np.median(self.shoeboxes.reflections.shoebox_shape, axis=1)
        sd = results.images["spot_sd"]
        limits = np.full(len(self.crystals.R0), 20.0)
        for c in range(len(limits)):
            images = np.flatnonzero(self.image_crystal == c)
            rows = np.isin(self.shoeboxes.reflections.image_id, images)
            core = np.nanmedian(sd[images]) if np.isfinite(sd[images]).any() else np.nan
            if rows.any() and np.isfinite(core) and core > 0:
                limits[c] = np.clip(np.median(half[rows]) / core, 1.5, 20.0)
        return limits

    def tail_step(self, results: Results) -> np.ndarray:
        """Newton step on the tail's (t, s) per crystal, within t ∈ [0, 0.9] and s between 1.2
        and ``tail_scale_limit`` (steps clipped at 0.2 and 1.5)."""
        c = self.crystals
        g = self.crystal_sum(results.images["tail_gradient"])
        h = self.crystal_sum(results.images["tail_curvature"])
        steps = np.zeros((len(c.R0), 2))
        widest = self.tail_scale_limit(results)
        for i in range(len(c.R0)):
            H = np.array([[h[i, 0], h[i, 1]], [h[i, 1], h[i, 2]]])
            if not (H[0, 0] > 0):
                continue
            if H[1, 1] > 1e-12 * H[0, 0] and np.linalg.det(H) > 1e-12 * H[0, 0] * H[1, 1]:
                step = -np.linalg.solve(H, g[i])
                cov = np.linalg.inv(H)
            else:  # s is not identified (t near 0): t alone
                step = np.array([-g[i, 0] / H[0, 0], 0.0])
                cov = np.array([[1.0 / H[0, 0], 0.0], [0.0, np.nan]])
            step = np.clip(step, [-0.2, -1.5], [0.2, 1.5])
            t_new = float(np.clip(c.tail_fraction[i] + step[0], 0.0, 0.9))
            s_new = float(np.clip(c.tail_scale[i] + step[1], 1.2, widest[i]))
            steps[i] = [t_new - c.tail_fraction[i], s_new - c.tail_scale[i]]
            c.tail_fraction[i], c.tail_scale[i] = t_new, s_new
            c.tail_fraction_sigma[i] = math.sqrt(cov[0, 0])
            c.tail_scale_sigma[i] = math.sqrt(cov[1, 1]) if np.isfinite(cov[1, 1]) else np.nan
            self.tail_covariance[i] = np.nan_to_num([cov[0, 0], cov[0, 1], cov[1, 1]])
        return steps

    def choose_profile(self, results: Results, requested: str, model: str, round_: int) -> str:
        """'auto': after three rounds of the tail model, keep the tail where its fraction is
        at least 3 sigma from 0 and at least MIN_TAIL_FRACTION in some crystal; then keep the
        anisotropy where the images' summed Wald statistic of (a, c) rejects isotropy
        (p < 1e-3), else isotropic."""
        if requested not in ("auto", "auto-gaussian") or model == "isotropic":
            return model
        if model == "tail":
            if round_ < 3 or not self.refine_tail:
                return model
            t, sigma = self.crystals.tail_fraction, self.crystals.tail_fraction_sigma
            if np.any((t > 3 * np.nan_to_num(sigma, nan=np.inf)) & (t >= MIN_TAIL_FRACTION)):
                return model
            self.crystals.tail_fraction[:] = 0.0
            model = "anisotropic"
        return model if self.anisotropy_significant(results) else "isotropic"

    def anisotropy_significant(self, results: Results) -> bool:
        from scipy.stats import chi2

        names = results.parameter_names
        if "anisotropy_a" not in names:
            return False
        a, c = names.index("anisotropy_a"), names.index("anisotropy_c")
        shape = results.images["shape"]
        cov = results.images["covariance"]
        total, dof = 0.0, 0
        for i in range(results.n_images):
            C = cov[i][np.ix_([a, c], [a, c])]
            v = shape[i, 1:3]
            if not (np.all(np.isfinite(C)) and np.all(np.isfinite(v))):
                continue
            try:
                total += float(v @ np.linalg.solve(C, v))
            except np.linalg.LinAlgError:
                continue
            dof += 2
        return dof > 0 and chi2.sf(total, dof) < 1e-3

    def reference_agreement(self, results: Results) -> np.ndarray:
        """Per crystal, Spearman's rank correlation of intensity_scaled with I_ref over the
        clearly measured reflections (J > 3 σ, I_ref > 0; NaN with fewer than 20): what the
        reference says about these intensities beyond the partiality, polarisation and B
        factor every model shares (a permuted reference: ≈ 0)."""
        from scipy.stats import spearmanr

        refl = results.reflections
        reference = self.shoeboxes.reflections.intensity_ref
        scaled = refl["intensity_scaled"]
        clear = (np.isfinite(scaled) & np.isfinite(reference) & (reference > 0)
                 & (refl["intensity_prf"] > 3.0 * refl["intensity_prf_sigma"]))
        agreement = np.full(len(self.crystals.R0), np.nan)
        for c in range(len(agreement)):
            rows = clear & (self.reflection_crystal == c)
            if rows.sum() >= 20:
                agreement[c] = float(spearmanr(scaled[rows], reference[rows]).statistic)
        return agreement

    def flag_uninformative_reference(self, results: Results) -> None:
        """Status 9 for the scaled images (status 0, 4 or 5) of every crystal whose reference
        error f reached REFERENCE_ERROR_MAX (the intensities disagree with that reference as
        much as they follow it: another crystal's, a permuted one), and for every scaled
        image of which more than half of the integrated reflections with a reference are
        Term 1 outliers (its G fits a minority: measured with 30 % of a reference permuted,
        one image ended at G = 0.04 × the truth from 57 of its 240 reflections)."""
        status = results.images["status"]
        scaled = np.isin(status, (0, 4, 5))
        refl = results.reflections
        image = self.shoeboxes.reflections.image_id
        agreement = self.reference_agreement(results)
        for c in np.flatnonzero((self.crystals.reference_error >= REFERENCE_ERROR_MAX)
                                | (agreement < REFERENCE_AGREEMENT_MIN)):
            status[scaled & (self.image_crystal == c)] = 9
        referenced = ((refl["flags"] & 1) == 0) & np.isfinite(refl["intensity_prf"])
        n_referenced = np.bincount(image[referenced], minlength=len(status))
        n_outliers = np.bincount(image[referenced & ((refl["flags"] & 8) != 0)],
                                 minlength=len(status))
        status[scaled & (n_outliers > 0.5 * n_referenced)] = 9

    def finish(self, results: Results, model: str) -> None:
        c = self.crystals
        results.crystals = c.as_dict()
        self.flag_uninformative_reference(results)
        options = _options_dict(self.core_options(model))
        options.update(profile=model, error_model=self.error_model, refine_R0=self.refine_R0,
                       R0_prior=self.R0_prior,
                       global_rounds=self.history)
        results.options = options
        for name in GLOBAL_CONTRIBUTIONS:
            results.images.pop(name, None)


def evaluate_image(shoeboxes: ShoeboxSet, image: int, *, R0: float, G: float, B: float,
                   R1: float, anisotropy=(0.0, 0.0), tail=(0.0, 3.0), rotation=(0.0, 0.0, 0.0),
                   detector_shift: float = 0.0, held: dict[str, Any] | None = None,
                   passes: int = 1, objective: str = "factored", profile: str = "anisotropic",
                   **options: Any) -> dict[str, np.ndarray]:
    """Residuals and autodiff Jacobian of one image's problem at given parameters.

    The per-reflection fits (J, background, centre, the shape scores, the weights) are made at
    ``held`` (a dict overriding any of G, B, R1, anisotropy, tail, rotation, detector_shift;
    default: the values themselves), ``passes`` times, as at the start of a solve. Returns
    ``residuals``, ``jacobian`` (columns in covariance order), ``term`` (1 intensity, 2 shape,
    3 position, 4 pixel, 5 prior), ``row`` (reflection row, -1 for a prior),
    ``intensity_prf`` (J of each reflection of the image) and ``cost``.
    """
    r0 = _per_crystal(shoeboxes, R0, "R0")
    values = dict(G=G, B=B, R1=R1, anisotropy=anisotropy, tail=tail, rotation=rotation,
                  detector_shift=detector_shift)
    at = {**values, **(held or {})}
    tail_values = at["tail"]
    opts = refine_options(objective=objective, profile=profile, R0=[float(v) for v in r0],
                          tail_fraction=[float(tail_values[0])] * len(r0),
                          tail_scale=[float(tail_values[1])] * len(r0), **options)

    def flat(p: dict[str, Any]) -> list[float]:
        return [float(p["G"]), float(p["B"]), float(p["R1"]), *map(float, p["anisotropy"]),
                *map(float, p["tail"]), *map(float, p["rotation"]), float(p["detector_shift"])]

    out = _core.evaluate_image(shoeboxes.core(), opts, image, flat(values), flat(at), passes)
    return {k: np.asarray(v) for k, v in out.items()}


def model_counts(shoeboxes: ShoeboxSet, results: Results, *, n_threads: int = 1
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The refinement's model of every shoebox pixel: expected counts and model variance.

    mu_p = bg_p + A P_p with A = G B_term p pol I_ref where the image is scaled and the
    reflection has a reference (else the fitted J), and v_p = max(bg_p, 0) + A P_p +
    σ_read², at the refined parameters and per-reflection state of ``results`` (its centres
    and backgrounds) and with its options; NaN where not integrated and on masked pixels.

    Returns
    -------
    mu, variance : ndarray, shape (T,)
    """
    known = {name for name in dir(_core.RefineOptions()) if not name.startswith("_")}
    options = {k: (float("inf") if v == "inf" else v) for k, v in results.options.items()
               if k in known}
    opts = refine_options(**options)
    arrays = {}
    for group, spec in ((results.images, IMAGE_FIELDS), (results.reflections, REFLECTION_FIELDS)):
        for name, (dtype, columns) in spec.items():
            if name in group:
                arrays[name] = np.array(group[name], dtype=np.int32 if dtype == "i4" else np.float64,
                                        order="C")
            else:  # a global-step contribution not kept in results
                rows = len(group["flags"] if "flags" in group else group["G"])
                shape = (rows,) if columns == 0 else (rows, columns)
                arrays[name] = np.zeros(shape, np.int32 if dtype == "i4" else np.float64)
    mu, variance = _core.model_counts(shoeboxes.core(), opts, arrays, n_threads)
    return np.asarray(mu), np.asarray(variance)
