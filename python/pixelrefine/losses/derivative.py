r"""Losses on image derivatives: Sobel gradient loss, Laplacian loss, total variation.

Stencils are applied in 'valid' mode: an output exists only where the whole
3x3 stencil lies inside the image, and it counts with weight

.. math:: u_p = \min_{q \in \mathrm{stencil}(p)} w_q ,

the smallest weight among the pixels the stencil touches (its non-zero taps),
so that an output touching an excluded pixel is itself excluded.  Unweighted,
:math:`u \equiv 1`.  Because the stencils are linear, they act on the residual
:math:`d = m - o` (zeroed at excluded pixels).  An image with no complete
stencil (fewer than 3 rows or columns) has no term: the loss is 0.
"""

from __future__ import annotations

import numpy as np

from ._common import TINY_TOTAL, as_image, as_image_pair, finish, prepare_weight, zero_fill

__all__ = ["SOBEL_X", "SOBEL_Y", "LAPLACIAN", "gradient_loss", "laplacian_loss", "total_variation"]

#: Sobel derivative along columns (x), applied as a correlation.
SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
#: Sobel derivative along rows (y).
SOBEL_Y = SOBEL_X.T.copy()
#: Five-point Laplacian.
LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])

_AXES = (-2, -1)


def _out_shape(shape, kernel):
    return shape[-2] - kernel.shape[0] + 1, shape[-1] - kernel.shape[1] + 1


def _correlate_valid(a, kernel):
    Ho, Wo = _out_shape(a.shape, kernel)
    out = np.zeros(a.shape[:-2] + (Ho, Wo))
    for (i, j), c in np.ndenumerate(kernel):
        if c != 0:
            out += c * a[..., i : i + Ho, j : j + Wo]
    return out


def _correlate_valid_adjoint(g, kernel, shape):
    Ho, Wo = g.shape[-2:]
    out = np.zeros(tuple(shape))
    for (i, j), c in np.ndenumerate(kernel):
        if c != 0:
            out[..., i : i + Ho, j : j + Wo] += c * g
    return out


def _footprint_min(w, footprint):
    Ho, Wo = _out_shape(w.shape, footprint)
    out = None
    for (i, j), on in np.ndenumerate(footprint):
        if on:
            s = w[..., i : i + Ho, j : j + Wo]
            out = s.copy() if out is None else np.minimum(out, s)
    return out


def _check_p(p):
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2; got {p!r}")


def _stencil_loss(model, observed, weight, kernels, p, gradient):
    """``sum_p u_p sum_k |(K_k * d)_p|^p / sum_p u_p`` over valid outputs."""
    _check_p(p)
    m, o = as_image_pair(model, observed)
    w = prepare_weight(weight, m.shape)
    d = zero_fill(m, w) - zero_fill(o, w)
    Ho, Wo = _out_shape(d.shape, kernels[0])
    if Ho <= 0 or Wo <= 0:
        value = finish(np.zeros(d.shape[:-2]))
        return (value, np.zeros_like(d)) if gradient else value
    if w is None:
        u = None
        total = float(Ho * Wo)
    else:
        footprint = np.any([k != 0 for k in kernels], axis=0)
        u = _footprint_min(w, footprint)
        total = np.maximum(u.sum(axis=_AXES), TINY_TOTAL)[..., None, None]
    value = 0.0
    grad = np.zeros_like(d) if gradient else None
    for k in kernels:
        f = _correlate_valid(d, k)
        phi = np.abs(f) if p == 1 else f * f
        if u is not None:
            phi = u * phi
        value = value + phi.sum(axis=_AXES, keepdims=True) / total
        if gradient:
            dphi = np.sign(f) if p == 1 else 2.0 * f
            if u is not None:
                dphi = u * dphi
            grad += _correlate_valid_adjoint(dphi / total, k, d.shape)
    value = finish(np.asarray(value)[..., 0, 0])
    return (value, grad) if gradient else value


