r"""Robust penalties on residuals, defined to match Ceres Solver's loss functions.

Ceres minimises :math:`\tfrac12\sum_i \rho(s_i)` with :math:`s_i = r_i^2`.  The
functions here return :math:`\tfrac12\rho(r^2)` per residual, so that
``huber(r, delta).sum()`` *is* the Ceres cost of residuals ``r`` under
``ceres::HuberLoss(delta)`` and ``cauchy(r, scale).sum()`` the cost under
``ceres::CauchyLoss(scale)``.

* Huber, :math:`\rho(s) = s` for :math:`s \le \delta^2`,
  :math:`2\delta\sqrt{s} - \delta^2` otherwise:

  .. math:: h_\delta(r) = \begin{cases} \tfrac12 r^2 & |r| \le \delta \\
            \delta|r| - \tfrac12\delta^2 & |r| > \delta \end{cases}

* Cauchy, :math:`\rho(s) = a^2\log(1 + s/a^2)`:

  .. math:: c_a(r) = \tfrac12 a^2 \log\left(1 + (r/a)^2\right)

The derivative returned is :math:`d/dr`; Ceres's :math:`\rho'(s)` is
``derivative / r`` (and :math:`\rho'(0) = 1` for both).
"""

from __future__ import annotations

import numpy as np

__all__ = ["huber", "cauchy"]


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0; got {value!r}")
    return value


def huber(r, delta: float = 1.0, *, gradient: bool = False):
    r"""Huber penalty, :math:`\tfrac12\rho_{\mathrm{Huber}}(r^2)` of Ceres, per residual.

    Parameters
    ----------
    r : array_like
        Residuals (any shape).
    delta : float, optional
        Threshold :math:`\delta > 0` between the quadratic and the linear part
        (the ``a`` of ``ceres::HuberLoss(a)``).
    gradient : bool, optional
        If True, also return :math:`dh/dr`.

    Returns
    -------
    value : ndarray
        :math:`\tfrac12 r^2` where :math:`|r| \le \delta`,
        :math:`\delta|r| - \tfrac12\delta^2` elsewhere; same shape as ``r``.
    grad : ndarray
        ``r`` where :math:`|r| \le \delta`, :math:`\delta\,\mathrm{sign}(r)`
        elsewhere.  Only if ``gradient`` is True.

    Notes
    -----
    Equal to ``torch.nn.functional.huber_loss(r, 0, reduction='none', delta=delta)``.
    """
    delta = _positive(delta, "delta")
    r = np.asarray(r, dtype=np.float64)
    a = np.abs(r)
    quadratic = a <= delta
    value = np.where(quadratic, 0.5 * r * r, delta * a - 0.5 * delta * delta)
    if not gradient:
        return value
    return value, np.where(quadratic, r, delta * np.sign(r))


def cauchy(r, scale: float = 1.0, *, gradient: bool = False):
    r"""Cauchy penalty, :math:`\tfrac12\rho_{\mathrm{Cauchy}}(r^2)` of Ceres, per residual.

    Parameters
    ----------
    r : array_like
        Residuals (any shape).
    scale : float, optional
        Scale :math:`a > 0` (the ``a`` of ``ceres::CauchyLoss(a)``).
    gradient : bool, optional
        If True, also return :math:`dc/dr`.

    Returns
    -------
    value : ndarray
        :math:`\tfrac12 a^2 \log(1 + (r/a)^2)`, same shape as ``r``.
    grad : ndarray
        :math:`r / (1 + (r/a)^2)`.  Only if ``gradient`` is True.
    """
    scale = _positive(scale, "scale")
    r = np.asarray(r, dtype=np.float64)
    t = (r / scale) ** 2
    value = 0.5 * scale * scale * np.log1p(t)
    if not gradient:
        return value
    return value, r / (1.0 + t)
