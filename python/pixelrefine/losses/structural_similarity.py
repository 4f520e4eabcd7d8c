r"""Structural similarity (SSIM), multi-scale SSIM, and their losses, with gradients.

Local statistics use a separable window :math:`g` (Gaussian, :math:`\sigma`
1.5, 11 taps; or uniform, 7 taps) and, when a weight map :math:`w` is given,
are weighted means over the window (normalised convolution):

.. math::
    A_p = \sum_q g_{q-p} w_q,\qquad
    \mu_x(p) = \frac{1}{A_p}\sum_q g_{q-p} w_q x_q,\qquad
    \sigma_{xy}(p) = c_p\left(\frac{1}{A_p}\sum_q g_{q-p} w_q x_q y_q
                     - \mu_x\mu_y\right)

and the image's SSIM is the :math:`A`-weighted mean of the local map,
:math:`\sum_p A_p S_p / \sum_p A_p`.  Unweighted, :math:`A \equiv 1` and this
is scikit-image's ``structural_similarity``.  See ``docs/losses.md`` for the
border rules, the small-image rule and the derivation of the gradient.
"""

from __future__ import annotations

import numpy as np

try:  # SciPy is an accelerator only: without it the slice-sum path is used throughout
    from scipy.ndimage import correlate1d
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    correlate1d = None

from ._common import as_image_pair, finish, prepare_weight, resolve_data_range, zero_fill

__all__ = [
    "MS_SSIM_WEIGHTS",
    "gaussian_window",
    "uniform_window",
    "effective_win_size",
    "ssim",
    "ssim_loss",
    "ms_ssim",
    "ms_ssim_loss",
]

#: Standard five-scale MS-SSIM exponents (Wang, Simoncelli & Bovik 2003).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

_WINDOWS = ("gaussian", "uniform")
_COVARIANCES = ("population", "sample")
_BORDERS = ("valid", "reflect")


# ----------------------------------------------------------------------------- windows
def gaussian_window(win_size: int, sigma: float = 1.5) -> np.ndarray:
    r"""1-D Gaussian window :math:`g_k \propto \exp(-k^2/2\sigma^2)`, :math:`|k| \le r`, summing to 1.

    With ``win_size = 2*int(3.5*sigma + 0.5) + 1`` (11 for sigma 1.5) it is the
    kernel of ``scipy.ndimage.gaussian_filter(truncate=3.5)`` used by
    scikit-image and of ``pytorch_msssim``.
    """
    _check_win_size(win_size)
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be finite and > 0; got {sigma!r}")
    r = (win_size - 1) // 2
    k = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(k * k) / (2.0 * sigma * sigma))
    return g / g.sum()


def uniform_window(win_size: int) -> np.ndarray:
    """1-D uniform window of ``win_size`` taps, each ``1/win_size``."""
    _check_win_size(win_size)
    return np.full(win_size, 1.0 / win_size)


def _check_win_size(win_size) -> None:
    if int(win_size) != win_size or win_size < 1 or win_size % 2 != 1:
        raise ValueError(f"win_size must be an odd integer >= 1; got {win_size!r}")


def effective_win_size(win_size: int, shape) -> int:
    """Window actually used on images of ``shape``: never larger than the image.

    If ``win_size`` exceeds the shorter image side ``m``, the window becomes the
    largest odd size ``<= m`` (a Gaussian keeps its sigma and is renormalised).
    So a 5x5 shoebox uses a 5x5 window, a 1x1 image a 1x1 window.
    """
    _check_win_size(win_size)
    m = int(min(shape[-2], shape[-1]))
    if win_size <= m:
        return int(win_size)
    return m if m % 2 == 1 else m - 1


def _requested_win_size(window: str, win_size) -> int:
    if window not in _WINDOWS:
        raise ValueError(f"window must be one of {_WINDOWS}; got {window!r}")
    if win_size is None:
        win_size = 11 if window == "gaussian" else 7
    _check_win_size(win_size)
    return int(win_size)


def _make_window(window: str, win_size, sigma: float, shape) -> np.ndarray:
    size = effective_win_size(_requested_win_size(window, win_size), shape)
    return gaussian_window(size, sigma) if window == "gaussian" else uniform_window(size)


