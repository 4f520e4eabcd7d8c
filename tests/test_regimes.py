"""Every regime the independent simulator writes (pixelrefine.simulate.REGIMES: spots that fill
or are cut by their box, 5x5 to 47x47 boxes, J of tens to 1e5 photons, backgrounds of 0.1-300
with planar gradients, read noise and gain, masked pixels, zingers and neighbours' spots, heavy
tails, anisotropic and off-centre spots, a misoriented stored A, several crystals, a tiled
detector, references 0-30 % off, on another scale or absent) refined with nothing given but the
file. The pooled figures over >= 100 images per regime are METHODS.md's regime table
(scripts/regime_table.py); here each regime runs on 12 images, so the tolerances are wider by
the statistics of 12 images, stated per assertion.

The Cramér–Rao bound on J with the background a nuisance comes from the simulator's truth; the
first test derives it again here from the expected counts, the true profile and the mask.
"""

import numpy as np
import pytest

import pixelrefine as pr
from pixelrefine.recovery import counts_gain, recovery
from pixelrefine.simulate import REGIMES

N_IMAGES = 12
#: Regimes where a known limit of the method applies (METHODS.md §I.15), with what differs.
# Regimes held to wider limits than the common ones (none now: `offset`, held to efficiency
# 0.8 and pulls sd up to 1.35 while weak spots far off their predictions stayed there, meets
# the common limits since `search_centre`: efficiency 0.924, J pulls sd 1.048, seed 3).
LIMITS: dict[str, dict] = {}


def _run(name, seed=3):
    shoeboxes = pr.simulate(N_IMAGES, seed=seed, **REGIMES[name])
    return shoeboxes, pr.refine(shoeboxes, n_threads=2)


@pytest.fixture(scope="module")
def regime_results():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _run(name)
        return cache[name]
    return get


def test_the_bound_is_what_the_truth_says():
    """CRB(J) with the background a nuisance: (I^-1)_JJ of the Fisher information of (J, b)
    for Poisson counts plus read noise, I = sum_p (dmu_p/dtheta)(dmu_p/dtheta)' / (mu_p + r^2),
    computed here from the expected counts and the true profile over the valid pixels."""
    shoeboxes = pr.simulate(2, seed=9, keep_expected=True, read_noise=1.5, max_reflections=80)
    truth = shoeboxes.truth
    mu, P = truth["pixels"]["expected"], truth["pixels"]["profile"]
    refl, mask = shoeboxes.reflections, shoeboxes.pixels.mask
    for row in range(shoeboxes.n_reflections):
        x0, x1, y0, y1 = refl.bbox[row]
        sl = slice(refl.pixel_offset[row], refl.pixel_offset[row] + (x1 - x0) * (y1 - y0))
        valid = mask[sl] == 1
        v = mu[sl][valid] + 1.5**2
        X = np.stack([P[sl][valid], np.ones(valid.sum())], 1)
        information = X.T @ (X / v[:, None])
        crb = np.sqrt(np.linalg.inv(information)[0, 0])
        assert crb == pytest.approx(truth["reflections"]["intensity_crb"][row], rel=1e-6)


