"""The conventions (conventions.md) checked against an independent NumPy implementation."""

import numpy as np
import pytest

import pixelrefine as pr
from pixelrefine import _core
from pixelrefine.simulate import LYSOZYME_CELL, miller_indices, random_rotation, reciprocal_basis

from conftest import R0


def rodrigues(omega):
    angle = np.linalg.norm(omega)
    if angle == 0:
        return np.eye(3)
    k = omega / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def reference_prediction(A, hkl, wavelength, f_pol, origin, fast, slow, pixel_size):
    """conventions.md, written out directly."""
    q = hkl @ A.T
    s0 = np.array([0.0, 0.0, 1.0 / wavelength])
    v = q + s0
    eps = np.linalg.norm(v, axis=1) - 1.0 / wavelength
    s_hat = v / np.linalg.norm(v, axis=1)[:, None]
    normal = np.cross(fast, slow)
    t = (origin @ normal) / (s_hat @ normal)
    r = t[:, None] * s_hat - origin
    x = r @ fast / pixel_size
    y = r @ slow / pixel_size
    pol = 1 - f_pol * s_hat[:, 0] ** 2 - (1 - f_pol) * s_hat[:, 1] ** 2
    return 1 / np.linalg.norm(q, axis=1), eps, np.stack([x, y], 1), pol


@pytest.fixture(scope="module")
def geometry():
    rng = np.random.default_rng(5)
    detector = pr.Detector(origin=[[-40.0, -38.5, 80.0]], fast_axis=[[1.0, 0.0, 0.0]],
                           slow_axis=[[0.0, np.cos(0.1), np.sin(0.1)]], pixel_size=[0.075],
                           size=[[1100, 1100]])
    A = np.stack([random_rotation(rng) @ reciprocal_basis(LYSOZYME_CELL) for _ in range(2)])
    images = pr.Images(wavelength=[1.3, 1.0], bandwidth=[0.0, 2e-3], A_matrix=A,
                       polarization_fraction=[0.99, 0.5])
    empty = np.zeros(0)
    shoeboxes = pr.ShoeboxSet(detector, images,
                              pr.Reflections(empty, np.zeros((0, 3)), empty, np.zeros((0, 4)), empty),
                              pr.Pixels(empty, empty))
    hkl = np.ascontiguousarray(miller_indices(reciprocal_basis(LYSOZYME_CELL), 2.0)[::97])
    return shoeboxes, hkl


@pytest.mark.parametrize("image", [0, 1])
def test_prediction_matches_conventions(geometry, image):
    shoeboxes, hkl = geometry
    n = len(hkl)
    pred = _core.predict(shoeboxes.core(), np.full(n, image, np.int32), np.zeros(n, np.int16), hkl,
                         np.full(2, R0), 0.0)
    im, det = shoeboxes.images, shoeboxes.detector
    d, eps, xy, pol = reference_prediction(im.A_matrix[image], hkl, im.wavelength[image],
                                           im.polarization_fraction[image], det.origin[0],
                                           det.fast_axis[0], det.slow_axis[0], det.pixel_size[0])
    hits = pred["hits_panel"] == 1
    assert hits.mean() > 0.3
    np.testing.assert_allclose(pred["d"], d, rtol=1e-12)
    np.testing.assert_allclose(pred["excitation_error"], eps, atol=1e-13)
    np.testing.assert_allclose(pred["polarization"], pol, rtol=1e-12)
    np.testing.assert_allclose(pred["xyzcal"][hits], xy[hits], rtol=1e-9, atol=1e-7)
    # Partiality with R0_eff^2 = R0^2 + R_bw^2, R_bw^2 = (b lambda)^2 / (2 d^4).
    b, lam = im.bandwidth[image], im.wavelength[image]
    width_sq = R0**2 + (b * lam) ** 2 / (2 * d**4)
    np.testing.assert_allclose(pred["partiality"], np.exp(-eps**2 / width_sq), rtol=1e-10)


