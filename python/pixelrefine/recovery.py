"""Recovery of simulated truth: biases, pulls and the efficiency of J against the Cramér–Rao
bound, from a refinement of a set that carries ``/truth`` (``pixelrefine.simulate``).

The definitions are those the tests and METHODS.md's regime table use:

- parameter bias: the mean over images of (fit − true), also in units of the reported sigma
  (``pull_mean``), and the pulls' spread (``pull_sd``); G is compared with
  G_true × gain / reference_scale (the counts' gain and the reference's scale are absorbed by
  G), J with J_true × gain, intensity_scaled with I_true × reference_scale;
- J efficiency: Σ CRB² / Σ (J − J_true)² over spots with J_true/CRB ≥ ``snr_min`` whose box
  holds at least ``box_fraction_min`` of the spot and holds no neighbour's spot and no zinger,
  CRB the bound with the background a nuisance (``truth.reflections.intensity_crb``); 1 is
  the limit;
- pulls of intensity_prf against J_true and of intensity_scaled against I_true × scale.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .refine import Results
from .shoeboxes import ShoeboxSet

__all__ = ["recovery", "reference_scale"]


def _parameter(shoeboxes: ShoeboxSet, name: str, default: float) -> float:
    params = shoeboxes.truth.get("@parameters") if shoeboxes.truth else None
    if params is None:
        return default
    if isinstance(params, bytes):
        params = params.decode()
    return float(json.loads(str(params)).get(name, default))


def reference_scale(shoeboxes: ShoeboxSet) -> float:
    """The simulated reference's scale factor (1 when the simulator did not record one)."""
    return _parameter(shoeboxes, "reference_scale", 1.0)


def counts_gain(shoeboxes: ShoeboxSet) -> float:
    """The simulated counts' gain (counts per photon; 1 when not recorded)."""
    return _parameter(shoeboxes, "gain", 1.0)


def _summary(fit: np.ndarray, true: np.ndarray, sigma: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(fit) & np.isfinite(true)
    pulls = ((fit - true) / sigma)[ok & np.isfinite(sigma) & (sigma > 0)]
    out = {"n": int(ok.sum()), "bias": float(np.mean(fit[ok] - true[ok])) if ok.any() else np.nan,
           "relative_bias": float(np.mean(fit[ok] / true[ok] - 1)) if ok.any() else np.nan,
           "median_sigma": float(np.median(sigma[ok])) if ok.any() else np.nan}
    out["pull_mean"] = float(pulls.mean()) if pulls.size else np.nan
    out["pull_sd"] = float(pulls.std()) if pulls.size > 1 else np.nan
    out["bias_over_sigma"] = out["bias"] / out["median_sigma"] if out["median_sigma"] else np.nan
    return out


def recovery(shoeboxes: ShoeboxSet, results: Results, *, snr_min: float = 3.0,
             box_fraction_min: float = 0.8) -> dict[str, Any]:
    """Recovery metrics of ``results`` against ``shoeboxes.truth`` (see the module docstring).

    Returns
    -------
    dict
        ``G``, ``B``, ``R1`` (each a dict of n, bias, relative_bias, median_sigma, pull_mean,
        pull_sd, bias_over_sigma), ``status`` (counts by code), ``J`` (efficiency, n,
        relative_bias, pull_sd), ``intensity_scaled`` (pull_mean, pull_sd, n) and ``R0``
        (fit, sigma, true per crystal).
    """
    truth = shoeboxes.truth
    im, refl = results.images, results.reflections
    scale, gain = reference_scale(shoeboxes), counts_gain(shoeboxes)
    out: dict[str, Any] = {
        "G": _summary(im["G"], np.asarray(truth["images"]["G"]) * gain / scale, im["G_sigma"]),
        "B": _summary(im["B"], np.asarray(truth["images"]["B"]), im["B_sigma"]),
        "R1": _summary(im["R1"], np.asarray(truth["images"]["R1"]), im["R1_sigma"]),
    }
    codes, counts = np.unique(im["status"], return_counts=True)
    out["status"] = {int(c): int(n) for c, n in zip(codes, counts)}
    tr = truth["reflections"]
    J, J_sigma = refl["intensity_prf"], refl["intensity_prf_sigma"]
    J_true = np.asarray(tr["intensity_model"]) * gain
    crb = np.asarray(tr["intensity_crb"]) * gain
    chosen = (np.isfinite(J) & (J_true >= snr_min * crb)
              & (np.asarray(tr["fraction_in_box"]) >= box_fraction_min))
    # The bound assumes clean data: boxes holding a neighbour's spot or a zinger are left out.
    if "has_neighbour" in tr:
        chosen &= ~np.asarray(tr["has_neighbour"], bool)
    if "n_zingers" in tr:
        chosen &= np.asarray(tr["n_zingers"]) == 0
    error = J[chosen] - J_true[chosen]
    out["J"] = {"n": int(chosen.sum()),
                "efficiency": float(np.sum(crb[chosen] ** 2) / np.sum(error ** 2)) if chosen.any() else np.nan,
                "relative_bias": float(np.sum(error) / np.sum(J_true[chosen])) if chosen.any() else np.nan,
                "pull_sd": float(np.std(error / J_sigma[chosen])) if chosen.any() else np.nan,
                "pull_mean": float(np.mean(error / J_sigma[chosen])) if chosen.any() else np.nan}
    I, I_sigma = refl["intensity_scaled"], refl["intensity_scaled_sigma"]
    I_true = np.asarray(tr["intensity_true"]) * scale
    ok = np.isfinite(I) & np.isfinite(I_sigma) & (I_sigma > 0) & chosen
    pulls = (I[ok] - I_true[ok]) / I_sigma[ok]
    out["intensity_scaled"] = {"n": int(ok.sum()),
                               "pull_mean": float(pulls.mean()) if pulls.size else np.nan,
                               "pull_sd": float(pulls.std()) if pulls.size > 1 else np.nan}
    out["R0"] = {"fit": np.asarray(results.crystals["R0"]).tolist(),
                 "sigma": np.asarray(results.crystals["R0_sigma"]).tolist(),
                 "true": np.asarray(truth["global"]["R0"]).tolist()}
    return out
