r"""Pixel-wise losses: weighted residual, (weighted) MSE, L1, Huber, smooth-L1, Cauchy.

Every loss here is a weighted mean of a per-pixel penalty :math:`\varphi` of the
difference :math:`d_p = m_p - o_p` (model minus observed):

.. math:: L = \frac{\sum_p w_p\,\varphi(d_p)}{\max(\sum_p w_p,\ 10^{-12})}

with :math:`w_p = \max(w_p, 0)` and :math:`w \equiv 1` when no weight is given
(then :math:`L` is the plain mean over the :math:`N = HW` pixels).  This is the
normalisation of seed 000 (``weighted_mean_squared_error``).
"""

from __future__ import annotations

import numpy as np

from ._common import TINY_TOTAL, as_image_pair, finish, prepare_weight, zero_fill
from .robust import cauchy, huber

__all__ = [
    "weighted_image_residual",
    "mse",
    "weighted_mse",
    "l1",
    "huber_loss",
    "smooth_l1_loss",
    "cauchy_loss",
]

_AXES = (-2, -1)


def weighted_image_residual(model, observed, weight=None, *, gradient: bool = False):
    r"""Weighted least-squares residual field :math:`r_p = \sqrt{w_p}\,(m_p - o_p)`.

    Minimising :math:`\sum_p r_p^2` is weighted least squares (seed 000).  With
    :math:`w_p = 1/v_p` these are the normalised residuals of the per-pixel
    objective.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
        Model and observed images (or stacks) of identical shape.
    weight : array_like, optional
        Non-negative weights broadcastable to the image shape; negative and NaN
        entries are clipped to 0, and zero-weight pixels give ``r = 0`` whatever
        they hold.  ``None`` means :math:`w \equiv 1`.
    gradient : bool, optional
        If True, also return the diagonal Jacobian :math:`\partial r_p/\partial m_p`.

    Returns
    -------
    residual : ndarray, shape (..., H, W)
    jacobian : ndarray, shape (..., H, W)
        :math:`\sqrt{w_p}` (ones when unweighted).  Only if ``gradient``.
    """
    m, o = as_image_pair(model, observed)
    w = prepare_weight(weight, m.shape)
    if w is None:
        r = m - o
        return (r, np.ones_like(r)) if gradient else r
    sw = np.sqrt(w)
    r = sw * (zero_fill(m, w) - zero_fill(o, w))
    return (r, sw) if gradient else r


def _weighted_mean_penalty(model, observed, weight, penalty, gradient):
    """Apply ``penalty(d, need_grad) -> (phi, dphi)`` and reduce as a weighted mean."""
    m, o = as_image_pair(model, observed)
    w = prepare_weight(weight, m.shape)
    if w is None:
        d = m - o
        total = float(d.shape[-2] * d.shape[-1])
        phi, dphi = penalty(d, gradient)
        value = phi.sum(axis=_AXES) / total
        grad = dphi / total if gradient else None
    else:
        d = zero_fill(m, w) - zero_fill(o, w)
        total = np.maximum(w.sum(axis=_AXES), TINY_TOTAL)
        phi, dphi = penalty(d, gradient)
        value = (w * phi).sum(axis=_AXES) / total
        grad = w * dphi / total[..., None, None] if gradient else None
    value = finish(value)
    return (value, grad) if gradient else value


def _square(d, need_grad):
    return d * d, (2.0 * d if need_grad else None)


def _absolute(d, need_grad):
    return np.abs(d), (np.sign(d) if need_grad else None)


def mse(model, observed, weight=None, *, gradient: bool = False):
    r"""(Weighted) mean squared error :math:`\sum_p w_p d_p^2 / \max(\sum_p w_p, 10^{-12})`.

    Symmetric in its two images; usable as a metric and as a loss.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
        Images or stacks of identical shape.
    weight : array_like, optional
        Non-negative pixel weights (or a boolean mask), broadcastable to the
        image shape.  Zero-weight pixels are excluded.
    gradient : bool, optional
        If True, also return the gradient with respect to ``model``.

    Returns
    -------
    value : float or ndarray
        One value per image (shape ``model.shape[:-2]``).  0 when every weight
        is 0.
    grad : ndarray, shape (..., H, W)
        :math:`2 w_p d_p / \sum w`.  Only if ``gradient`` is True.

    Notes
    -----
    Without weights this equals ``skimage.metrics.mean_squared_error``.
    """
    return _weighted_mean_penalty(model, observed, weight, _square, gradient)