def test_mosaic_spread_widens_partiality(geometry):
    shoeboxes, hkl = geometry
    n = len(hkl)
    args = (shoeboxes.core(), np.zeros(n, np.int32), np.zeros(n, np.int16), hkl, np.full(2, R0))
    eta = 2e-3
    p0, p1 = _core.predict(*args, 0.0), _core.predict(*args, eta)
    d, eps = p0["d"], p0["excitation_error"]
    cos_theta = np.sqrt(1 - (1.3 / (2 * d)) ** 2)
    width_sq = R0**2 + 2 * (eta * cos_theta / d) ** 2
    np.testing.assert_allclose(p1["partiality"], np.exp(-eps**2 / width_sq), rtol=1e-10)


def test_rotation_is_applied_as_R_omega_times_A(geometry):
    shoeboxes, hkl = geometry
    n = len(hkl)
    omega = np.array([[1e-3, -2e-3, 0.5e-3], [0.0, 0.0, 0.0]])
    pred = _core.predict(shoeboxes.core(), np.zeros(n, np.int32), np.zeros(n, np.int16), hkl,
                         np.full(2, R0), 0.0, omega)
    im, det = shoeboxes.images, shoeboxes.detector
    A_rot = rodrigues(omega[0]) @ im.A_matrix[0]
    _, eps, xy, _ = reference_prediction(A_rot, hkl, 1.3, 0.99, det.origin[0], det.fast_axis[0],
                                         det.slow_axis[0], 0.075)
    np.testing.assert_allclose(pred["excitation_error"], eps, atol=1e-12)
    hits = pred["hits_panel"] == 1
    np.testing.assert_allclose(pred["xyzcal"][hits], xy[hits], rtol=1e-9, atol=1e-7)


def test_detector_shift_moves_spots_radially(geometry):
    shoeboxes, hkl = geometry
    n = len(hkl)
    args = (shoeboxes.core(), np.zeros(n, np.int32), np.zeros(n, np.int16), hkl, np.full(2, R0), 0.0)
    near = _core.predict(*args, None, np.zeros(2))
    far = _core.predict(*args, None, np.full(2, 5.0))
    # Beam centre of this panel: where the direct beam (0, 0, 1) meets it.
    hits = (near["hits_panel"] == 1) & (far["hits_panel"] == 1)
    assert hits.sum() > 10
    # A longer distance magnifies positions about the beam centre; partiality is unchanged.
    np.testing.assert_array_equal(near["partiality"], far["partiality"])
    assert not np.allclose(near["xyzcal"][hits], far["xyzcal"][hits])


def test_pixel_deviate_has_poisson_tails():
    """`pixel_deviate` (METHODS.md §I.7) is the signed root of the Poisson deviance of the
    Snyder-shifted count, written out here with scipy's xlogy; it is the normal deviate at high
    counts; and the first count whose deviate passes 6 has the Poisson tail probability of a
    6-sd normal one (0.2–1.3 times it: counts are discrete) from 0.03 to 10^4 photons per pixel, where the normal
    z > 6 fires at 2 counts on 0.1 (P = 0.005)."""
    from scipy import special, stats
    rng = np.random.default_rng(5)
    mu = rng.uniform(0.02, 50, 200)
    read = rng.uniform(0, 4, 200)
    k = rng.uniform(0.7, 1.5, 200)
    counts = rng.poisson(mu) + rng.normal(0, np.sqrt(read))
    v = mu + read
    lam = v / k**2
    m = np.maximum((counts - mu) / k**2 + lam, 0.0)
    deviance = 2 * (special.xlogy(m, m / lam) - (m - lam))
    expected = np.sign(m - lam) * np.sqrt(np.maximum(deviance, 0))
    np.testing.assert_allclose(_core.pixel_deviate(counts, mu, v, k), expected, rtol=1e-9, atol=1e-12)
    z = np.linspace(-3, 3, 13)
    big = 1e8
    np.testing.assert_allclose(_core.pixel_deviate(big + z * np.sqrt(big), big, big), z, atol=1e-3)
    for lam in (0.03, 0.1, 1.0, 10.0, 100.0, 1e4):
        n = np.arange(0, int(lam + 20 * np.sqrt(lam) + 40), dtype=float)
        first = n[_core.pixel_deviate(n, lam, lam) > 6][0]
        ratio = stats.poisson.sf(first - 1, lam) / stats.norm.sf(6)
        assert 0.15 < ratio < 2, (lam, first, ratio)
    assert (2.0 - 0.1) / np.sqrt(0.1) > 6 > _core.pixel_deviate(2.0, 0.1, 0.1)
