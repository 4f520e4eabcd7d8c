r"""Log / dB domain: compare images after :math:`T(x) = k\ln\max(x + \epsilon, f)`.

:math:`k = 1` (natural log) or :math:`k = 10/\ln 10` (decibels, seed 002's
``10*log10(x + eps)``).  Background-subtracted counts can be negative: values
with :math:`x + \epsilon < f` are clamped to :math:`f` (:math:`T` constant
there, derivative 0), so the transform is defined and continuous everywhere.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ._common import as_image_pair

__all__ = ["log_transform", "log_domain"]


def _check(offset, floor):
    if not np.isfinite(offset):
        raise ValueError(f"offset must be finite; got {offset!r}")
    if not np.isfinite(floor) or floor <= 0:
        raise ValueError(f"floor must be finite and > 0; got {floor!r}")


def log_transform(x, *, offset: float = 1.0, floor: float = 1e-3, db: bool = False, gradient: bool = False):
    r"""Clamped log transform :math:`T(x) = k\ln\max(x + \epsilon, f)`.

    Parameters
    ----------
    x : array_like
        Values (counts; may be negative).
    offset : float, optional
        :math:`\epsilon`, added before the log (1: ``log1p`` of counts).
    floor : float, optional
        :math:`f > 0`, lower clamp of :math:`x + \epsilon`.
    db : bool, optional
        Decibels (:math:`k = 10/\ln 10`) instead of the natural log.
    gradient : bool, optional
        If True, also return :math:`dT/dx` (0 where clamped).

    Returns
    -------
    t : ndarray
    dt : ndarray
        Only if ``gradient`` is True.
    """
    _check(offset, floor)
    k = 10.0 / math.log(10.0) if db else 1.0
    s = np.asarray(x, dtype=np.float64) + offset
    with np.errstate(invalid="ignore"):
        clamped = np.maximum(s, floor)  # NaN stays NaN
        t = k * np.log(clamped)
        if not gradient:
            return t
        dt = np.where(s < floor, 0.0, k / clamped)
    return t, dt


def log_domain(loss, *, offset: float = 1.0, floor: float = 1e-3, db: bool = False):
    r"""Wrap a loss so that it compares :math:`T(m)` with :math:`T(o)` (:func:`log_transform`).

    Parameters
    ----------
    loss : callable
        ``loss(model, observed, weight=None, *, gradient=False, **options)``,
        any loss of this package.
    offset, floor, db
        Parameters of :func:`log_transform`.

    Returns
    -------
    wrapped : callable
        Same signature; its gradient is the chain rule
        :math:`\partial L/\partial T(m)\cdot T'(m)`, exactly 0 at pixels where the
        inner gradient is 0 (excluded pixels stay excluded even if they hold NaN).

    Notes
    -----
    Options such as ``data_range`` are passed to ``loss`` unchanged and must be
    given in transformed units (e.g. the dB range of the reference).
    """
    _check(offset, floor)
    opts = dict(offset=offset, floor=floor, db=db)

    @functools.wraps(loss)
    def wrapped(model, observed, weight=None, *, gradient: bool = False, **options):
        m, o = as_image_pair(model, observed)
        to = log_transform(o, **opts)
        if not gradient:
            return loss(log_transform(m, **opts), to, weight, **options)
        tm, dtm = log_transform(m, gradient=True, **opts)
        value, g = loss(tm, to, weight, gradient=True, **options)
        with np.errstate(invalid="ignore"):
            return value, np.where(g == 0, 0.0, g * dtm)

    wrapped.__name__ = f"log_domain_{getattr(loss, '__name__', 'loss')}"
    wrapped.__qualname__ = wrapped.__name__
    wrapped.__doc__ = (
        f"{getattr(loss, '__name__', 'loss')} applied to "
        f"{'10*log10' if db else 'ln'}(max(x + {offset}, {floor})) of both images.\n\n"
        + (loss.__doc__ or "")
    )
    return wrapped
