"""Results checked on the way out: no value that is not finite without a status or a flag
that explains it, and no infinity at all.

The policy (METHODS.md §I.11, status codes and flag bits in ``refine.STATUS`` and
``refine.FLAGS``):

- per image, G, B, R1, their sigmas and chi2_pixel are finite where the status is 0;
- per reflection, intensity_prf and its sigma are NaN only where the reflection was not
  integrated (flags 2, 128 or 256) or its image not refined (status 2 or 3);
- intensity_scaled and its sigma are NaN only where the reflection is not scaled (flags 1, 2,
  64, 128, 256 or 512) or its image not scaled (status 2, 3 or 6);
- no float output, per image, per reflection or per crystal, is ±inf; R0 and the error model
  are finite; every status is a documented code and every flag a documented bit.

``refine`` runs ``check_results`` before it returns; a violation is a bug of the core (an
unexplained value), raised as ``ResultsCheckError``.
"""

from __future__ import annotations

import numpy as np

from .refine import FLAGS, STATUS, Results

__all__ = ["ResultsCheckError", "check_results", "unexplained", "NOT_INTEGRATED", "NOT_SCALED"]

#: Flags under which a reflection has no intensity_prf: too few pixels, no prediction, profile
#: outside the box.
NOT_INTEGRATED = 2 | 128 | 256
#: ... and those under which it has no intensity_scaled: also no reference, image not scaled,
#: low partiality.
NOT_SCALED = NOT_INTEGRATED | 1 | 64 | 512
#: Image status under which none of its reflections is integrated (not scaled, solver failure).
NOT_REFINED_STATUS = (2, 3)
#: ... and under which none is scaled (also: no reference).
NOT_SCALED_STATUS = (2, 3, 6)
#: Per-image values that status 0 promises finite.
IMAGE_VALUES = ("G", "B", "G_sigma", "B_sigma", "R1", "R1_sigma", "chi2_pixel")
#: Per-reflection values and (flags, image status) that explain their NaN.
REFLECTION_VALUES = {
    "intensity_prf": (NOT_INTEGRATED, NOT_REFINED_STATUS),
    "intensity_prf_sigma": (NOT_INTEGRATED, NOT_REFINED_STATUS),
    "intensity_scaled": (NOT_SCALED, NOT_SCALED_STATUS),
    "intensity_scaled_sigma": (NOT_SCALED, NOT_SCALED_STATUS),
}
#: Per-crystal values that are always finite.
CRYSTAL_VALUES = ("R0", "error_scale", "reference_error")


class ResultsCheckError(RuntimeError):
    """A result that is not finite with nothing that explains it (an internal error)."""


def _first(mask: np.ndarray) -> int | None:
    rows = np.flatnonzero(np.asarray(mask).reshape(len(mask), -1).any(1)) if len(mask) else []
    return int(rows[0]) if len(rows) else None


def _infinities(group: str, arrays: dict[str, np.ndarray]) -> list[str]:
    found = []
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and value.ndim and (row := _first(np.isinf(value))) is not None:
            found.append(f"/{group}/{name} row {row}: {value[row]} (infinite)")
    return found


def _codes(results: Results) -> list[str]:
    found = []
    status = np.asarray(results.images["status"])
    if (row := _first(~np.isin(status, list(STATUS)))) is not None:
        found.append(f"/images/status row {row}: {status[row]} is not a documented status")
    flags = np.asarray(results.reflections["flags"])
    known = sum(FLAGS)
    if (row := _first((flags & ~known) != 0)) is not None:
        found.append(f"/reflections/flags row {row}: {flags[row]} has an undocumented bit")
    return found


def _images(results: Results) -> list[str]:
    found = []
    status = np.asarray(results.images["status"])
    for name in IMAGE_VALUES:
        if (row := _first(~np.isfinite(results.images[name]) & (status == 0))) is not None:
            found.append(f"/images/{name} row {row}: {results.images[name][row]} with status 0")
    return found


def _reflections(results: Results, image_id: np.ndarray) -> list[str]:
    found = []
    flags = np.asarray(results.reflections["flags"])
    image_status = np.asarray(results.images["status"])[image_id]
    for name, (explaining_flags, explaining_status) in REFLECTION_VALUES.items():
        value = np.asarray(results.reflections[name])
        explained = ((flags & explaining_flags) != 0) | np.isin(image_status, explaining_status)
        if (row := _first(np.isnan(value) & ~explained)) is not None:
            found.append(f"/reflections/{name} row {row}: NaN with flags {flags[row]} and image "
                         f"status {image_status[row]}")
    return found


def _crystals(results: Results) -> list[str]:
    found = []
    for name in CRYSTAL_VALUES:
        value = np.asarray(results.crystals.get(name, []), dtype=float)
        if (row := _first(~np.isfinite(value))) is not None:
            found.append(f"/global/{name} row {row}: {value[row]}")
    return found


def unexplained(results: Results, image_id: np.ndarray) -> list[str]:
    """Every violation of the policy (module docstring), one description each (the dataset
    and its first bad row); empty when the results are clean.

    Parameters
    ----------
    results : Results
        A refinement's results.
    image_id : ndarray
        The image of each reflection (``ShoeboxSet.reflections.image_id``).
    """
    image_id = np.asarray(image_id, dtype=np.int64)
    found = _codes(results) + _images(results) + _reflections(results, image_id) + _crystals(results)
    for group, arrays in (("images", results.images), ("reflections", results.reflections),
                          ("global", results.crystals)):
        found += _infinities(group, arrays)
    return found


def check_results(results: Results, image_id: np.ndarray) -> None:
    """Raise ``ResultsCheckError`` when ``unexplained`` finds anything.

    Raises
    ------
    ResultsCheckError
        Naming the first violation, and how many there are.
    """
    found = unexplained(results, image_id)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ResultsCheckError(f"internal error: a result is not finite and nothing explains "
                                f"it: {found[0]}{more}")