@pytest.mark.parametrize("name", sorted(REGIMES))
def test_regime_recovered_with_nothing_given(regime_results, name):
    shoeboxes, results = regime_results(name)
    limits = LIMITS.get(name, {})
    rec = recovery(shoeboxes, results)
    status = results.images["status"]
    expected_status = 6 if name == "no_reference" else 0
    # At least 10 of 12 images end with the status their data allow.
    assert np.mean(status == expected_status) >= 10 / 12, rec["status"]
    # J: unbiased to 1 % and within 0.9 of the bound (a ratio of ~2,000 squared errors has a
    # relative sd of ~3 %), pulls of sd 0.9-1.1 (sd of 2,000 pulls: +-1.6 %).
    J = rec["J"]
    assert J["n"] > 300
    assert abs(J["relative_bias"]) < 0.01, J
    assert J["efficiency"] > limits.get("efficiency", 0.9), J
    low, high = limits.get("pull_sd", (0.9, 1.1))
    assert low < J["pull_sd"] < high, J
    if name != "no_reference":
        # G, R1: the mean pull over 12 images has a standard error of 0.29: |mean| < 1/3 + 3
        # standard errors; intensity_scaled's pulls sd in the same band as J's.
        for parameter in ("G", "R1"):
            assert abs(rec[parameter]["pull_mean"]) < 1 / 3 + 3 / np.sqrt(N_IMAGES), (parameter, rec[parameter])
        assert low < rec["intensity_scaled"]["pull_sd"] < high, rec["intensity_scaled"]
        fit, sigma, true = (np.asarray(rec["R0"][key]) for key in ("fit", "sigma", "true"))
        assert np.all(np.abs(fit / true - 1) < 0.05) and np.all(np.abs(fit - true) < 4 * sigma), rec["R0"]
    else:
        assert np.all(np.isnan(results.images["G"]))
        assert abs(rec["R1"]["pull_mean"]) < 1 / 3 + 3 / np.sqrt(N_IMAGES), rec["R1"]


def test_the_profile_model_is_chosen_by_the_data(regime_results):
    assert regime_results("comfortable")[1].options["profile"] == "isotropic"
    assert regime_results("anisotropic")[1].options["profile"] == "anisotropic"
    tails = regime_results("tails")[1]
    assert tails.options["profile"] == "tail"
    t, s = tails.crystals["tail_fraction"][0], tails.crystals["tail_scale"][0]
    assert abs(t - 0.3) < 0.05 and abs(s - 3.0) < 0.5, (t, s)
    # A tail that overflows its box (sd 3-6 px in 15x15 boxes): s is not held below its truth
    # by the box (2.95 on these 12 stills; 2.59 under the former limit of half the half-side).
    overflow = regime_results("tails_overflow")[1]
    assert overflow.options["profile"] == "tail"
    t, s = overflow.crystals["tail_fraction"][0], overflow.crystals["tail_scale"][0]
    assert abs(t - 0.2) < 0.03 and abs(s - 3.0) < 0.3, (t, s)


def test_error_model_finds_the_reference_error_and_the_gain(regime_results):
    weak = regime_results("weak")[1]
    assert abs(weak.crystals["reference_error"][0] - 0.3) < 0.03
    shoeboxes, noisy = regime_results("read_noise")
    # Counts that are gain x (photons + read noise): var = gain mu + gain^2 r^2, the "gain"
    # error model's, so k^2 is the gain (1.7; its standard error from ~10^5 background pixels
    # is ~0.5 %). The "scale" model's single k (var = k^2 (mu + r^2)) lies between sqrt(gain)
    # and gain and leaves the J pulls at ~0.87 (METHODS.md §I.10).
    gain = counts_gain(shoeboxes)
    assert noisy.crystals["error_scale"][0] ** 2 == pytest.approx(gain, rel=0.02)
    assert noisy.options["error_model"] == "gain"


@pytest.mark.parametrize("name", ["filling", "weak"])
def test_the_default_is_at_least_as_good_as_the_per_pixel_baseline(name):
    """On the same data (the baseline given the factored run's R0, which it cannot refine):
    the default's J efficiency is no worse than the baseline's (within the 3 % sd of the
    ratio) and its G bias is no larger (within three standard errors of the mean, from the
    default's sigmas over 15 images; the pooled comparison over 100 images is METHODS.md's
    regime table)."""
    shoeboxes = pr.simulate(15, seed=29, **REGIMES[name])
    factored = pr.refine(shoeboxes, n_threads=2)
    pixel = pr.refine(shoeboxes, objective="pixel", R0=factored.crystals["R0"], n_threads=2,
                      max_global=2)
    f, p = recovery(shoeboxes, factored), recovery(shoeboxes, pixel)
    assert f["J"]["efficiency"] > p["J"]["efficiency"] - 0.03, (f["J"], p["J"])
    standard_error = f["G"]["median_sigma"] / np.median(shoeboxes.truth["images"]["G"]) / np.sqrt(15)
    assert abs(f["G"]["relative_bias"]) < abs(p["G"]["relative_bias"]) + 3 * standard_error