def gradient_loss(model, observed, weight=None, *, p: int = 1, gradient: bool = False):
    r"""Sobel gradient loss :math:`\sum_p u_p(|G_x d|^p + |G_y d|^p) / \sum_p u_p`.

    :math:`G_x, G_y` are the 3x3 Sobel stencils (:data:`SOBEL_X`,
    :data:`SOBEL_Y`) and :math:`d = m - o`; ``p = 1`` is the L1 form of seed 002
    (``l1(Gx m, Gx o) + l1(Gy m, Gy o)``), ``p = 2`` the squared form.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
    weight : array_like, optional
        Pixel weights or a mask; an output counts with the smallest weight of
        the eight pixels its stencils touch.
    p : {1, 2}, optional
        Exponent.  For ``p = 1`` the gradient uses :math:`\mathrm{sign}(0) = 0`.
    gradient : bool, optional
        If True, also return the gradient with respect to ``model``.

    Returns
    -------
    value : float or ndarray
        0 for images with fewer than 3 rows or columns.
    grad : ndarray
        Only if ``gradient`` is True.

    Notes
    -----
    Seed 002 pads with zeros and averages over all H*W outputs; here only the
    (H-2)(W-2) outputs whose stencil lies inside the image count, so no border
    value is invented.
    """
    return _stencil_loss(model, observed, weight, (SOBEL_X, SOBEL_Y), p, gradient)


def laplacian_loss(model, observed, weight=None, *, p: int = 1, gradient: bool = False):
    r"""Laplacian loss :math:`\sum_p u_p |(\nabla^2 d)_p|^p / \sum_p u_p`.

    :math:`\nabla^2` is the five-point stencil :data:`LAPLACIAN`; ``p = 1`` is
    seed 002's ``l1(lap(m), lap(o))``.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
    weight : array_like, optional
        Pixel weights or a mask; an output counts with the smallest weight of
        the five pixels of its stencil.
    p : {1, 2}, optional
        Exponent.
    gradient : bool, optional
        If True, also return the gradient with respect to ``model``.

    Returns
    -------
    value : float or ndarray
        0 for images with fewer than 3 rows or columns.
    grad : ndarray
        Only if ``gradient`` is True.
    """
    return _stencil_loss(model, observed, weight, (LAPLACIAN,), p, gradient)


def total_variation(image, weight=None, *, gradient: bool = False):
    r"""Anisotropic total variation, mean absolute forward difference along each axis.

    .. math::
        \mathrm{TV}(x) = \frac{\sum u^x_{ij}|x_{i,j+1} - x_{ij}|}{\sum u^x_{ij}}
                       + \frac{\sum u^y_{ij}|x_{i+1,j} - x_{ij}|}{\sum u^y_{ij}}

    with :math:`u` the smaller weight of the two pixels of each difference
    (1 unweighted: seed 002's ``diff_x.mean() + diff_y.mean()``).  A regulariser
    of one image; to use it in :class:`~pixelrefine.losses.CombinedLoss` mark the
    term ``regularizer=True``.

    Parameters
    ----------
    image : array_like, shape (..., H, W)
    weight : array_like, optional
        Pixel weights or a mask.
    gradient : bool, optional
        If True, also return the (sub)gradient, with :math:`\mathrm{sign}(0) = 0`.

    Returns
    -------
    value : float or ndarray
        An axis of length 1 contributes 0 (a 1x1 image has TV 0).
    grad : ndarray
        Only if ``gradient`` is True.
    """
    x = as_image(image, "image")
    w = prepare_weight(weight, x.shape)
    x = zero_fill(x, w)
    value = np.zeros(x.shape[:-2])
    grad = np.zeros_like(x) if gradient else None
    for axis in (-1, -2):
        n = x.shape[axis]
        if n < 2:
            continue
        hi = [slice(None)] * x.ndim
        lo = [slice(None)] * x.ndim
        hi[axis], lo[axis] = slice(1, None), slice(None, -1)
        hi, lo = tuple(hi), tuple(lo)
        diff = x[hi] - x[lo]
        if w is None:
            u = None
            total = float(diff.shape[-2] * diff.shape[-1])
            value = value + np.abs(diff).sum(axis=_AXES) / total
        else:
            u = np.minimum(w[hi], w[lo])
            total = np.maximum(u.sum(axis=_AXES), TINY_TOTAL)
            value = value + (u * np.abs(diff)).sum(axis=_AXES) / total
            total = total[..., None, None]
        if gradient:
            s = np.sign(diff) / total
            if u is not None:
                s = u * s
            grad[hi] += s
            grad[lo] -= s
    value = finish(value)
    return (value, grad) if gradient else value
