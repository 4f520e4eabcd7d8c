"""A neighbour's spot in the box, fitted as a second profile (METHODS.md §I.7, flag 4096).

Half of the 11x11 boxes hold a second spot of the image's intensities 3.3-5 px from the box
centre, unmasked (pixelrefine.simulate's neighbour_fraction). Leaving its pixels out leaves its
wings under the spot: measured on these 16 stills (seeds 5 and 6), J of the neighbour boxes is
low by 1.2-1.7 % (J-weighted), the pulls' median -0.43 to -0.45, and 12 of 16 images end at
status 8 (poor fit). Fitted as a second profile: J-weighted -0.12 % and +0.03 %, median pull
+0.01 to +0.03 with a robust sd of 0.91-0.95 over ~1,200 modelled boxes, every image status 0.
"""

import numpy as np
import pytest

import pixelrefine as pr

NEIGHBOUR_MODELLED = 4096
OUTLIER = 8


@pytest.fixture(scope="module")
def neighbour_set():
    return pr.simulate(16, seed=5, neighbour_fraction=0.5, shoebox_size=11)


def _neighbour_boxes(shoeboxes, results):
    """J, its truth and sigma, and which boxes hold a neighbour / have it modelled."""
    truth = shoeboxes.truth["reflections"]
    refl = results.reflections
    flags = refl["flags"]
    J_true = np.asarray(truth["intensity_model"])
    has = np.asarray(truth["has_neighbour"], bool)
    usable = has & np.isfinite(refl["intensity_prf"]) & (J_true > 30) & ((flags & OUTLIER) == 0)
    return refl["intensity_prf"], J_true, refl["intensity_prf_sigma"], has, usable, \
        (flags & NEIGHBOUR_MODELLED) != 0


def test_a_neighbours_spot_is_fitted_and_leaves_J_unbiased(neighbour_set):
    results = pr.refine(neighbour_set, n_threads=2)
    J, J_true, sigma, has, usable, modelled = _neighbour_boxes(neighbour_set, results)
    # Found in most boxes that hold one (0.68 measured), in (almost) no other.
    assert np.mean(modelled[has]) > 0.55
    assert np.mean(modelled[~has]) < 0.002
    # The modelled boxes' pulls: median within 3 standard errors (~0.036 each) of 0, robust
    # sd 0.85-1.1 (its standard error ~0.03), almost no gross errors.
    chosen = usable & modelled
    assert chosen.sum() > 800
    pull = (J[chosen] - J_true[chosen]) / sigma[chosen]
    robust_sd = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    assert abs(np.median(pull)) < 0.1, np.median(pull)
    assert 0.85 < robust_sd < 1.1, robust_sd
    assert np.mean(np.abs(pull) > 5) < 0.005
    # Every neighbour box (modelled or not): J-weighted bias within 0.5 %.
    assert abs(np.sum(J[usable] - J_true[usable]) / np.sum(J_true[usable])) < 0.005
    assert np.mean(results.images["status"] == 0) >= 15 / 16


def test_without_the_neighbour_model_its_wings_bias_J(neighbour_set):
    """The property the model is there for, shown by switching it off: the same boxes' J low
    by more than 0.8 % (1.66 % measured), the pulls' median below -0.3 (-0.45)."""
    results = pr.refine(neighbour_set, n_threads=2, model_neighbours=False)
    J, J_true, sigma, has, usable, modelled = _neighbour_boxes(neighbour_set, results)
    assert not modelled.any()
    assert np.sum(J[usable] - J_true[usable]) / np.sum(J_true[usable]) < -0.008
    assert np.median((J[usable] - J_true[usable]) / sigma[usable]) < -0.3


def test_spots_without_neighbours_are_not_given_one():
    shoeboxes = pr.simulate(8, seed=2)
    flags = pr.refine(shoeboxes, n_threads=2).reflections["flags"]
    assert np.mean((flags & NEIGHBOUR_MODELLED) != 0) < 0.002
