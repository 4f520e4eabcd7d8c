r"""Equivalent number of looks (ENL) of a region and the ENL loss (seed 002).

Over the region given by a weight map / mask (weighted when not 0-1):

.. math::
    W = \sum_p w_p,\quad \mu = \frac{1}{W}\sum_p w_p x_p,\quad
    \sigma^2 = \frac{1}{W}\sum_p w_p (x_p - \mu)^2,\quad
    \mathrm{ENL} = \frac{\mu^2}{\sigma^2 + \varepsilon}

(population variance; :math:`\varepsilon = 10^{-8}` as in seed 002).  The loss
is :math:`(\mathrm{ENL}(m) - \mathrm{ENL}(o))^2` over the same region.
"""

from __future__ import annotations

import numpy as np

from ._common import as_image, as_image_pair, finish, prepare_weight, zero_fill

__all__ = ["enl", "enl_loss"]

_AXES = (-2, -1)


def _enl(x, w, eps, need_grad):
    """ENL per image and dENL/dx; NaN (and zero gradient) for an empty region."""
    if w is None:
        W = float(x.shape[-2] * x.shape[-1])
        mu = x.mean(axis=_AXES, keepdims=True)
        dev = x - mu
        var = (dev * dev).mean(axis=_AXES, keepdims=True)
        ww = 1.0
    else:
        W = w.sum(axis=_AXES, keepdims=True)
        safe = np.where(W > 0, W, 1.0)
        mu = (w * x).sum(axis=_AXES, keepdims=True) / safe
        dev = np.where(w > 0, x - mu, 0.0)
        var = (w * dev * dev).sum(axis=_AXES, keepdims=True) / safe
        ww = w
    den = var + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        E = mu * mu / den
        if w is not None:
            E = np.where(W > 0, E, np.nan)
        if not need_grad:
            return E[..., 0, 0], None
        dE = ww / (W if w is None else np.where(W > 0, W, 1.0)) * (
            2.0 * mu / den - 2.0 * mu * mu * dev / (den * den)
        )
    return E[..., 0, 0], dE


def _check_eps(eps):
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0; got {eps!r}")


def enl(image, weight=None, *, eps: float = 1e-8, gradient: bool = False):
    r"""Equivalent number of looks :math:`\mu^2/(\sigma^2 + \varepsilon)` over a region.

    Parameters
    ----------
    image : array_like, shape (..., H, W)
    weight : array_like, optional
        The (homogeneous) region as a mask or weights; ``None`` = whole image.
    eps : float, optional
        :math:`\varepsilon \ge 0` added to the variance.  With ``eps = 0`` a
        constant region gives ``inf`` (``nan`` if its mean is also 0).
    gradient : bool, optional
        If True, also return :math:`\partial\,\mathrm{ENL}/\partial x`.

    Returns
    -------
    value : float or ndarray
        ENL per image; NaN for an empty region.
    grad : ndarray
        Only if ``gradient`` is True.
    """
    _check_eps(eps)
    x = as_image(image, "image")
    w = prepare_weight(weight, x.shape)
    E, dE = _enl(zero_fill(x, w), w, eps, gradient)
    return (finish(E), dE) if gradient else finish(E)


def enl_loss(model, observed, weight=None, *, eps: float = 1e-8, gradient: bool = False):
    r"""ENL loss :math:`(\mathrm{ENL}(m) - \mathrm{ENL}(o))^2` over the region ``weight``.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
    weight : array_like, optional
        The homogeneous region (mask or weights); ``None`` = whole image.
    eps : float, optional
        As in :func:`enl`.
    gradient : bool, optional
        If True, also return the gradient with respect to ``model``.

    Returns
    -------
    value : float or ndarray
        0 (with zero gradient) for an empty region.
    grad : ndarray
        Only if ``gradient`` is True.

    Notes
    -----
    Seed 002 compares local ENL maps from 15x15 windows of the masked images;
    here the statistics are those of the region itself (defined for a 5x5
    shoebox, and not biased by zeros at the region's edge).
    """
    _check_eps(eps)
    m, o = as_image_pair(model, observed)
    w = prepare_weight(weight, m.shape)
    Em, dEm = _enl(zero_fill(m, w), w, eps, gradient)
    Eo, _ = _enl(zero_fill(o, w), w, eps, False)
    diff = Em - Eo
    empty = np.zeros(diff.shape, bool) if w is None else w.sum(axis=_AXES) == 0
    diff = np.where(empty, 0.0, diff)
    value = finish(diff * diff)
    if not gradient:
        return value
    with np.errstate(invalid="ignore"):
        grad = 2.0 * diff[..., None, None] * dEm
    return value, np.where(empty[..., None, None], 0.0, grad)
