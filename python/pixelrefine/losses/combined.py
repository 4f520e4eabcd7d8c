r"""Weighted combination of losses that reports each component (seeds 002, 003).

.. math:: L = \sum_k \lambda_k L_k(m, o; w),\qquad \lambda_k \ge 0
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from ._common import as_image_pair, finish

__all__ = ["Term", "CombinedResult", "CombinedLoss"]


class Term(NamedTuple):
    """One component of a :class:`CombinedLoss`.

    Attributes
    ----------
    name : str
        Key of the component in the report.
    coefficient : float
        :math:`\\lambda_k \\ge 0`.
    loss : callable
        ``loss(model, observed, weight=None, *, gradient=False)``; bind options
        with :func:`functools.partial` (e.g. ``partial(ssim_loss, data_range=1)``).
    regularizer : bool
        If True the term depends on the model only and is called as
        ``loss(model, weight, gradient=...)`` (e.g. :func:`total_variation`).
    """

    name: str
    coefficient: float
    loss: Callable
    regularizer: bool = False


class CombinedResult(NamedTuple):
    """Result of :meth:`CombinedLoss.evaluate`.

    Attributes
    ----------
    value : float or ndarray
        :math:`\\sum_k \\lambda_k L_k` per image.
    components : dict of str to float or ndarray
        Each :math:`L_k` *before* its coefficient.
    grad : ndarray or None
        Gradient of ``value`` with respect to the model, if requested.
    """

    value: object
    components: dict
    grad: np.ndarray | None


class CombinedLoss:
    r"""Loss :math:`\sum_k \lambda_k L_k` built from weighted components.

    Parameters
    ----------
    terms : sequence of Term or tuple
        ``(name, coefficient, loss)`` or ``(name, coefficient, loss, regularizer)``.
        Names must be unique, coefficients finite and >= 0.

    Examples
    --------
    >>> from functools import partial
    >>> from pixelrefine.losses import CombinedLoss, mse, ssim_loss, total_variation
    >>> loss = CombinedLoss([("mse", 0.16, mse),
    ...                      ("ssim", 0.84, partial(ssim_loss, data_range=1.0)),
    ...                      ("tv", 0.01, total_variation, True)])
    >>> value, grad = loss(model, observed, gradient=True)      # doctest: +SKIP
    >>> report = loss.evaluate(model, observed)                 # doctest: +SKIP
    >>> report.components["ssim"]                               # doctest: +SKIP
    """

    def __init__(self, terms):
        parsed = []
        for t in terms:
            term = t if isinstance(t, Term) else Term(*t)
            if not callable(term.loss):
                raise TypeError(f"loss of term {term.name!r} is not callable")
            c = float(term.coefficient)
            if not np.isfinite(c) or c < 0:
                raise ValueError(f"coefficient of term {term.name!r} must be finite and >= 0; got {c!r}")
            parsed.append(term._replace(coefficient=c, regularizer=bool(term.regularizer)))
        names = [t.name for t in parsed]
        if not parsed:
            raise ValueError("CombinedLoss needs at least one term")
        if len(set(names)) != len(names):
            raise ValueError(f"term names must be unique; got {names}")
        self.terms = tuple(parsed)

    def __repr__(self):
        inner = ", ".join(f"{t.coefficient:g}*{t.name}" for t in self.terms)
        return f"CombinedLoss({inner})"

    def evaluate(self, model, observed, weight=None, *, gradient: bool = False) -> CombinedResult:
        """Evaluate every term; return the total, each component and optionally the gradient."""
        m, o = as_image_pair(model, observed)
        total = np.zeros(m.shape[:-2])
        grad = np.zeros_like(m) if gradient else None
        components = {}
        for t in self.terms:
            args = (m, weight) if t.regularizer else (m, o, weight)
            if gradient:
                v, g = t.loss(*args, gradient=True)
                grad += t.coefficient * g
            else:
                v = t.loss(*args)
            components[t.name] = v
            total = total + t.coefficient * np.asarray(v)
        return CombinedResult(finish(total), components, grad)

    def __call__(self, model, observed, weight=None, *, gradient: bool = False):
        """``value`` or ``(value, grad)``, like every loss of the package."""
        r = self.evaluate(model, observed, weight, gradient=gradient)
        return (r.value, r.grad) if gradient else r.value
