r"""Image-quality metrics: PSNR (SSIM and MSE are :func:`ssim` and :func:`mse`)."""

from __future__ import annotations

import numpy as np

from ._common import as_image_pair, finish, prepare_weight, resolve_data_range
from .pixelwise import mse

__all__ = ["psnr"]


def psnr(image_true, image_test, weight=None, *, data_range):
    r"""Peak signal-to-noise ratio :math:`10\log_{10}(L^2/\mathrm{MSE})` in dB.

    Parameters
    ----------
    image_true, image_test : array_like, shape (..., H, W)
        Reference and test images (or stacks) of identical shape.
    weight : array_like, optional
        Pixel weights or a mask; the MSE is the weighted mean of :func:`mse`.
    data_range : float or array_like
        :math:`L > 0` (scalar or one per image).  Always required.

    Returns
    -------
    value : float or ndarray
        PSNR per image: ``inf`` for identical images (MSE 0), NaN for an image
        with no valid pixel.

    Notes
    -----
    Equal to ``skimage.metrics.peak_signal_noise_ratio`` with the same
    ``data_range``.
    """
    if data_range is None:
        raise ValueError("psnr needs an explicit data_range (e.g. max - min of image_true)")
    x, y = as_image_pair(image_true, image_test, ("image_true", "image_test"))
    R = resolve_data_range(data_range, x, y, x.shape[:-2])[..., 0, 0]
    err = np.asarray(mse(x, y, weight))
    with np.errstate(divide="ignore"):
        value = 10.0 * np.log10(R * R / err)
    if weight is not None:
        empty = prepare_weight(weight, x.shape).sum(axis=(-2, -1)) == 0
        value = np.where(empty, np.nan, value)
    return finish(value)
