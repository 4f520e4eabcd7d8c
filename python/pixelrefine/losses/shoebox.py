r"""Per-shoebox quality metrics for the ``report`` command.

Shoeboxes are stored concatenated in flat arrays (``/pixels/*`` of the shoebox
file): shoebox ``i`` occupies ``[offsets[i], offsets[i] + ny_i*nx_i)`` row-major
with ``shapes[i] = (ny_i, nx_i)``.  Shoeboxes of one shape are gathered into a
stack and evaluated together, so the cost is a few array operations per
distinct shape.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .structural_similarity import _ssim_core, effective_win_size, gaussian_window

__all__ = ["ShoeboxMetrics", "shoebox_metrics"]


class ShoeboxMetrics(NamedTuple):
    """Per-shoebox metrics (arrays of length M, the number of shoeboxes).

    Attributes
    ----------
    chi2 : ndarray of float64
        :math:`\\sum_p (o_p - \\mu_p)^2 / v_p / n_{\\mathrm{valid}}` (NaN if no valid pixel).
    psnr : ndarray of float64
        :math:`10\\log_{10}(L^2/\\mathrm{MSE})` in dB, :math:`L` the model's range.
    ssim : ndarray of float64
        Masked SSIM of observed against model (see :func:`shoebox_metrics`).
    n_valid : ndarray of int64
        Number of valid pixels.
    """

    chi2: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    n_valid: np.ndarray


def _flat(a, name, dtype=np.float64):
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (all shoeboxes concatenated); got shape {arr.shape}")
    return arr.astype(dtype, copy=False)


def shoebox_metrics(
    observed,
    model,
    variance,
    mask,
    offsets,
    shapes,
    *,
    sigma: float = 1.5,
    win_size: int = 11,
    K1: float = 0.01,
    K2: float = 0.03,
) -> ShoeboxMetrics:
    r"""Weighted chi², PSNR, SSIM and valid-pixel count of every shoebox.

    Parameters
    ----------
    observed : array_like, shape (T,)
        Observed counts (float32 in the file; may be negative).
    model : array_like, shape (T,)
        Expected counts :math:`\mu_p`.
    variance : array_like, shape (T,)
        Model variance :math:`v_p`.
    mask : array_like, shape (T,)
        Non-zero = valid (uint8 1 in the file).
    offsets : array_like of int, shape (M,)
        First element of each shoebox.
    shapes : array_like of int, shape (M, 2)
        ``(ny, nx)`` of each shoebox, both >= 1.
    sigma, win_size, K1, K2 : optional
        SSIM window and constants (defaults: Gaussian, sigma 1.5, 11 taps).

    Returns
    -------
    ShoeboxMetrics
        Named tuple of arrays ``chi2``, ``psnr``, ``ssim``, ``n_valid``.

    Notes
    -----
    *Valid pixel*: ``mask != 0`` and observed, model finite and variance finite
    and > 0; every other pixel is ignored whatever it holds.

    * ``chi2`` = :math:`\sum_{p\,\mathrm{valid}} (o_p-\mu_p)^2/v_p\,/\,n_{\mathrm{valid}}`.
    * ``psnr`` uses :math:`L = \max\mu - \min\mu` over the valid pixels and the
      MSE over the valid pixels; ``inf`` when MSE = 0 and :math:`L > 0`.
      Degenerate case: :math:`L = 0` (a flat model, or one valid pixel) gives
      NaN, as there is no signal range to compare the error to.
    * ``ssim`` is :func:`~pixelrefine.losses.ssim` of observed and model with
      the mask as weight, ``data_range`` :math:`L`, population covariance,
      'valid' border and a Gaussian window of ``sigma`` whose size is
      ``win_size`` shrunk to the largest odd size that fits the shoebox
      (5 for 5x5, 7 for 7x7, 11 from 11x11 up): a box up to 11x11 is one
      Gaussian-weighted window centred on the box.  NaN when :math:`L = 0`.
    * A shoebox with no valid pixel has ``n_valid = 0`` and NaN metrics.
    """
    for name, val in (("K1", K1), ("K2", K2)):
        if not np.isfinite(val) or val <= 0:
            raise ValueError(f"{name} must be finite and > 0; got {val!r}")
    obs = _flat(observed, "observed")
    mod = _flat(model, "model")
    var = _flat(variance, "variance")
    msk = _flat(mask, "mask", dtype=None)
    T = obs.size
    for name, arr in (("model", mod), ("variance", var), ("mask", msk)):
        if arr.size != T:
            raise ValueError(f"{name} has {arr.size} elements, observed has {T}")
    off = np.asarray(offsets)
    shp = np.asarray(shapes)
    if off.ndim != 1 or off.dtype.kind not in "iu":
        raise ValueError(f"offsets must be a 1-D integer array; got shape {off.shape}, dtype {off.dtype}")
    if shp.shape != (off.size, 2) or shp.dtype.kind not in "iu":
        raise ValueError(f"shapes must be an integer array of shape ({off.size}, 2); got {shp.shape}, {shp.dtype}")
    off = off.astype(np.int64)
    shp = shp.astype(np.int64)
    if np.any(shp < 1):
        i = int(np.flatnonzero((shp < 1).any(axis=1))[0])
        raise ValueError(f"shapes must be >= 1; shoebox {i} has shape {tuple(shp[i])}")
    end = off + shp[:, 0] * shp[:, 1]
    bad = (off < 0) | (end > T)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"shoebox {i} ([{off[i]}, {end[i]})) lies outside the {T} pixels")

    M = off.size
    chi2 = np.full(M, np.nan)
    psnr = np.full(M, np.nan)
    ssim = np.full(M, np.nan)
    n_valid = np.zeros(M, dtype=np.int64)
    if M == 0:
        return ShoeboxMetrics(chi2, psnr, ssim, n_valid)

    key = shp[:, 0] * (int(shp[:, 1].max()) + 1) + shp[:, 1]
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
    for sel in np.split(order, starts[1:]):
        ny, nx = (int(v) for v in shp[sel[0]])
        idx = off[sel, None] + np.arange(ny * nx)
        o = obs[idx].reshape(-1, ny, nx)
        m = mod[idx].reshape(-1, ny, nx)
        v = var[idx].reshape(-1, ny, nx)
        with np.errstate(invalid="ignore"):
            valid = (msk[idx].reshape(-1, ny, nx) != 0) & np.isfinite(o) & np.isfinite(m) & np.isfinite(v) & (v > 0)
        o = np.where(valid, o, 0.0)
        m = np.where(valid, m, 0.0)
        v = np.where(valid, v, 1.0)
        nv = valid.sum(axis=(1, 2))
        has = nv > 0
        denom = np.where(has, nv, 1)
        d2 = (o - m) ** 2
        chi2[sel] = np.where(has, (d2 / v).sum(axis=(1, 2)) / denom, np.nan)
        err = d2.sum(axis=(1, 2)) / denom
        L = np.where(valid, m, -np.inf).max(axis=(1, 2)) - np.where(valid, m, np.inf).min(axis=(1, 2))
        ok = has & (L > 0)
        Ls = np.where(ok, L, 1.0)
        with np.errstate(divide="ignore"):
            psnr[sel] = np.where(ok, 10.0 * np.log10(Ls * Ls / err), np.nan)
        k = gaussian_window(effective_win_size(win_size, (ny, nx)), sigma)
        C = Ls[:, None, None]
        s, _ = _ssim_core(o, m, valid.astype(np.float64), k, (K1 * C) ** 2, (K2 * C) ** 2,
                          False, "valid", "ssim", False)
        ssim[sel] = np.where(ok, s, np.nan)
        n_valid[sel] = nv
    return ShoeboxMetrics(chi2, psnr, ssim, n_valid)
