"""Tests of pixelrefine.losses: reference agreement, gradients, invariances, edge cases."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest

from pixelrefine import losses as L

from loss_inputs import (huber_inputs, make_pair, ms_ssim_inputs, ramp, reference_values,
                         spots_image, ssim_valid_inputs)

# ----------------------------------------------------------------------------- data


def make_weight(shape, seed=1, zero_fraction=0.2):
    rng = np.random.default_rng(seed)
    w = 0.5 + rng.random(shape)
    w[rng.random(shape) < zero_fraction] = 0.0
    return w


def checkerboard(shape, period=8):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (((yy // period) + (xx // period)) % 2).astype(np.float64)


def structured_pairs(shape):
    """(name, image_true, image_test, data_range) for agreement tests."""
    rng = np.random.default_rng(7)
    out = []
    a, b = make_pair(shape, seed=3)
    out.append(("random", a, b, 1.0))
    s = spots_image(shape)
    out.append(("spots", s, rng.poisson(s).astype(np.float64), float(s.max() - s.min())))
    c = checkerboard(shape)
    out.append(("checkerboard", c, c + 0.1 * rng.standard_normal(shape), 1.0))
    r = ramp(shape)
    out.append(("ramp", r, np.clip(r + 0.05 * rng.standard_normal(shape), 0, 1), 1.0))
    return out


# ----------------------------------------------------------------------------- the loss table


def _tv(model, observed, weight=None, *, gradient=False):
    return L.total_variation(model, weight, gradient=gradient)


def _enl(model, observed, weight=None, *, gradient=False):
    return L.enl(model, weight, gradient=gradient)


def _combined():
    return L.CombinedLoss(
        [
            ("mse", 0.5, L.mse),
            ("ssim", 0.3, partial(L.ssim_loss, data_range=1.0)),
            ("edges", 0.1, L.gradient_loss),
            ("tv", 0.05, L.total_variation, True),
        ]
    )


def _highpass_array(shape):
    return L.gaussian_highpass(shape, 0.15) ** 0.5


# name -> (callable, is_loss).  Every callable follows fn(model, observed, weight, *, gradient).
# is_loss: a loss (0 for identical images, 0 when every weight is 0); else a metric.
LOSSES = {
    "mse": (L.mse, True),
    "l1": (L.l1, True),
    "huber_loss": (partial(L.huber_loss, delta=0.15), True),
    "smooth_l1_loss": (partial(L.smooth_l1_loss, beta=0.15), True),
    "cauchy_loss": (partial(L.cauchy_loss, scale=0.3), True),
    "ssim_loss[gaussian,population,valid]": (partial(L.ssim_loss, data_range=1.0), True),
    "ssim_loss[uniform7,sample,valid]": (
        partial(L.ssim_loss, data_range=1.0, window="uniform", covariance="sample"),
        True,
    ),
    "ssim_loss[gaussian,sample,reflect]": (
        partial(L.ssim_loss, data_range=1.0, covariance="sample", border="reflect"),
        True,
    ),
    "ssim_loss[uniform5,population,reflect]": (
        partial(L.ssim_loss, data_range=1.0, window="uniform", win_size=5, border="reflect"),
        True,
    ),
    "ms_ssim_loss[win5]": (partial(L.ms_ssim_loss, data_range=1.0, win_size=5), True),
    "ms_ssim_loss[win3,exclude]": (
        partial(L.ms_ssim_loss, data_range=1.0, win_size=3, pool_padding="exclude"),
        True,
    ),
    "gradient_loss[p=1]": (L.gradient_loss, True),
    "gradient_loss[p=2]": (partial(L.gradient_loss, p=2), True),
    "laplacian_loss[p=1]": (L.laplacian_loss, True),
    "laplacian_loss[p=2]": (partial(L.laplacian_loss, p=2), True),
    "total_variation": (_tv, False),
    "fourier_loss[p=2]": (L.fourier_loss, True),
    "fourier_loss[p=1,cutoff]": (partial(L.fourier_loss, p=1, highpass=0.1), True),
    "fourier_loss[p=2,array]": ("fourier_array", True),
    "log_domain(mse)": (L.log_domain(L.mse), True),
    "log_domain(ssim_loss,dB)": (
        lambda m, o, w=None, *, gradient=False: L.log_domain(L.ssim_loss, db=True)(
            m, o, w, gradient=gradient, data_range=3.0
        ),
        True,
    ),
    "enl_loss": (L.enl_loss, True),
    "combined": ("combined", True),
    "ssim": (partial(L.ssim, data_range=1.0), False),
    "ms_ssim": (partial(L.ms_ssim, data_range=1.0, win_size=5), False),
    "enl": (_enl, False),
}


# functionals of the model alone (the table's adapters ignore `observed`)
SINGLE_IMAGE = {"total_variation", "enl"}


def get_loss(name, shape):
    fn, is_loss = LOSSES[name]
    if fn == "combined":
        fn = _combined()
    elif fn == "fourier_array":
        fn = partial(L.fourier_loss, highpass=_highpass_array(shape))
    return fn, is_loss


def central_fd(f, x, h, indices):
    """Central differences of the scalar f at x along the given coordinates."""
    out = np.zeros(len(indices))
    for n, idx in enumerate(indices):
        xp = x.copy()
        xm = x.copy()
        xp[idx] += h
        xm[idx] -= h
        out[n] = (f(xp) - f(xm)) / (2 * h)
    return out


# Central differences in float64 with h = 1e-6 on O(1) losses: truncation error
# ~h^2 |f'''| ~ 1e-12 and rounding error ~eps |f| / h ~ 1e-10, so a tolerance of
# 1e-6 of the gradient's scale leaves a margin of >100x; a missing or wrong term
# of the derivation is an O(1) relative error.  The piece-wise linear losses (L1,
# |Sobel|, TV, Fourier p=1) are exact under central differences away from their
# kinks, which random continuous data do not hit within h.
FD_STEP = 1e-6
FD_RTOL = 1e-6


def assert_grad_matches_fd(fn, model, observed, weight, indices=None, h=FD_STEP):
    total = lambda m: float(np.sum(fn(m, observed, weight)))  # noqa: E731
    value, grad = fn(model, observed, weight, gradient=True)
    np.testing.assert_allclose(np.sum(value), total(model), rtol=1e-12, atol=1e-14)
    assert grad.shape == model.shape
    if indices is None:
        indices = list(np.ndindex(model.shape))
    fd = central_fd(total, model, h, indices)
    analytic = np.array([grad[i] for i in indices])
    scale = max(np.abs(fd).max(), 1e-12)
    np.testing.assert_allclose(analytic, fd, rtol=0, atol=FD_RTOL * scale)


# ============================================================================= agreement


SK_SETTINGS = [
    # (our options, skimage options)
    (dict(window="gaussian", win_size=11, covariance="population"), dict(gaussian_weights=True, use_sample_covariance=False)),
    (dict(window="gaussian", win_size=11, covariance="sample"), dict(gaussian_weights=True, use_sample_covariance=True)),
    (dict(window="uniform", win_size=7, covariance="sample"), dict(win_size=7, use_sample_covariance=True)),
    (dict(window="uniform", win_size=7, covariance="population"), dict(win_size=7, use_sample_covariance=False)),
    (dict(window="uniform", win_size=3, covariance="sample"), dict(win_size=3)),
    (dict(window="uniform", win_size=9, covariance="sample", K1=0.02, K2=0.05), dict(win_size=9, K1=0.02, K2=0.05)),
]


@pytest.mark.parametrize("shape", [(64, 64), (37, 53)])
@pytest.mark.parametrize("ours,theirs", SK_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_ssim_matches_skimage(shape, ours, theirs):
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image is not installed: no reference SSIM")
    for name, a, b, rng_ in structured_pairs(shape):
        ref = skm.structural_similarity(a, b, data_range=rng_, **theirs)
        got = L.ssim(a, b, data_range=rng_, **ours)
        assert abs(got - ref) < 1e-6, (name, got, ref)


def test_ssim_matches_skimage_on_smallest_images_and_stacks():
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image is not installed: no reference SSIM")
    a, b = make_pair((3, 7, 7), seed=4)  # 7x7: the smallest image skimage accepts for win_size 7
    got = L.ssim(a, b, data_range=1.0, window="uniform", covariance="sample")
    ref = [skm.structural_similarity(a[i], b[i], data_range=1.0) for i in range(3)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    a, b = make_pair((2, 11, 11), seed=5)
    got = L.ssim(a, b, data_range=1.0)
    ref = [skm.structural_similarity(a[i], b[i], data_range=1.0, gaussian_weights=True, use_sample_covariance=False) for i in range(2)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_ssim_integer_input_uses_dtype_range_like_skimage():
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image is not installed: no reference SSIM")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    b = np.clip(a + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
    ref = skm.structural_similarity(a, b)  # data_range 255 from the dtype
    assert abs(L.ssim(a, b, window="uniform", covariance="sample") - ref) < 1e-6


@pytest.mark.parametrize("shape", [(64, 64), (37, 53)])
def test_psnr_and_mse_match_skimage(shape):
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image is not installed: no reference PSNR/MSE")
    for name, a, b, rng_ in structured_pairs(shape):
        assert abs(L.psnr(a, b, data_range=rng_) - skm.peak_signal_noise_ratio(a, b, data_range=rng_)) < 1e-6, name
        ref = skm.mean_squared_error(a, b)
        assert abs(L.mse(a, b) - ref) <= 1e-12 * max(ref, 1.0), name


# The references below were computed once with pytorch_msssim and torch (tests/data/
# make_torch_reference.py, versions in tests/data/torch_reference.json): the tests compare with
# those stored values always, and with a live computation too when torch is importable.


def _live_torch():
    """(torch, pytorch_msssim) when both import, else None: the live comparison is an extra."""
    try:
        import pytorch_msssim
        import torch
    except ImportError:
        return None
    return torch, pytorch_msssim


@pytest.mark.parametrize("shape", [(176, 176), (192, 256), (181, 181), (200, 183)])
def test_ms_ssim_matches_pytorch_msssim(shape):
    a, b = ms_ssim_inputs(shape)
    got = L.ms_ssim(a, b, data_range=1.0)
    # pytorch_msssim builds its window in float32 (relative error ~1e-8 per tap): 1e-5 is ample.
    stored = reference_values()["ms_ssim"][f"{shape[0]}x{shape[1]}"]
    np.testing.assert_allclose(got, stored, rtol=0, atol=1e-5)
    live = _live_torch()
    if live is not None:
        torch, pm = live
        ref = pm.ms_ssim(torch.from_numpy(a)[:, None], torch.from_numpy(b)[:, None], data_range=1.0,
                         size_average=False)
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


def test_ssim_gaussian_valid_matches_pytorch_msssim_ssim():
    a, b = ssim_valid_inputs()
    got = L.ssim(a, b, data_range=1.0)
    np.testing.assert_allclose(got, reference_values()["ssim_valid"], rtol=0, atol=1e-6)
    live = _live_torch()
    if live is not None:
        torch, pm = live
        ref = pm.ssim(torch.from_numpy(a)[:, None], torch.from_numpy(b)[:, None], data_range=1.0,
                      size_average=False)
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-6)


def test_huber_and_smooth_l1_match_torch():
    a, b = huber_inputs()
    stored = reference_values()["pointwise"]
    ours = {"l1": L.l1(a, b), "mse": L.mse(a, b)}
    for delta in (0.1, 0.7, 2.0):
        ours[f"huber_{delta}"] = L.huber_loss(a, b, delta=delta)
        ours[f"smooth_l1_{delta}"] = L.smooth_l1_loss(a, b, beta=delta)
    assert set(ours) == set(stored)
    for name, value in ours.items():
        assert abs(value - stored[name]) < 1e-12, name
    live = _live_torch()
    if live is not None:
        F = live[0].nn.functional
        ta, tb = live[0].from_numpy(a), live[0].from_numpy(b)
        for delta in (0.1, 0.7, 2.0):
            assert abs(ours[f"huber_{delta}"] - F.huber_loss(ta, tb, delta=delta).item()) < 1e-12
            assert abs(ours[f"smooth_l1_{delta}"] - F.smooth_l1_loss(ta, tb, beta=delta).item()) < 1e-12
        assert abs(ours["l1"] - F.l1_loss(ta, tb).item()) < 1e-12
        assert abs(ours["mse"] - F.mse_loss(ta, tb).item()) < 1e-12


# ------------------------------------------------------------------ Ceres correspondence
# Transcriptions of ceres/loss_function.cc: Evaluate(s) -> (rho(s), rho'(s)).


def ceres_huber(s, a):
    b = a * a
    if s > b:
        r = math.sqrt(s)
        return 2 * a * r - b, max(a / r, np.finfo(float).tiny)
    return s, 1.0


def ceres_cauchy(s, a):
    b = a * a
    c = 1 / b
    return b * math.log1p(s * c), 1 / (1 + s * c)


@pytest.mark.parametrize("scale", [0.3, 1.0, 5.0])
def test_huber_and_cauchy_are_half_ceres_rho(scale):
    r = np.concatenate([np.linspace(-20, 20, 401), [scale, -scale, 0.0]])
    for mine, ceres in ((L.huber, ceres_huber), (L.cauchy, ceres_cauchy)):
        value, grad = mine(r, scale, gradient=True)
        for ri, vi, gi in zip(r, value, grad):
            rho, drho = ceres(ri * ri, scale)
            assert vi == pytest.approx(0.5 * rho, rel=1e-13, abs=1e-15)
            # d/dr [rho(r^2)/2] = rho'(r^2) r
            assert gi == pytest.approx(drho * ri, rel=1e-13, abs=1e-15)


def test_robust_penalty_derivatives_match_fd():
    r = np.array([-3.1, -0.71, -0.2, 0.05, 0.4, 0.93, 2.5])
    for fn in (partial(L.huber, delta=0.8), partial(L.cauchy, scale=0.6)):
        _, g = fn(r, gradient=True)
        fd = (fn(r + FD_STEP) - fn(r - FD_STEP)) / (2 * FD_STEP)
        np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-10)


# ============================================================================= gradients


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_gradient_matches_central_differences(name, weighted):
    shape = (13, 14)
    fn, _ = get_loss(name, shape)
    model, observed = make_pair(shape, seed=21)
    weight = make_weight(shape) if weighted else None
    if weighted:  # excluded pixels hold NaN: the gradient must not see them
        model = np.where(weight > 0, model, np.nan)
        observed = np.where(weight > 0, observed, np.nan)
    assert_grad_matches_fd(fn, model, observed, weight)
    if weighted:
        _, grad = fn(model, observed, weight, gradient=True)
        assert np.all(grad[weight == 0] == 0)


@pytest.mark.parametrize("name", ["mse", "huber_loss", "ssim_loss[gaussian,population,valid]", "ms_ssim_loss[win5]",
                                  "gradient_loss[p=2]", "fourier_loss[p=1,cutoff]", "enl_loss", "combined"])
def test_gradient_on_a_stack(name):
    shape = (3, 13, 14)
    fn, _ = get_loss(name, shape)
    model, observed = make_pair(shape, seed=22)
    weight = make_weight(shape[1:])  # broadcast over the stack
    value, grad = fn(model, observed, weight, gradient=True)
    assert np.shape(value) == (3,)
    for i in range(3):  # a stack is independent images
        vi, gi = fn(model[i], observed[i], weight, gradient=True)
        assert value[i] == pytest.approx(vi, rel=1e-12, abs=1e-15)
        np.testing.assert_allclose(grad[i], gi, rtol=1e-12, atol=1e-15)
    rng = np.random.default_rng(0)
    idx = [tuple(rng.integers(0, s) for s in shape) for _ in range(25)]
    assert_grad_matches_fd(fn, model, observed, weight, indices=idx)


@pytest.mark.parametrize("weighted", [False, True])
def test_ms_ssim_five_scale_gradient(weighted):
    shape = (164, 170)  # five scales, with odd sizes at the coarser ones (41 -> 21 -> 11)
    model, observed = make_pair(shape, seed=23)
    weight = make_weight(shape) if weighted else None
    fn = partial(L.ms_ssim, data_range=1.0)
    value, grad = fn(model, observed, weight, gradient=True)
    rng = np.random.default_rng(1)
    idx = [tuple(rng.integers(0, s) for s in shape) for _ in range(12)]
    # On a 28,000-pixel image one pixel moves the value by ~1e-3 * h while the value
    # itself carries ~1e-14 of rounding: h = 1e-3 keeps that noise below 1e-8 of the
    # gradient, and the truncation error (h^2 times the third derivative) is smaller
    # still (measured error ~5e-9 here; ~2e-6 with h = 1e-6).
    assert_grad_matches_fd(fn, model, observed, weight, indices=idx, h=1e-3)
    # directional derivatives along random directions test every pixel at once
    for _ in range(2):
        v = rng.standard_normal(shape)
        h = 1e-5
        fd = (fn(model + h * v, observed, weight) - fn(model - h * v, observed, weight)) / (2 * h)
        assert np.sum(grad * v) == pytest.approx(fd, rel=1e-6)


def test_weighted_image_residual_and_jacobian():
    model, observed = make_pair((6, 7), seed=3)
    w = make_weight((6, 7))
    r, jac = L.weighted_image_residual(model, observed, w, gradient=True)
    np.testing.assert_allclose(r, np.sqrt(w) * (model - observed), rtol=1e-15)
    np.testing.assert_allclose(np.sum(r**2) / np.sum(w), L.weighted_mse(model, observed, w), rtol=1e-13)
    for idx in [(0, 0), (3, 4), (5, 6)]:
        fd = central_fd(lambda m: L.weighted_image_residual(m, observed, w)[idx], model, FD_STEP, [idx])[0]
        assert jac[idx] == pytest.approx(fd, rel=1e-8, abs=1e-12)
    w[1, 1] = -2.0  # negative weights are clipped to 0
    assert L.weighted_image_residual(model, observed, w)[1, 1] == 0.0


# ============================================================================= invariances


SSIM_CONFIGS = [
    dict(window=win, covariance=cov, border=border)
    for win in ("gaussian", "uniform")
    for cov in ("population", "sample")
    for border in ("valid", "reflect")
]


@pytest.mark.parametrize("opts", SSIM_CONFIGS, ids=lambda o: "-".join(o.values()))
def test_ssim_identity_symmetry_and_scale_invariance(opts):
    a, b = make_pair((2, 23, 29), seed=30)
    w = make_weight((23, 29))
    for weight in (None, w):
        np.testing.assert_allclose(L.ssim(a, a, weight, data_range=1.0, **opts), 1.0, rtol=0, atol=1e-12)
        ab = L.ssim(a, b, weight, data_range=1.0, **opts)
        assert np.all(ab < 1.0) and np.all(ab > -1.0)
        np.testing.assert_allclose(ab, L.ssim(b, a, weight, data_range=1.0, **opts), rtol=1e-13)
        # C1, C2 scale with data_range^2: SSIM is invariant under a common scaling
        np.testing.assert_allclose(ab, L.ssim(7.5 * a, 7.5 * b, weight, data_range=7.5, **opts), rtol=1e-11)
    np.testing.assert_allclose(L.ms_ssim(a, a, data_range=1.0, win_size=7), 1.0, atol=1e-12)


def test_per_image_data_range_on_a_stack():
    a, b = make_pair((3, 12, 13), seed=46)
    R = np.array([0.5, 1.0, 4.0])
    for fn in (L.ssim, L.ms_ssim, L.psnr):
        got = fn(a, b, data_range=R)
        np.testing.assert_allclose(got, [fn(a[i], b[i], data_range=R[i]) for i in range(3)], rtol=1e-13)
    with pytest.raises(ValueError, match="broadcast"):
        L.ssim(a, b, data_range=np.ones(2))


def test_ssim_without_scipy_gives_the_same_result(monkeypatch):
    # SciPy's correlate1d only accelerates long lines; the slice-sum fallback must agree.
    import pixelrefine.losses.structural_similarity as ssim_module

    a, b = make_pair((2, 40, 70), seed=45)  # 70 columns: the correlate1d path when SciPy is present
    w = make_weight((40, 70))
    opts = dict(data_range=1.0, border="reflect", gradient=True)
    v0, g0 = L.ssim(a, b, w, **opts)
    m0 = L.ms_ssim(a, b, data_range=1.0, win_size=7)
    monkeypatch.setattr(ssim_module, "correlate1d", None)
    v1, g1 = L.ssim(a, b, w, **opts)
    np.testing.assert_allclose(v1, v0, rtol=1e-13)
    np.testing.assert_allclose(g1, g0, rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(L.ms_ssim(a, b, data_range=1.0, win_size=7), m0, rtol=1e-13)


def test_ssim_reflect_border_matches_full_map_reference():
    ndi = pytest.importorskip("scipy.ndimage")
    a, b = make_pair((19, 24), seed=31)
    sigma, r = 1.5, 5
    f = lambda z: ndi.gaussian_filter(z, sigma, truncate=r / sigma, mode="reflect")  # noqa: E731
    C1, C2 = 0.01**2, 0.03**2
    mx, my = f(a), f(b)
    vx, vy, cxy = f(a * a) - mx**2, f(b * b) - my**2, f(a * b) - mx * my
    S = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    assert L.ssim(a, b, data_range=1.0, border="reflect") == pytest.approx(S.mean(), abs=1e-12)


def brute_force_masked_ssim(x, y, w, k1d, C1, C2):
    """Direct loops over windows: weighted local statistics, A-weighted mean."""
    K = k1d.size
    g = np.outer(k1d, k1d)
    num = den = 0.0
    for i in range(x.shape[0] - K + 1):
        for j in range(x.shape[1] - K + 1):
            kw = g * w[i : i + K, j : j + K]
            A = kw.sum()
            if A == 0:
                continue
            xs, ys = x[i : i + K, j : j + K], y[i : i + K, j : j + K]
            xs, ys = np.where(kw > 0, xs, 0), np.where(kw > 0, ys, 0)
            mx, my = (kw * xs).sum() / A, (kw * ys).sum() / A
            vx = (kw * (xs - mx) ** 2).sum() / A
            vy = (kw * (ys - my) ** 2).sum() / A
            cxy = (kw * (xs - mx) * (ys - my)).sum() / A
            S = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
            num += A * S
            den += A
    return num / den


def test_masked_ssim_matches_brute_force_definition():
    a, b = make_pair((15, 17), seed=32)
    w = make_weight((15, 17), zero_fraction=0.3)
    a_nan = np.where(w > 0, a, np.nan)
    for window, k1d in (("gaussian", L.gaussian_window(7)), ("uniform", L.uniform_window(5))):
        ref = brute_force_masked_ssim(a, b, w, k1d, 0.01**2, 0.03**2)
        got = L.ssim(a_nan, b, w, data_range=1.0, window=window, win_size=k1d.size)
        assert got == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_unit_weight_equals_no_weight(name):
    shape = (2, 12, 15)
    fn, _ = get_loss(name, shape)
    a, b = make_pair(shape, seed=33)
    v0, g0 = fn(a, b, gradient=True)
    v1, g1 = fn(a, b, np.ones(shape[1:]), gradient=True)
    np.testing.assert_allclose(v1, v0, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g1, g0, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", list(LOSSES))
def test_masked_pixels_do_not_change_the_value(name):
    shape = (12, 15)
    fn, _ = get_loss(name, shape)
    a, b = make_pair(shape, seed=34)
    mask = make_weight(shape) > 0
    results = []
    for fill in (np.nan, np.inf, -1e30, 123.0):
        am, bm = np.where(mask, a, fill), np.where(mask, b, -fill)
        results.append(fn(am, bm, mask, gradient=True))
    for v, g in results:
        assert np.isfinite(v)
        assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)
        assert v == pytest.approx(results[0][0], rel=1e-12, abs=1e-15)
        np.testing.assert_allclose(g, results[0][1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(LOSSES))
def test_negative_and_nan_weights_act_as_zero(name):
    shape = (12, 15)
    fn, _ = get_loss(name, shape)
    a, b = make_pair(shape, seed=44)
    w = make_weight(shape)
    bad = w.copy()
    zero = np.flatnonzero(w == 0)
    bad.flat[zero[::2]] = -3.0
    bad.flat[zero[1::2]] = np.nan
    v0, g0 = fn(a, b, w, gradient=True)
    v1, g1 = fn(a, b, bad, gradient=True)
    assert v1 == pytest.approx(v0, rel=1e-13, abs=1e-15)
    np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-15)


def test_pixelwise_identities():
    a, b = make_pair((2, 9, 10), seed=35, noise=0.5)
    w = make_weight((9, 10))
    np.testing.assert_allclose(L.mse(a, b, w), L.mse(b, a, w), rtol=1e-15)
    np.testing.assert_allclose(
        L.weighted_mse(a, b, w), (w * (a - b) ** 2).sum((1, 2)) / w.sum(), rtol=1e-13
    )
    # Huber -> MSE/2 for delta above every residual; -> delta*(L1 - delta/2) for tiny delta
    np.testing.assert_allclose(L.huber_loss(a, b, w, delta=100.0), 0.5 * L.mse(a, b, w), rtol=1e-13)
    d = 1e-9
    np.testing.assert_allclose(L.huber_loss(a, b, w, delta=d), d * L.l1(a, b, w) - 0.5 * d * d, rtol=1e-6)
    np.testing.assert_allclose(L.smooth_l1_loss(a, b, w, beta=1e-9), L.l1(a, b, w), rtol=1e-6)
    # Cauchy -> MSE/2 for a large scale
    np.testing.assert_allclose(L.cauchy_loss(a, b, w, scale=1e4), 0.5 * L.mse(a, b, w), rtol=1e-7)
    # psnr is 10 log10(L^2 / mse)
    np.testing.assert_allclose(L.psnr(a, b, w, data_range=2.0), 10 * np.log10(4.0 / L.mse(a, b, w)), rtol=1e-13)


def test_fourier_parseval_and_highpass():
    a, b = make_pair((2, 12, 15), seed=36)
    w = make_weight((12, 15))
    # unitary DFT: p = 2 without a filter is the (weighted) MSE
    np.testing.assert_allclose(L.fourier_loss(a, b), L.mse(a, b), rtol=1e-12)
    np.testing.assert_allclose(L.fourier_loss(a, b, w), L.mse(a, b, w), rtol=1e-12)
    # the high-pass ignores a constant offset, the plain loss does not
    assert L.fourier_loss(a, a + 3.0, highpass=0.1) == pytest.approx(0.0, abs=1e-20)
    assert np.all(L.fourier_loss(a, a + 3.0) > 1.0)
    # p = 1 unweighted is seed 003's mean |fft2(m) - fft2(o)| with norm="ortho"
    ref = np.abs(np.fft.fft2(a, norm="ortho") - np.fft.fft2(b, norm="ortho")).mean(axis=(1, 2))
    np.testing.assert_allclose(L.fourier_loss(a, b, p=1), ref, rtol=1e-12)


def test_log_domain_is_the_loss_of_transformed_images():
    a, b = make_pair((10, 11), seed=37)
    b[0, :3] = -5.0  # background-subtracted values below -offset are clamped
    for db in (False, True):
        wrapped = L.log_domain(L.mse, offset=1.0, floor=1e-3, db=db)
        t = partial(L.log_transform, offset=1.0, floor=1e-3, db=db)
        assert wrapped(a, b) == pytest.approx(L.mse(t(a), t(b)), rel=1e-14)
    assert np.all(np.isfinite(L.log_transform(b)))
    np.testing.assert_allclose(L.log_transform(np.array([9.0]), db=True), [10.0], rtol=1e-14)


def test_enl_definition_and_loss():
    rng = np.random.default_rng(38)
    looks = 4
    speckle = rng.gamma(looks, 1.0 / looks, size=(200, 200)) * 50.0  # ENL of gamma(L) speckle = L
    assert L.enl(speckle) == pytest.approx(looks, rel=0.05)
    a, b = make_pair((9, 8), seed=39)
    w = make_weight((9, 8))
    mu = (w * a).sum() / w.sum()
    var = (w * (a - mu) ** 2).sum() / w.sum()
    assert L.enl(a, w) == pytest.approx(mu**2 / (var + 1e-8), rel=1e-12)
    assert L.enl_loss(a, b, w) == pytest.approx((L.enl(a, w) - L.enl(b, w)) ** 2, rel=1e-12)


def test_combined_loss_reports_components():
    loss = _combined()
    a, b = make_pair((2, 12, 13), seed=40)
    w = make_weight((12, 13))
    report = loss.evaluate(a, b, w, gradient=True)
    assert set(report.components) == {"mse", "ssim", "edges", "tv"}
    parts = {
        "mse": L.mse(a, b, w, gradient=True),
        "ssim": L.ssim_loss(a, b, w, data_range=1.0, gradient=True),
        "edges": L.gradient_loss(a, b, w, gradient=True),
        "tv": L.total_variation(a, w, gradient=True),
    }
    coef = {t.name: t.coefficient for t in loss.terms}
    for k, (v, _) in parts.items():
        np.testing.assert_allclose(report.components[k], v, rtol=1e-14)
    np.testing.assert_allclose(report.value, sum(coef[k] * v for k, (v, _) in parts.items()), rtol=1e-14)
    np.testing.assert_allclose(report.grad, sum(coef[k] * g for k, (_, g) in parts.items()), rtol=1e-12)
    value, grad = loss(a, b, w, gradient=True)
    np.testing.assert_allclose(value, report.value, rtol=0)
    with pytest.raises(ValueError, match="unique"):
        L.CombinedLoss([("a", 1, L.mse), ("a", 1, L.l1)])
    with pytest.raises(ValueError, match=">= 0"):
        L.CombinedLoss([("a", -1, L.mse)])


def test_derivative_losses_vanish_on_their_null_space():
    yy, xx = np.mgrid[:9, :12].astype(float)
    a, _ = make_pair((9, 12), seed=41)
    # Sobel and Laplacian of a constant offset are 0; Laplacian of a plane is 0
    assert L.gradient_loss(a, a + 2.5) == pytest.approx(0.0, abs=1e-12)
    assert L.laplacian_loss(a, a + 0.3 * xx - 1.1 * yy + 4) == pytest.approx(0.0, abs=1e-12)
    assert L.gradient_loss(a, a + 0.3 * xx) > 0.1
    assert L.total_variation(np.full((5, 6), 3.0)) == 0.0
    assert L.total_variation(xx) == pytest.approx(1.0)  # unit steps along x, none along y


# ============================================================================= edge cases


def _ssim_global_reference(x, y, k1d, data_range):
    """SSIM of one window covering the whole (square, odd) image."""
    g = np.outer(k1d, k1d)
    mx, my = (g * x).sum(), (g * y).sum()
    vx, vy = (g * (x - mx) ** 2).sum(), (g * (y - my) ** 2).sum()
    cxy = (g * (x - mx) * (y - my)).sum()
    C1, C2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))


def _edge_case(case):
    """(model, observed, weight) for one row of the edge-case table."""
    rng = np.random.default_rng(50)
    if case == "constant_identical":
        return np.full((8, 9), 4.0), np.full((8, 9), 4.0), None
    if case == "constant_different":
        return np.full((8, 9), 4.0), np.full((8, 9), 3.0), None
    if case == "zero_weights":
        a, b = make_pair((8, 9), seed=51)
        return a, b, np.zeros((8, 9))
    if case == "nan_in_masked":
        a, b = make_pair((8, 9), seed=52)
        w = make_weight((8, 9), zero_fraction=0.3)
        return np.where(w > 0, a, np.nan), np.where(w > 0, b, np.nan), w
    if case == "negative_values":  # background-subtracted counts, five decades
        a = rng.normal(0.0, 3.0, (8, 9)) + np.where(rng.random((8, 9)) < 0.1, 1e4, 0.0)
        return a, a + rng.normal(0, 3.0, a.shape), None
    if case == "1x1":
        return np.array([[0.7]]), np.array([[0.2]]), None
    if case == "5x5":
        a, b = make_pair((5, 5), seed=53)
        return a, b, None
    raise KeyError(case)


EDGE_CASES = ["constant_identical", "constant_different", "zero_weights", "nan_in_masked", "negative_values", "1x1", "5x5"]


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_case_table(case, name):
    model, observed, weight = _edge_case(case)
    fn, is_loss = get_loss(name, model.shape)
    value, grad = fn(model, observed, weight, gradient=True)
    assert grad.shape == model.shape
    assert np.all(np.isfinite(grad)), "the gradient is always finite"
    if case == "zero_weights":
        assert np.all(grad == 0)
        if is_loss:
            assert value == 0.0
        elif name != "total_variation":
            assert np.isnan(value)  # a metric of no data is undefined (NaN), never a number
        return
    if case == "constant_identical" and name != "enl":
        # every loss is at its minimum: value 0 (similarity 1), zero gradient
        expected = 1.0 if name in ("ssim", "ms_ssim") else 0.0
        assert value == pytest.approx(expected, abs=1e-12)
        np.testing.assert_allclose(grad, 0.0, atol=1e-12)
        return
    assert np.isfinite(value)
    if case == "nan_in_masked":
        assert np.all(grad[weight == 0] == 0)
    if name in ("ssim", "ms_ssim"):
        assert -1.0 <= value <= 1.0


def test_edge_case_values_are_the_documented_ones():
    # 1x1: the window shrinks to one pixel, SSIM is the luminance term only
    x, y = 0.7, 0.2
    C1 = 0.01**2
    assert L.ssim([[x]], [[y]], data_range=1.0) == pytest.approx((2 * x * y + C1) / (x * x + y * y + C1), rel=1e-14)
    assert L.ssim([[x]], [[y]], data_range=1.0, covariance="sample") == L.ssim([[x]], [[y]], data_range=1.0)
    assert L.ms_ssim([[x]], [[y]], data_range=1.0) == pytest.approx(
        L.ssim([[x]], [[y]], data_range=1.0) ** sum(L.MS_SSIM_WEIGHTS), rel=1e-14
    )
    # 5x5: one Gaussian window (5 taps, sigma 1.5) over the whole box
    a, b = make_pair((5, 5), seed=53)
    ref = _ssim_global_reference(a, b, L.gaussian_window(5, 1.5), 1.0)
    assert L.ssim(a, b, data_range=1.0) == pytest.approx(ref, rel=1e-12)
    assert L.effective_win_size(11, (5, 5)) == 5 and L.effective_win_size(11, (6, 8)) == 5
    # constant images: SSIM reduces to the luminance term (the variances, computed
    # as E[x^2] - E[x]^2, carry ~1e-15 of rounding, ~1e-12 relative to C2 = 9e-4)
    c = L.ssim(np.full((8, 9), 4.0), np.full((8, 9), 3.0), data_range=1.0)
    assert c == pytest.approx((2 * 12 + C1) / (16 + 9 + C1), rel=1e-10)
    # stencil losses on images smaller than the stencil, TV of one pixel
    assert L.gradient_loss([[1.0, 2.0]], [[0.0, 5.0]]) == 0.0
    assert L.total_variation([[3.0]]) == 0.0
    # identical images: PSNR is +inf; no valid pixel: NaN
    assert L.psnr(a, a, data_range=1.0) == np.inf
    assert np.isnan(L.psnr(a, b, np.zeros((5, 5)), data_range=1.0))
    # ENL: a constant region gives mu^2 / eps; an empty region NaN
    assert L.enl(np.full((4, 4), 2.0)) == pytest.approx(4.0 / 1e-8)
    assert np.isnan(L.enl(a, np.zeros((5, 5))))
    # zero weights: seed 000's floor gives 0, not NaN
    assert L.weighted_mse(a, b, np.zeros((5, 5))) == 0.0


@pytest.mark.parametrize("name", list(LOSSES))
def test_mismatched_shapes_raise_a_clear_error(name):
    fn, _ = get_loss(name, (6, 7))
    if name not in SINGLE_IMAGE:
        with pytest.raises(ValueError, match="same shape"):
            fn(np.zeros((6, 7)), np.zeros((7, 6)))
    with pytest.raises(ValueError, match="broadcast"):
        fn(np.zeros((6, 7)), np.zeros((6, 7)), np.ones((3, 3)))


def test_other_argument_errors():
    a, b = make_pair((8, 8), seed=60)
    with pytest.raises(ValueError, match="data_range is required"):
        L.ssim(a, b)
    with pytest.raises(ValueError, match="data_range is required"):
        L.ms_ssim_loss(a, b)
    with pytest.raises(ValueError, match="explicit data_range"):
        L.psnr(a, b, data_range=None)
    with pytest.raises(ValueError, match="data_range must be finite and > 0"):
        L.ssim(a, b, data_range=0.0)
    with pytest.raises(ValueError, match="odd"):
        L.ssim(a, b, data_range=1.0, win_size=4)
    with pytest.raises(ValueError, match="image"):
        L.mse(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="delta"):
        L.huber_loss(a, b, delta=0.0)
    with pytest.raises(ValueError, match="p must be"):
        L.gradient_loss(a, b, p=3)
    with pytest.raises(ValueError, match="highpass filter of shape"):
        L.fourier_loss(a, b, highpass=np.ones((3, 3)))
    with pytest.raises(ValueError, match="floor"):
        L.log_domain(L.mse, floor=0.0)


# ============================================================================= shoeboxes


def make_shoeboxes(shapes, seed=70, mask_fraction=0.1):
    """Concatenated shoeboxes in the file layout, plus the per-box arrays."""
    rng = np.random.default_rng(seed)
    boxes = []
    for ny, nx in shapes:
        yy, xx = np.mgrid[:ny, :nx]
        amp = 10 ** rng.uniform(0, 4)
        bg = rng.uniform(0, 20)
        mu = bg + amp * np.exp(-((yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2) / 4.0)
        var = mu + 1.0
        obs = (rng.poisson(mu) - bg).astype(np.float32) + np.float32(bg)
        mask = (rng.random((ny, nx)) > mask_fraction).astype(np.uint8)
        boxes.append((obs, mu, var, mask))
    sizes = [ny * nx for ny, nx in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    flat = [np.concatenate([b[i].ravel() for b in boxes]) for i in range(4)]
    return flat, offsets, np.asarray(shapes, dtype=np.int32), boxes


def test_shoebox_metrics_match_per_box_definitions():
    shapes = [(5, 5), (7, 7), (15, 15), (7, 7), (9, 11), (5, 5), (13, 12)]
    (obs, mu, var, mask), offsets, shp, boxes = make_shoeboxes(shapes)
    res = L.shoebox_metrics(obs, mu, var, mask, offsets, shp)
    for i, (o, m, v, k) in enumerate(boxes):
        o = o.astype(np.float64)
        valid = k == 1
        n = valid.sum()
        assert res.n_valid[i] == n
        assert res.chi2[i] == pytest.approx(((o - m) ** 2 / v)[valid].sum() / n, rel=1e-12)
        R = m[valid].max() - m[valid].min()
        assert res.psnr[i] == pytest.approx(10 * np.log10(R * R / ((o - m) ** 2)[valid].mean()), rel=1e-12)
        win = L.effective_win_size(11, o.shape)
        ref = L.ssim(o, m, valid, data_range=R, win_size=win)
        assert res.ssim[i] == pytest.approx(ref, rel=1e-12)


def test_shoebox_ssim_agrees_with_skimage_on_unmasked_boxes():
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image is not installed: no reference SSIM")
    shapes = [(11, 11), (15, 15), (13, 17)]
    (obs, mu, var, mask), offsets, shp, boxes = make_shoeboxes(shapes, mask_fraction=0.0)
    res = L.shoebox_metrics(obs, mu, var, mask, offsets, shp)
    for i, (o, m, _, _) in enumerate(boxes):
        o = o.astype(np.float64)
        R = m.max() - m.min()
        ref = skm.structural_similarity(o, m, data_range=R, gaussian_weights=True, use_sample_covariance=False)
        assert res.ssim[i] == pytest.approx(ref, abs=1e-6)
        assert res.psnr[i] == pytest.approx(skm.peak_signal_noise_ratio(m, o, data_range=R), abs=1e-6)


def test_shoebox_metrics_edge_cases():
    shapes = [(5, 5), (5, 5), (7, 7), (7, 7), (5, 5)]
    (obs, mu, var, mask), offsets, shp, boxes = make_shoeboxes(shapes, mask_fraction=0.0)
    mask = mask.copy()
    obs = obs.copy()
    mu = mu.copy()
    var = var.copy()
    s = [slice(o, o + ny * nx) for o, (ny, nx) in zip(offsets, shapes)]
    mask[s[0]] = 0  # box 0: no valid pixel
    mu[s[1]] = 3.0  # box 1: flat model -> no data range
    mu[s[2]] = obs[s[2]]  # box 2: perfect fit -> PSNR inf, SSIM 1
    mask[s[3]][5] = 0  # box 3: a masked pixel holding garbage
    obs[s[3]][5] = np.nan
    var[s[4]][3] = 0.0  # box 4: a non-positive variance makes a pixel invalid
    res = L.shoebox_metrics(obs, mu, var, mask, offsets, shp)
    assert res.n_valid[0] == 0 and np.isnan(res.chi2[0]) and np.isnan(res.psnr[0]) and np.isnan(res.ssim[0])
    assert np.isfinite(res.chi2[1]) and np.isnan(res.psnr[1]) and np.isnan(res.ssim[1])
    assert res.chi2[2] == 0.0 and res.psnr[2] == np.inf and res.ssim[2] == pytest.approx(1.0, abs=1e-12)
    assert res.n_valid[3] == 48 and np.isfinite(res.chi2[3]) and np.isfinite(res.ssim[3])
    obs2 = obs.copy()
    obs2[s[3]][5] = 1e30
    assert L.shoebox_metrics(obs2, mu, var, mask, offsets, shp).ssim[3] == res.ssim[3]
    assert res.n_valid[4] == 24
    # the order of shoeboxes does not matter (grouping by shape is internal)
    perm = np.array([4, 2, 0, 3, 1])
    res_p = L.shoebox_metrics(obs, mu, var, mask, offsets[perm], shp[perm])
    for a, b in zip(res_p, res):
        np.testing.assert_array_equal(a, b[perm])


def test_shoebox_metrics_argument_errors():
    (obs, mu, var, mask), offsets, shp, _ = make_shoeboxes([(5, 5), (7, 7)])
    with pytest.raises(ValueError, match="outside"):
        L.shoebox_metrics(obs, mu, var, mask, offsets + 10, shp)
    with pytest.raises(ValueError, match="elements"):
        L.shoebox_metrics(obs, mu[:-1], var, mask, offsets, shp)
    with pytest.raises(ValueError, match="shapes must be"):
        L.shoebox_metrics(obs, mu, var, mask, offsets, shp[:1])
    with pytest.raises(ValueError, match=">= 1"):
        L.shoebox_metrics(obs, mu, var, mask, offsets, np.array([[5, 5], [0, 7]]))
    empty = L.shoebox_metrics(obs, mu, var, mask, np.zeros(0, np.int64), np.zeros((0, 2), np.int64))
    assert all(a.size == 0 for a in empty)
