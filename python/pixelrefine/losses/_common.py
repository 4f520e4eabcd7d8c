"""Shared input checks and reductions for :mod:`pixelrefine.losses`.

Conventions used everywhere in the package (see ``docs/losses.md``):

* An *image* is an array whose last two axes are (rows, columns); any leading
  axes form a *stack* and every image of the stack is treated independently.
  A loss returns one value per image: a scalar for a single image, an array of
  the leading shape for a stack.
* A *weight* map is broadcast to the image (or stack) shape.  Negative and NaN
  weights are clipped to 0; a pixel with weight 0 is *excluded*: whatever its
  model or observed values hold (NaN, inf, garbage) cannot reach the value or
  the gradient, and its gradient is exactly 0.  A boolean / 0-1 mask is a
  weight map.
* Totals of weights are floored at ``TINY_TOTAL`` (seed 000), so that a loss
  with no valid term is 0 with a zero gradient.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "TINY_TOTAL",
    "as_image_pair",
    "as_image",
    "prepare_weight",
    "zero_fill",
    "finish",
    "resolve_data_range",
]

#: Floor on a total weight before it divides (seed 000: ``max(sum(w), 1e-12)``).
TINY_TOTAL = 1e-12

_IMAGE_AXES = (-2, -1)


def _as_float(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def as_image(image, name: str = "image") -> np.ndarray:
    """Return ``image`` as a float64 image or stack, checking its shape."""
    arr = _as_float(image, name)
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must be an image (H, W) or a stack (..., H, W); got shape {arr.shape}"
        )
    if arr.shape[-2] == 0 or arr.shape[-1] == 0:
        raise ValueError(f"{name} has an empty image axis: shape {arr.shape}")
    return arr


def as_image_pair(image0, image1, names=("model", "observed")):
    """Return two float64 images of identical shape, or raise ``ValueError``."""
    a = np.asarray(image0)
    b = np.asarray(image1)
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape; "
            f"got {a.shape} and {b.shape}"
        )
    return as_image(a, names[0]), as_image(b, names[1])


def prepare_weight(weight, shape) -> np.ndarray | None:
    """Broadcast ``weight`` to ``shape`` and clip it at 0 (NaN -> 0).

    Returns ``None`` when ``weight`` is ``None`` (every pixel weighs 1).
    """
    if weight is None:
        return None
    w = np.asarray(weight)
    if w.dtype.kind not in "biuf":
        raise TypeError(f"weight must be a real numeric or boolean array, got dtype {w.dtype}")
    try:
        w = np.broadcast_to(w, shape)
    except ValueError:
        raise ValueError(
            f"weight of shape {w.shape} cannot be broadcast to the image shape {tuple(shape)}"
        ) from None
    w = w.astype(np.float64)  # a fresh, writeable copy
    with np.errstate(invalid="ignore"):
        w = np.where(w > 0, w, 0.0)
    if np.isinf(w).any():
        raise ValueError("weight must be finite")
    return w


def zero_fill(a: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Set ``a`` to 0 where the weight is 0 (so NaN cannot leak through filters)."""
    if w is None:
        return a
    return np.where(w > 0, a, 0.0)


def finish(value):
    """Return a 0-d result as a NumPy scalar, a stacked one as an array."""
    value = np.asarray(value, dtype=np.float64)
    return value[()] if value.ndim == 0 else value


def resolve_data_range(data_range, image0: np.ndarray, image1: np.ndarray, batch_shape):
    """Return ``data_range`` as a float64 array broadcastable to ``batch_shape + (1, 1)``.

    ``None`` is accepted only for integer or boolean input, where the range of
    the dtype of ``image0`` is used (as scikit-image does).  Floating-point input
    has no natural range: a missing ``data_range`` is a ``ValueError``.
    """
    if data_range is None:
        kinds = {np.asarray(image0).dtype.kind, np.asarray(image1).dtype.kind}
        if "f" in kinds:
            raise ValueError(
                "data_range is required for floating-point input (the range of the "
                "data, e.g. max - min of the reference image)"
            )
        dt = np.asarray(image0).dtype
        if dt.kind == "b":
            data_range = 1.0
        else:
            info = np.iinfo(dt)
            data_range = float(info.max) - float(info.min)
    r = np.asarray(data_range, dtype=np.float64)
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError(f"data_range must be finite and > 0; got {data_range!r}")
    try:
        r = np.broadcast_to(r, tuple(batch_shape))
    except ValueError:
        raise ValueError(
            f"data_range of shape {r.shape} cannot be broadcast to the stack shape "
            f"{tuple(batch_shape)}"
        ) from None
    return r[..., None, None]
