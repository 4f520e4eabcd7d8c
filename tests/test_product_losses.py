"""The image losses used in the product: Ceres's robust losses in the per-pixel objective
match the Python definitions, and `report` gives model-vs-observed shoebox metrics."""

import numpy as np
import pytest

import pixelrefine as pr
from pixelrefine import losses
from pixelrefine.report import shoebox_quality

from conftest import R0, with_counts


@pytest.mark.parametrize("loss, scale, python_loss", [
    ("huber", 1.5, losses.huber),
    ("huber", 0.5, losses.huber),
    ("cauchy", 2.0, losses.cauchy),
])
def test_ceres_loss_matches_python_definition(small_set, loss, scale, python_loss):
    """Ceres's cost of the robustified per-pixel objective equals Σ loss(r) of the plain
    residuals with the Python definition (which is ½ρ(r²) of Ceres's loss)."""
    t = small_set.truth["images"]
    params = dict(G=t["G"][0] * 1.1, B=t["B"][0], R1=t["R1"][0] * 0.9)
    plain = pr.evaluate_image(small_set, 0, R0=R0, objective="pixel", profile="isotropic", **params)
    robust = pr.evaluate_image(small_set, 0, R0=R0, objective="pixel", profile="isotropic", loss=loss,
                               loss_scale=scale, **params)
    r = plain["residuals"]
    assert np.abs(r).max() > 3 * scale  # both branches of the loss are exercised
    np.testing.assert_allclose(float(plain["cost"]), 0.5 * np.sum(r**2), rtol=1e-12)
    np.testing.assert_allclose(float(robust["cost"]), np.sum(python_loss(r, scale)), rtol=1e-10)


def test_huber_resists_hot_pixels(small_set):
    """Unmasked hot pixels in 5 % of the shoeboxes pull G of the plain per-pixel fit; with
    Huber the fit to the dirty data stays closer to its own fit to the clean data."""
    rng = np.random.default_rng(3)
    counts = small_set.pixels.counts.astype(np.float64).copy()
    refl = small_set.reflections
    hot = rng.random(len(refl)) < 0.05
    spike_pixel = {}
    for row in np.flatnonzero(hot):
        spike_pixel[row] = refl.pixel_offset[row] + rng.integers(0, 49)
        counts[spike_pixel[row]] += 400.0
    dirty = with_counts(small_set, counts)
    # The refinement's own pixel-outlier test would find these spikes: switched off here, so
    # that the comparison is of the losses alone.
    kw = dict(R0=R0, objective="pixel", profile="isotropic", pixel_outlier_sigma=0.0,
              error_scale=1.0, reference_error=0.05, max_global=1)
    clean = pr.refine(small_set, **kw)
    plain = pr.refine(dirty, **kw)
    huber_kw = dict(kw, loss="huber", loss_scale=2.0)
    huber_clean = pr.refine(small_set, **huber_kw)
    huber = pr.refine(dirty, **huber_kw)
    assert not np.any(huber.images["status"] == 3)
    # Unmasked spikes left in the fit: their reflections say so (flag 2048, poor fit: pixel chi^2
    # per degree of freedom above chi2_max; or 256, when the spike pulled the profile's centre
    # off the spot and the box no longer holds it: not integrated).
    valid_spike = np.array([hot[r] and bool(dirty.pixels.mask[spike_pixel[r]]) for r in range(len(refl))])
    assert valid_spike.sum() >= 10
    assert np.mean(plain.reflections["flags"][valid_spike] & (2048 | 256) > 0) > 0.9
    assert np.mean(clean.reflections["flags"] & 2048 > 0) < 0.01
    error_plain = np.abs(plain.images["G"] / clean.images["G"] - 1)
    error_huber = np.abs(huber.images["G"] / huber_clean.images["G"] - 1)
    assert np.median(error_huber) < 0.5 * np.median(error_plain)


def test_report_shoebox_metrics(small_set):
    results = pr.refine(small_set, R0=R0)
    quality = shoebox_quality(small_set, results)
    # The model is the truth's form: χ² per pixel ~ 1 for every image.
    assert np.all(np.abs(quality["image_chi2"] - 1) < 0.15), quality["image_chi2"]
    assert np.all(quality["image_ssim"] > 0.5) and np.all(quality["image_ssim"] <= 1)
    assert np.all(np.isfinite(quality["image_psnr"]))
    # A wrong model (R1 halved) fits visibly worse.
    wrong = pr.refine(small_set, R0=R0)
    wrong.images["shape"][:, 0] = wrong.images["shape"][:, 0] * 0.5  # the profile's R1
    worse = shoebox_quality(small_set, wrong)
    assert np.all(worse["image_chi2"] > quality["image_chi2"] + 0.2)