# ----------------------------------------------------------------------------- filters
# correlate1d is fastest along long contiguous lines; elsewhere (the row axis, or
# the short lines of a stack of shoeboxes) a sum of shifted slices is faster.
_CORRELATE1D_MIN_LINE = 32


def _take(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    return a[..., start:stop] if axis == -1 else a[..., start:stop, :]


def _correlate_axis(a: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """'Valid' correlation with the odd 1-D kernel ``k`` along ``axis`` (-1 or -2)."""
    K, n = k.size, a.shape[axis]
    r, n_out = (K - 1) // 2, n - K + 1
    if axis == -1 and n >= _CORRELATE1D_MIN_LINE and correlate1d is not None:
        return correlate1d(a, k, axis=-1, mode="constant")[..., r : n - r]
    out = k[0] * _take(a, axis, 0, n_out)
    for i in range(1, K):
        out += k[i] * _take(a, axis, i, i + n_out)
    return out


def _correlate_axis_adjoint(g: np.ndarray, k: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Adjoint of :func:`_correlate_axis` (``n`` is the input length along ``axis``)."""
    K = k.size
    r, n_out = (K - 1) // 2, g.shape[axis]
    shape = list(g.shape)
    shape[axis] = n
    out = np.zeros(shape)
    if axis == -1 and n >= _CORRELATE1D_MIN_LINE and correlate1d is not None:
        out[..., r : n - r] = g
        return correlate1d(out, k[::-1], axis=-1, mode="constant")
    for i in range(K):
        _take(out, axis, i, i + n_out)[...] += k[i] * g
    return out


def _filter_valid(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation over the last two axes (no padding)."""
    if k.size == 1:
        return a * (k[0] * k[0])
    return _correlate_axis(_correlate_axis(a, k, -1), k, -2)


def _filter_valid_adjoint(g: np.ndarray, k: np.ndarray, shape) -> np.ndarray:
    """Adjoint (transpose) of :func:`_filter_valid`: ``shape`` is the input shape."""
    if k.size == 1:
        return g * (k[0] * k[0])
    return _correlate_axis_adjoint(_correlate_axis_adjoint(g, k, -2, shape[-2]), k, -1, shape[-1])


def _pad_symmetric(a: np.ndarray, r: int) -> np.ndarray:
    pad = [(0, 0)] * (a.ndim - 2) + [(r, r), (r, r)]
    return np.pad(a, pad, mode="symmetric")


def _fold_symmetric(g: np.ndarray, r: int) -> np.ndarray:
    """Adjoint of :func:`_pad_symmetric` (``r`` never exceeds the image side)."""
    H = g.shape[-2] - 2 * r
    out = g[..., r : r + H, :].copy()
    out[..., :r, :] += g[..., :r, :][..., ::-1, :]
    out[..., H - r :, :] += g[..., r + H :, :][..., ::-1, :]
    W = g.shape[-1] - 2 * r
    res = out[..., :, r : r + W].copy()
    res[..., :, :r] += out[..., :, :r][..., :, ::-1]
    res[..., :, W - r :] += out[..., :, r + W :][..., :, ::-1]
    return res


# ----------------------------------------------------------------------------- core
def _ssim_core(x, y, w, k, C1, C2, sample, border, component, need_grad):
    """Mean local SSIM (``component='ssim'``) or contrast-structure (``'cs'``).

    ``x`` and ``y`` are float64 stacks, already zero where ``w == 0``; ``w`` is
    ``None`` or the clipped weight map; ``C1``, ``C2`` broadcast as
    ``batch + (1, 1)``.  Returns ``(value, grad_x or None)`` with ``value`` NaN for
    an image with no valid window.
    """
    r = (k.size - 1) // 2
    reflect = border == "reflect" and r > 0
    if reflect:
        x = _pad_symmetric(x, r)
        y = _pad_symmetric(y, r)
        if w is not None:
            w = _pad_symmetric(w, r)
    F = lambda a: _filter_valid(a, k)  # noqa: E731
    if w is None:
        A = None
        mx, my = F(x), F(y)
        sxx, syy, sxy = F(x * x), F(y * y), F(x * y)
        n = k.size * k.size
        c = n / (n - 1.0) if (sample and n > 1) else 1.0
    else:
        A = F(w)
        pos = A > 0
        inv = np.where(pos, 1.0 / np.where(pos, A, 1.0), 0.0)
        wx, wy = w * x, w * y
        mx, my = F(wx) * inv, F(wy) * inv
        sxx, syy, sxy = F(wx * x) * inv, F(wy * y) * inv, F(wx * y) * inv
        if sample and k.size > 1:
            box = np.ones(k.size)
            n = np.rint(_filter_valid((w > 0).astype(np.float64), box))
            c = np.where(n > 1, n / np.maximum(n - 1.0, 1.0), 1.0)
        else:
            c = 1.0
    vx = c * (sxx - mx * mx)
    vy = c * (syy - my * my)
    cxy = c * (sxy - mx * my)
    A2 = 2.0 * cxy + C2
    B2 = vx + vy + C2
    if component == "ssim":
        A1 = 2.0 * mx * my + C1
        B1 = mx * mx + my * my + C1
        D = B1 * B2
        Q = A1 * A2 / D
    else:
        Q = A2 / B2
    if A is None:
        U = float(Q.shape[-2] * Q.shape[-1])
        value = Q.sum(axis=(-2, -1)) / U
    else:
        U = A.sum(axis=(-2, -1))
        safe_U = np.where(U > 0, U, 1.0)
        value = np.where(U > 0, (A * Q).sum(axis=(-2, -1)) / safe_U, np.nan)
    if not need_grad:
        return value, None
    # dQ_p/dx_q = (k_pq / A_p) [alpha_p + beta_p x_q + gamma_p y_q], k_pq = g_{q-p} w_q
    Qv = -Q / B2
    if component == "ssim":
        Qm = 2.0 * my * A2 / D - 2.0 * mx * Q / B1
        Qc = 2.0 * A1 / D
    else:
        Qm = 0.0
        Qc = 2.0 / B2
    alpha = Qm - 2.0 * c * mx * Qv - c * my * Qc
    beta = 2.0 * c * Qv
    gamma = c * Qc
    if A is not None:  # output weight u_p = A_p, so u_p / A_p = 1 on valid windows
        alpha, beta, gamma = alpha * pos, beta * pos, gamma * pos
    shape = x.shape
    g = _filter_valid_adjoint(alpha, k, shape)
    g += x * _filter_valid_adjoint(beta, k, shape)
    g += y * _filter_valid_adjoint(gamma, k, shape)
    if w is not None:
        g *= w
        g /= safe_U[..., None, None]
    else:
        g /= U
    if reflect:
        g = _fold_symmetric(g, r)
    return value, g


def _check_options(window, covariance, border, K1, K2):
    if window not in _WINDOWS:
        raise ValueError(f"window must be one of {_WINDOWS}; got {window!r}")
    if covariance not in _COVARIANCES:
        raise ValueError(f"covariance must be one of {_COVARIANCES}; got {covariance!r}")
    if border not in _BORDERS:
        raise ValueError(f"border must be one of {_BORDERS}; got {border!r}")
    for name, val in (("K1", K1), ("K2", K2)):
        if not np.isfinite(val) or val <= 0:
            raise ValueError(f"{name} must be finite and > 0; got {val!r}")


def _prepare(image0, image1, weight, data_range, K1, K2, names):
    x, y = as_image_pair(image0, image1, names)
    R = resolve_data_range(data_range, image0, image1, x.shape[:-2])
    w = prepare_weight(weight, x.shape)
    x, y = zero_fill(x, w), zero_fill(y, w)
    return x, y, w, (K1 * R) ** 2, (K2 * R) ** 2


# ----------------------------------------------------------------------------- SSIM
def ssim(
    image0,
    image1,
    weight=None,
    *,
    data_range=None,
    window: str = "gaussian",
    win_size: int | None = None,
    sigma: float = 1.5,
    K1: float = 0.01,
    K2: float = 0.03,
    covariance: str = "population",
    border: str = "valid",
    gradient: bool = False,
):
    r"""Mean structural similarity index of two images (or of each pair in two stacks).

    .. math::
        S_p = \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
                   {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},\quad
        C_1 = (K_1 L)^2,\ C_2 = (K_2 L)^2,\quad
        \mathrm{SSIM} = \frac{\sum_p A_p S_p}{\sum_p A_p}

    Parameters
    ----------
    image0, image1 : array_like, shape (..., H, W)
        Images or stacks of identical shape.  Negative values are allowed.
    weight : array_like, optional
        Non-negative pixel weights or a mask, broadcastable to the image shape.
        Local statistics become weighted means over the valid pixels of each
        window; each local value counts with its window's total weight
        :math:`A_p`.  Zero-weight pixels never influence the result.
    data_range : float or array_like
        :math:`L`, the range of the data (scalar, or one per image of a stack).
        Required for floating-point input; for integer input the dtype's range.
    window : {'gaussian', 'uniform'}, optional
        Gaussian (``sigma``) or uniform window.
    win_size : int, optional
        Odd window size; default 11 for 'gaussian', 7 for 'uniform'.  A window
        larger than the shorter image side is shrunk to the largest odd size
        that fits (see :func:`effective_win_size`).
    sigma : float, optional
        Gaussian standard deviation in pixels.
    K1, K2 : float, optional
        Stabilising constants.
    covariance : {'population', 'sample'}, optional
        'sample' multiplies variances and covariance by :math:`n/(n-1)`, ``n``
        the number of valid pixels in the window (``win_size**2`` unmasked, as in
        scikit-image, for both windows); a window with ``n = 1`` uses 1.
    border : {'valid', 'reflect'}, optional
        'valid': only windows wholly inside the image (scikit-image's crop).
        'reflect': the image is padded by half-sample symmetric reflection
        (``scipy.ndimage`` 'reflect') and every pixel has a window.
    gradient : bool, optional
        If True, also return the gradient with respect to ``image0``.

    Returns
    -------
    value : float or ndarray
        SSIM per image, in [-1, 1]; 1 for identical images.  NaN for an image
        with no valid pixel.
    grad : ndarray, shape (..., H, W)
        :math:`\partial\,\mathrm{SSIM}/\partial\,\mathrm{image0}` (zero at
        zero-weight pixels).  Only if ``gradient`` is True.

    Notes
    -----
    To reproduce ``skimage.metrics.structural_similarity``: ``window='uniform',
    win_size=7, covariance='sample'`` (its defaults) or ``window='gaussian',
    win_size=11, sigma=1.5`` with ``use_sample_covariance`` mapped to
    ``covariance``.  scikit-image returns the gradient with respect to its
    *second* image; SSIM is symmetric, so swap the arguments to compare.
    Computation is in float64 whatever the input dtype.
    """
    _check_options(window, covariance, border, K1, K2)
    x, y, w, C1, C2 = _prepare(image0, image1, weight, data_range, K1, K2, ("image0", "image1"))
    k = _make_window(window, win_size, sigma, x.shape)
    value, grad = _ssim_core(
        x, y, w, k, C1, C2, covariance == "sample", border, "ssim", gradient
    )
    return (finish(value), grad) if gradient else finish(value)


def _one_minus(value, weight, shape):
    """``1 - value``, and 0 for an image with no valid pixel (NaN data stays NaN)."""
    loss = 1.0 - np.asarray(value)
    if weight is not None:
        empty = prepare_weight(weight, shape).sum(axis=(-2, -1)) == 0
        loss = np.where(empty, 0.0, loss)
    return loss


def _dissimilarity(metric, model, observed, weight, gradient, options):
    """1 − metric (see ``_one_minus``) and its gradient, for ``ssim_loss`` and ``ms_ssim_loss``."""
    out = metric(model, observed, weight, gradient=gradient, **options)
    value, grad = out if gradient else (out, None)
    loss = _one_minus(value, weight, np.shape(model))
    if not gradient:
        return finish(loss)
    return finish(loss), -grad


def ssim_loss(model, observed, weight=None, *, gradient: bool = False, **ssim_options):
    r"""SSIM loss :math:`1 - \mathrm{SSIM}(m, o)`, with its gradient with respect to ``model``.

    Takes every option of :func:`ssim` (``data_range`` required for float
    input).  An image with no valid pixel gives 0 with a zero gradient.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
    weight : array_like, optional
        Pixel weights or a mask (see :func:`ssim`).
    gradient : bool, optional
        If True, also return the gradient with respect to ``model``.
    **ssim_options
        Passed to :func:`ssim`.

    Returns
    -------
    value : float or ndarray
    grad : ndarray
        Only if ``gradient`` is True.
    """
    return _dissimilarity(ssim, model, observed, weight, gradient, ssim_options)


# ----------------------------------------------------------------------------- MS-SSIM
def _block_sum(a: np.ndarray, pad_value: float = 0.0) -> np.ndarray:
    """Sum over 2x2 blocks; an odd axis gets one row/column of ``pad_value`` in front.

    The block grid is that of ``torch.nn.functional.avg_pool2d(kernel_size=2,
    padding=size % 2)`` used by ``pytorch_msssim``.
    """
    ph, pw = a.shape[-2] % 2, a.shape[-1] % 2
    if ph or pw:
        pad = [(0, 0)] * (a.ndim - 2) + [(ph, 0), (pw, 0)]
        a = np.pad(a, pad, constant_values=pad_value)
    H2, W2 = a.shape[-2] // 2, a.shape[-1] // 2
    return a.reshape(a.shape[:-2] + (H2, 2, W2, 2)).sum(axis=(-3, -1))


def _block_spread(g: np.ndarray, shape) -> np.ndarray:
    """Adjoint of :func:`_block_sum`: each pixel receives its block's value."""
    ph, pw = shape[-2] % 2, shape[-1] % 2
    up = np.repeat(np.repeat(g, 2, axis=-2), 2, axis=-1)
    return up[..., ph:, pw:]


def _pool(x, y, w, pool_padding: str):
    """One MS-SSIM downsampling by 2x2 blocks.

    Padding pixels (in front of an odd axis) hold 0 and weigh 1 ('zeros',
    ``pytorch_msssim``) or 0 ('exclude').  Pooled value: the weighted mean of
    the block; pooled weight: the block's total weight over its pixel count
    (4 for 'zeros', the number of real pixels for 'exclude').  Returns the
    pooled ``x, y, w`` and the factor ``s`` with ``d x_pool / d x_q = w_q s_block``.
    """
    ones = np.ones(x.shape[-2:])
    count = _block_sum(ones, 1.0) if pool_padding == "zeros" else _block_sum(ones)
    if w is None:
        inv = 1.0 / count
        return _block_sum(x) * inv, _block_sum(y) * inv, None, inv
    Wb = _block_sum(w, 1.0 if pool_padding == "zeros" else 0.0)
    pos = Wb > 0
    inv = np.where(pos, 1.0 / np.where(pos, Wb, 1.0), 0.0)
    return _block_sum(w * x) * inv, _block_sum(w * y) * inv, Wb / count, inv


def _pool_adjoint(g, w, scale, shape):
    """Adjoint of the ``x`` part of :func:`_pool`."""
    spread = _block_spread(g * scale, shape)
    return spread if w is None else w * spread


def _n_scales(shape, win_size: int, max_scales: int) -> int:
    """Number of scales whose images are all at least ``win_size`` on the short side."""
    h, w = int(shape[-2]), int(shape[-1])
    n = 1
    while n < max_scales:
        h, w = (h + 1) // 2, (w + 1) // 2
        if min(h, w) < win_size:
            break
        n += 1
    return n


def ms_ssim(
    image0,
    image1,
    weight=None,
    *,
    data_range=None,
    scale_weights=MS_SSIM_WEIGHTS,
    window: str = "gaussian",
    win_size: int | None = None,
    sigma: float = 1.5,
    K1: float = 0.01,
    K2: float = 0.03,
    covariance: str = "population",
    border: str = "valid",
    pool_padding: str = "zeros",
    gradient: bool = False,
):
    r"""Multi-scale SSIM :math:`\prod_{j<n-1} \mathrm{cs}_j^{\,e_j}\cdot\mathrm{SSIM}_{n-1}^{\,e_{n-1}}`.

    At scale ``j`` the images are downsampled ``j`` times by 2x2 block means
    on ``pytorch_msssim``'s block grid (an odd side is padded by one row or
    column in front, see ``pool_padding``); :math:`\mathrm{cs}_j` is the mean contrast-structure term
    :math:`(2\sigma_{xy}+C_2)/(\sigma_x^2+\sigma_y^2+C_2)` and the last scale
    uses the full SSIM.  Negative terms are set to 0 before the powers (as
    ``pytorch_msssim`` does), which makes the product 0.

    Parameters
    ----------
    image0, image1 : array_like, shape (..., H, W)
    weight : array_like, optional
        Pixel weights or a mask; block means are weighted means and a block's
        weight is the mean weight of its real pixels.
    data_range : float or array_like
        As in :func:`ssim` (the same :math:`C_1, C_2` at every scale).
    scale_weights : sequence of float, optional
        Exponents :math:`e_j`, finest scale first; default the standard five.
    window, win_size, sigma, K1, K2, covariance, border
        As in :func:`ssim`; defaults match ``pytorch_msssim.ms_ssim``.
    pool_padding : {'zeros', 'exclude'}, optional
        The padding pixel of an odd side is a valid zero pixel ('zeros': the
        block mean divides by 4, as ``avg_pool2d`` in ``pytorch_msssim``) or is
        left out ('exclude': the mean of the block's real pixels, which does not
        darken the first row/column of the coarser scale).  Identical when every
        downsampled side is even (e.g. 176, 192, 256, 2048).
    gradient : bool, optional
        If True, also return the gradient with respect to ``image0``.

    Returns
    -------
    value : float or ndarray
        MS-SSIM per image (NaN for an image with no valid pixel).
    grad : ndarray
        Only if ``gradient`` is True.

    Notes
    -----
    Small images: the number of scales ``n`` is the largest ``<= len(scale_weights)``
    for which the coarsest image is still at least ``win_size`` on its shorter
    side (five scales from 161 pixels with the 11-tap window; ``pytorch_msssim``
    asserts > 160).  With ``n`` below the full count the first ``n`` exponents
    are rescaled to the same sum as the full set.  With ``n = 1`` this is
    :func:`ssim` raised to that sum, with the window shrunk on images smaller
    than the window.
    """
    _check_options(window, covariance, border, K1, K2)
    if pool_padding not in ("zeros", "exclude"):
        raise ValueError(f"pool_padding must be 'zeros' or 'exclude'; got {pool_padding!r}")
    e_full = np.asarray(scale_weights, dtype=np.float64)
    if e_full.ndim != 1 or e_full.size == 0 or not np.all(np.isfinite(e_full)) or np.any(e_full < 0):
        raise ValueError("scale_weights must be a non-empty 1-D sequence of finite values >= 0")
    x, y, w, C1, C2 = _prepare(image0, image1, weight, data_range, K1, K2, ("image0", "image1"))
    k = _make_window(window, win_size, sigma, x.shape)
    n = _n_scales(x.shape, _requested_win_size(window, win_size), e_full.size)
    e = e_full[:n] * (e_full.sum() / e_full[:n].sum()) if n < e_full.size else e_full
    sample = covariance == "sample"

    levels = []  # (x, y, w, pooled-scale) per scale
    Q = []
    G = []
    for j in range(n):
        comp = "ssim" if j == n - 1 else "cs"
        q, g = _ssim_core(x, y, w, k, C1, C2, sample, border, comp, gradient)
        Q.append(q)
        G.append(g)
        if j < n - 1:
            xn, yn, wn, scale = _pool(x, y, w, pool_padding)
            levels.append((x.shape, w, scale))
            x, y, w = xn, yn, wn
    Qp = [np.maximum(q, 0.0) for q in Q]  # NaN propagates
    value = np.ones_like(Qp[0])
    for q, ej in zip(Qp, e):
        value = value * q**ej
    if not gradient:
        return finish(value)
    grad = None
    for j in range(n - 1, -1, -1):
        pos = Qp[j] > 0
        coef = np.where(pos, e[j] * value / np.where(pos, Qp[j], 1.0), 0.0)
        coef = np.where(np.isnan(coef), 0.0, coef)
        term = coef[..., None, None] * G[j]
        if grad is None:
            grad = term
        else:
            shape, wj, scale = levels[j]
            grad = _pool_adjoint(grad, wj, scale, shape) + term
    return finish(value), grad


def ms_ssim_loss(model, observed, weight=None, *, gradient: bool = False, **ms_ssim_options):
    r"""MS-SSIM loss :math:`1 - \mathrm{MS\text{-}SSIM}(m, o)`, gradient with respect to ``model``.

    Takes every option of :func:`ms_ssim`.  An image with no valid pixel gives
    0 with a zero gradient.

    Parameters
    ----------
    model, observed : array_like, shape (..., H, W)
    weight : array_like, optional
    gradient : bool, optional
    **ms_ssim_options
        Passed to :func:`ms_ssim`.

    Returns
    -------
    value : float or ndarray
    grad : ndarray
        Only if ``gradient`` is True.
    """
    return _dissimilarity(ms_ssim, model, observed, weight, gradient, ms_ssim_options)
