r"""Fourier-domain loss with an optional high-pass filter (seed 003).

.. math::
    L = \frac{1}{\max(\sum_p w_p, 10^{-12})}\sum_k \left|H_k\,R_k\right|^p,
    \qquad R = \mathcal{F}_{\mathrm{ortho}}\!\left[\sqrt{w}\,(m - o)\right]

:math:`\mathcal{F}_{\mathrm{ortho}}` is the unitary 2-D DFT (``norm='ortho'``),
so for ``p = 2`` and no filter Parseval gives :math:`L = ` :func:`mse` exactly,
and for ``p = 1`` unweighted :math:`L` is seed 003's
``mean(|fft2(m) - fft2(o)|)`` with ``norm='ortho'``.
"""

from __future__ import annotations

import numpy as np

from ._common import TINY_TOTAL, as_image_pair, finish, prepare_weight, zero_fill

__all__ = ["gaussian_highpass", "fourier_loss"]

_AXES = (-2, -1)


def gaussian_highpass(shape, cutoff: float) -> np.ndarray:
    r"""Gaussian high-pass transfer function :math:`H(f) = 1 - \exp(-|f|^2 / 2 f_c^2)`.

    Parameters
    ----------
    shape : tuple of int
        Image shape; the last two entries are used.
    cutoff : float
        :math:`f_c > 0` in cycles per pixel (the Nyquist frequency is 0.5).

    Returns
    -------
    H : ndarray, shape (H, W)
        In ``numpy.fft.fft2`` order (zero frequency at ``[0, 0]``); ``H = 0`` at
        zero frequency, so a constant offset between the images costs nothing.
    """
    if not np.isfinite(cutoff) or cutoff <= 0:
        raise ValueError(f"cutoff must be finite and > 0; got {cutoff!r}")
    fy = np.fft.fftfreq(int(shape[-2]))[:, None]
    fx = np.fft.fftfreq(int(shape[-1]))[None, :]
    return 1.0 - np.exp(-(fx * fx + fy * fy) / (2.0 * cutoff * cutoff))


def fourier_loss(model, observed, weight=None, *, highpass=None, p: int = 2, gradient: bool = False):
    r"""Fourier loss :math:`\sum_k |H_k R_k|^p / \sum_p w_p` on the weighted residual's spectrum.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
    weight : array_like, optional
        Pixel weights or a mask.  The transformed residual is
        :math:`\sqrt{w}(m - o)`, zero at excluded pixels (the seed-000 residual).
    highpass : None, float or array_like, optional
        None: no filter (:math:`H \equiv 1`).  A float: the cutoff :math:`f_c`
        (cycles/pixel) of :func:`gaussian_highpass`.  An array of shape (H, W):
        a real, finite transfer function in ``fft2`` order.
    p : {1, 2}, optional
        1: sum of moduli; 2: sum of squared moduli (power).
    gradient : bool, optional
        If True, also return the gradient with respect to ``model``.

    Returns
    -------
    value : float or ndarray
    grad : ndarray
        :math:`\mathrm{Re}\,\mathcal{F}^{-1}[H\,\partial|Z|^p/\partial\bar Z] \sqrt{w}/\sum w`
        with :math:`Z = HR` (for ``p = 1``, 0 where :math:`Z = 0`).  Only if
        ``gradient`` is True.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2; got {p!r}")
    m, o = as_image_pair(model, observed)
    w = prepare_weight(weight, m.shape)
    if w is None:
        sw = None
        r = m - o
        total = float(r.shape[-2] * r.shape[-1])
    else:
        sw = np.sqrt(w)
        r = sw * (zero_fill(m, w) - zero_fill(o, w))
        total = np.maximum(w.sum(axis=_AXES), TINY_TOTAL)[..., None, None]
    if highpass is None:
        H = None
    elif np.ndim(highpass) == 0:
        H = gaussian_highpass(r.shape, float(highpass))
    else:
        H = np.asarray(highpass, dtype=np.float64)
        if H.shape != r.shape[-2:]:
            raise ValueError(
                f"highpass filter of shape {H.shape} does not match the image shape {r.shape[-2:]}"
            )
        if not np.all(np.isfinite(H)):
            raise ValueError("highpass filter must be finite")
    Z = np.fft.fft2(r, norm="ortho")
    if H is not None:
        Z = H * Z
    a = np.abs(Z)
    phi = a if p == 1 else a * a
    value = finish((phi.sum(axis=_AXES, keepdims=True) / total)[..., 0, 0])
    if not gradient:
        return value
    if p == 2:
        dZ = 2.0 * Z
    else:
        pos = a > 0
        dZ = np.where(pos, Z / np.where(pos, a, 1.0), 0.0)
    if H is not None:
        dZ = H * dZ
    grad = np.fft.ifft2(dZ, norm="ortho").real / total
    if sw is not None:
        grad = grad * sw
    return value, grad
