"""Image losses and metrics for still-image refinement (NumPy; SciPy used if present).

Every loss has the signature ``loss(model, observed, weight=None, *, ...,
gradient=False)``, works on one image ``(H, W)`` or a stack ``(..., H, W)``
(one value per image), takes an optional weight map or mask (zero-weight
pixels are excluded whatever they hold) and, with ``gradient=True``, returns
``(value, grad)`` with ``grad`` the gradient with respect to ``model``.  The
mathematics, conventions and edge cases are in ``docs/losses.md``.

Pixel-wise losses
    weighted_image_residual, mse, weighted_mse, l1, huber_loss, smooth_l1_loss,
    cauchy_loss
Robust penalties on residuals (Ceres ``HuberLoss`` / ``CauchyLoss`` up to ½)
    huber, cauchy
Structural similarity
    ssim, ssim_loss, ms_ssim, ms_ssim_loss
Derivative losses
    gradient_loss (Sobel), laplacian_loss, total_variation
Fourier
    fourier_loss, gaussian_highpass
Log / dB domain
    log_transform, log_domain
Speckle
    enl, enl_loss
Combination
    CombinedLoss, Term, CombinedResult
Metrics
    psnr, ssim, mse, shoebox_metrics
"""

from .combined import CombinedLoss, CombinedResult, Term
from .derivative import LAPLACIAN, SOBEL_X, SOBEL_Y, gradient_loss, laplacian_loss, total_variation
from .fourier import fourier_loss, gaussian_highpass
from .logarithm import log_domain, log_transform
from .metrics import psnr
from .pixelwise import (
    cauchy_loss,
    huber_loss,
    l1,
    mse,
    smooth_l1_loss,
    weighted_image_residual,
    weighted_mse,
)
from .robust import cauchy, huber
from .shoebox import ShoeboxMetrics, shoebox_metrics
from .speckle import enl, enl_loss
from .structural_similarity import (
    MS_SSIM_WEIGHTS,
    effective_win_size,
    gaussian_window,
    ms_ssim,
    ms_ssim_loss,
    ssim,
    ssim_loss,
    uniform_window,
)

__all__ = [
    "weighted_image_residual",
    "mse",
    "weighted_mse",
    "l1",
    "huber",
    "cauchy",
    "huber_loss",
    "smooth_l1_loss",
    "cauchy_loss",
    "ssim",
    "ssim_loss",
    "ms_ssim",
    "ms_ssim_loss",
    "MS_SSIM_WEIGHTS",
    "gaussian_window",
    "uniform_window",
    "effective_win_size",
    "gradient_loss",
    "laplacian_loss",
    "total_variation",
    "SOBEL_X",
    "SOBEL_Y",
    "LAPLACIAN",
    "fourier_loss",
    "gaussian_highpass",
    "log_transform",
    "log_domain",
    "enl",
    "enl_loss",
    "CombinedLoss",
    "Term",
    "CombinedResult",
    "psnr",
    "shoebox_metrics",
    "ShoeboxMetrics",
]
