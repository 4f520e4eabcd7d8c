"""Benchmarks of pixelrefine.losses on a 2048x2048 image and on 10,000 7x7 shoeboxes.

Run:  pytest benchmarks/test_bench_losses.py --benchmark-columns=min,mean,rounds --benchmark-group-by=group

Every loss is timed with its gradient (what a refinement calls) and a mask of
5% excluded pixels; the metrics shared with scikit-image are timed alongside
scikit-image's own (unmasked, as scikit-image has no mask).  Slow cases use
``benchmark.pedantic(rounds=3, iterations=1)`` to keep the run short on 2 cores.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

from pixelrefine import losses as L  # noqa: E402

BIG_SHAPE = (2048, 2048)
N_BOXES, BOX = 10_000, (7, 7)


def _data(shape, seed):
    """Counts-like model (background + spots over five decades) and a Poisson observation."""
    rng = np.random.default_rng(seed)
    model = rng.uniform(1.0, 20.0, shape) * 10.0 ** rng.uniform(0, 3, shape)
    observed = rng.poisson(model).astype(np.float64)
    mask = (rng.random(shape[-2:]) > 0.05).astype(np.float64)
    return model, observed, mask


@pytest.fixture(scope="module")
def big():
    return _data(BIG_SHAPE, 0)


@pytest.fixture(scope="module")
def boxes():
    return _data((N_BOXES,) + BOX, 1)


def _range(model):
    return float(model.max() - model.min())


def _tv(model, observed, weight=None, *, gradient=False):
    return L.total_variation(model, weight, gradient=gradient)


# name -> factory(model) -> loss callable (options that depend on the data bound here)
LOSSES = {
    "mse": lambda m: L.mse,
    "l1": lambda m: L.l1,
    "huber_loss": lambda m: partial(L.huber_loss, delta=10.0),
    "smooth_l1_loss": lambda m: partial(L.smooth_l1_loss, beta=10.0),
    "cauchy_loss": lambda m: partial(L.cauchy_loss, scale=10.0),
    "ssim_loss[gaussian11]": lambda m: partial(L.ssim_loss, data_range=_range(m)),
    "ssim_loss[uniform7,sample]": lambda m: partial(
        L.ssim_loss, data_range=_range(m), window="uniform", covariance="sample"
    ),
    "ms_ssim_loss": lambda m: partial(L.ms_ssim_loss, data_range=_range(m)),
    "gradient_loss": lambda m: L.gradient_loss,
    "laplacian_loss": lambda m: L.laplacian_loss,
    "total_variation": lambda m: _tv,
    "fourier_loss[highpass]": lambda m: partial(L.fourier_loss, highpass=0.1),
    "log_domain(mse)": lambda m: L.log_domain(L.mse),
    "enl_loss": lambda m: L.enl_loss,
    "combined[mse+ssim+sobel]": lambda m: L.CombinedLoss(
        [
            ("mse", 1.0, L.mse),
            ("ssim", 100.0, partial(L.ssim_loss, data_range=_range(m))),
            ("sobel", 0.1, L.gradient_loss),
        ]
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_and_gradient_2048(benchmark, big, name):
    model, observed, mask = big
    fn = LOSSES[name](model)
    benchmark.group = "loss + gradient, 2048x2048, masked"
    benchmark.pedantic(fn, args=(model, observed, mask), kwargs={"gradient": True}, rounds=3, iterations=1)


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_and_gradient_boxes(benchmark, boxes, name):
    model, observed, mask = boxes
    fn = LOSSES[name](model)
    benchmark.group = "loss + gradient, 10000 x 7x7 stack, masked"
    benchmark.pedantic(
        fn, args=(model, observed, mask), kwargs={"gradient": True}, rounds=10, iterations=1, warmup_rounds=1
    )


# --------------------------------------------------------------- metrics vs scikit-image


def _skimage_metrics():
    return pytest.importorskip("skimage.metrics", reason="scikit-image is not installed: no reference timing")


# name -> (ours(m, o, R), skimage(skm, m, o, R) or None)
METRICS = {
    "ssim[gaussian11,population]": (
        lambda m, o, R: L.ssim(m, o, data_range=R),
        lambda skm, m, o, R: skm.structural_similarity(
            m, o, data_range=R, gaussian_weights=True, use_sample_covariance=False
        ),
    ),
    "ssim[uniform7,sample]": (
        lambda m, o, R: L.ssim(m, o, data_range=R, window="uniform", covariance="sample"),
        lambda skm, m, o, R: skm.structural_similarity(m, o, data_range=R),
    ),
    "ssim+gradient[uniform7,sample]": (
        lambda m, o, R: L.ssim(m, o, data_range=R, window="uniform", covariance="sample", gradient=True),
        lambda skm, m, o, R: skm.structural_similarity(o, m, data_range=R, gradient=True),
    ),
    "psnr": (
        lambda m, o, R: L.psnr(m, o, data_range=R),
        lambda skm, m, o, R: skm.peak_signal_noise_ratio(m, o, data_range=R),
    ),
    "mse": (lambda m, o, R: L.mse(m, o), lambda skm, m, o, R: skm.mean_squared_error(m, o)),
    "ms_ssim": (lambda m, o, R: L.ms_ssim(m, o, data_range=R), None),
}


@pytest.mark.parametrize("impl", ["pixelrefine", "skimage"])
@pytest.mark.parametrize("name", list(METRICS))
def test_metric_2048(benchmark, big, name, impl):
    model, observed, _ = big
    R = _range(model)
    ours, theirs = METRICS[name]
    benchmark.group = f"metric {name}, 2048x2048"
    if impl == "pixelrefine":
        benchmark.pedantic(ours, args=(model, observed, R), rounds=3, iterations=1)
        return
    if theirs is None:
        pytest.skip("scikit-image has no MS-SSIM")
    skm = _skimage_metrics()
    benchmark.pedantic(theirs, args=(skm, model, observed, R), rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["pixelrefine", "skimage"])
@pytest.mark.parametrize("name", [n for n in METRICS if n != "ssim[gaussian11,population]"])
def test_metric_boxes(benchmark, boxes, name, impl):
    """Per-box metrics of 10,000 7x7 shoeboxes: one stacked call against a loop of scikit-image calls.

    (scikit-image cannot use an 11-tap Gaussian window on a 7x7 image; its
    uniform 7x7 window is compared.)
    """
    model, observed, _ = boxes
    R = model.max(axis=(1, 2)) - model.min(axis=(1, 2))
    ours, theirs = METRICS[name]
    benchmark.group = f"metric {name}, 10000 x 7x7"
    if impl == "pixelrefine":
        benchmark.pedantic(ours, args=(model, observed, R), rounds=10, iterations=1, warmup_rounds=1)
        return
    if theirs is None:
        pytest.skip("scikit-image has no MS-SSIM")
    skm = _skimage_metrics()

    def loop():
        return [theirs(skm, model[i], observed[i], R[i]) for i in range(N_BOXES)]

    benchmark.pedantic(loop, rounds=3, iterations=1)


# --------------------------------------------------------------- shoebox_metrics (report)


def _flat_shoeboxes(shapes, seed):
    rng = np.random.default_rng(seed)
    sizes = shapes[:, 0] * shapes[:, 1]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    T = int(sizes.sum())
    model = rng.uniform(1.0, 20.0, T) * 10.0 ** rng.uniform(0, 3, T)
    observed = rng.poisson(model).astype(np.float32)
    variance = model + 1.0
    mask = (rng.random(T) > 0.05).astype(np.uint8)
    return observed, model, variance, mask, offsets, shapes


@pytest.mark.parametrize("layout", ["7x7", "mixed 5x5..15x15"])
def test_shoebox_metrics_10000(benchmark, layout):
    if layout == "7x7":
        shapes = np.full((N_BOXES, 2), 7, dtype=np.int32)
    else:
        shapes = np.random.default_rng(3).integers(5, 16, (N_BOXES, 2)).astype(np.int32)
    args = _flat_shoeboxes(shapes, 4)
    benchmark.group = "shoebox_metrics, 10000 shoeboxes"
    benchmark.pedantic(L.shoebox_metrics, args=args, rounds=10, iterations=1, warmup_rounds=1)