def weighted_mse(model, observed, weight, *, gradient: bool = False):
    r"""Weighted mean squared error of seed 000 (``mse`` with a weight map).

    Same as :func:`mse`; the weight is a required argument here (``None`` gives
    the plain mean, as in seed 000).
    """
    return mse(model, observed, weight, gradient=gradient)


def l1(model, observed, weight=None, *, gradient: bool = False):
    r"""(Weighted) mean absolute error :math:`\sum_p w_p |d_p| / \sum_p w_p`.

    The gradient uses the subgradient :math:`\mathrm{sign}(0) = 0`.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
    weight : array_like, optional
        Non-negative pixel weights or a mask; zero-weight pixels are excluded.
    gradient : bool, optional
        If True, also return the gradient with respect to ``model``.

    Returns
    -------
    value : float or ndarray
    grad : ndarray
        Only if ``gradient`` is True.
    """
    return _weighted_mean_penalty(model, observed, weight, _absolute, gradient)


def huber_loss(model, observed, weight=None, *, delta: float = 1.0, gradient: bool = False):
    r"""(Weighted) mean Huber penalty :math:`\sum_p w_p h_\delta(d_p) / \sum_p w_p`.

    :math:`h_\delta` is :func:`~pixelrefine.losses.huber` (Ceres's
    ``HuberLoss(delta)`` up to its factor ½).  Unweighted it equals
    ``torch.nn.functional.huber_loss(model, observed, delta=delta)``; for large
    ``delta`` it tends to ``mse / 2``.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
    weight : array_like, optional
        Non-negative pixel weights or a mask; zero-weight pixels are excluded.
    delta : float, optional
        Quadratic-to-linear threshold, > 0.
    gradient : bool, optional
        If True, also return the gradient with respect to ``model``.

    Returns
    -------
    value : float or ndarray
    grad : ndarray
        Only if ``gradient`` is True.
    """
    if not np.isfinite(delta) or delta <= 0:
        raise ValueError(f"delta must be finite and > 0; got {delta!r}")

    def penalty(d, need_grad):
        return huber(d, delta, gradient=True) if need_grad else (huber(d, delta), None)

    return _weighted_mean_penalty(model, observed, weight, penalty, gradient)


def smooth_l1_loss(model, observed, weight=None, *, beta: float = 1.0, gradient: bool = False):
    r"""(Weighted) mean smooth-L1 penalty, :math:`h_\beta(d)/\beta`.

    :math:`\tfrac12 d^2/\beta` for :math:`|d| < \beta`, :math:`|d| - \tfrac12\beta`
    otherwise: PyTorch's ``smooth_l1_loss(beta)``, i.e. ``huber_loss(delta=beta)
    / beta``.  Tends to :func:`l1` as ``beta`` -> 0.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
    weight : array_like, optional
        Non-negative pixel weights or a mask; zero-weight pixels are excluded.
    beta : float, optional
        Threshold, > 0.
    gradient : bool, optional
        If True, also return the gradient with respect to ``model``.

    Returns
    -------
    value : float or ndarray
    grad : ndarray
        Only if ``gradient`` is True.
    """
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be finite and > 0; got {beta!r}")
    out = huber_loss(model, observed, weight, delta=beta, gradient=gradient)
    if gradient:
        return finish(np.asarray(out[0]) / beta), out[1] / beta
    return finish(np.asarray(out) / beta)


def cauchy_loss(model, observed, weight=None, *, scale: float = 1.0, gradient: bool = False):
    r"""(Weighted) mean Cauchy penalty :math:`\sum_p w_p c_a(d_p) / \sum_p w_p`.

    :math:`c_a` is :func:`~pixelrefine.losses.cauchy` (Ceres's
    ``CauchyLoss(scale)`` up to its factor ½).

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
    weight : array_like, optional
        Non-negative pixel weights or a mask; zero-weight pixels are excluded.
    scale : float, optional
        Scale :math:`a > 0`.
    gradient : bool, optional
        If True, also return the gradient with respect to ``model``.

    Returns
    -------
    value : float or ndarray
    grad : ndarray
        Only if ``gradient`` is True.
    """
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0; got {scale!r}")

    def penalty(d, need_grad):
        return cauchy(d, scale, gradient=True) if need_grad else (cauchy(d, scale), None)

    return _weighted_mean_penalty(model, observed, weight, penalty, gradient)
