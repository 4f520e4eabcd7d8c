"""Reference intensities from an MTZ or a model, on the data's reciprocal ASU.

- MTZ: an intensity column (type J: IMEAN, I, IOBS, I-obs, …), else amplitudes squared (type
  F: F, FP, FOBS, F-obs, …), else the mean of I(+)/I(−) (K) or of F(+)²/F(−)² (G); or the
  column named.
- PDB / mmCIF model: |Fcalc|² of the model's atoms (no bulk solvent), with gemmi's
  ``DensityCalculatorX`` (X-ray form factors, the density on a grid to the data's resolution,
  then its Fourier transform, un-blurred) in the model's cell and space group.

Either is mapped into the reciprocal ASU of the data's space group (indices of equal ASU image
averaged); ``lookup`` gives NaN where the reference has no value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

import gemmi

from .symmetry import to_asu

__all__ = ["ReferenceIntensities", "load_reference", "reference_from_mtz", "reference_from_model"]

_INTENSITY_LABELS = ("IMEAN", "I", "IOBS", "I-obs", "I_MEAN", "IMEAN_ALL")
_AMPLITUDE_LABELS = ("F", "FP", "FOBS", "F-obs", "FMEAN", "F_MEAN")

# Keys of the ASU lookup: h, k, l each in [−2^20, 2^20).
_BITS = 21


def _keys(hkl: np.ndarray) -> np.ndarray:
    h = np.asarray(hkl, np.int64).reshape(-1, 3) + (1 << (_BITS - 1))
    return (h[:, 0] << (2 * _BITS)) | (h[:, 1] << _BITS) | h[:, 2]


@dataclass
class ReferenceIntensities:
    """Reference intensities on the reciprocal ASU of ``space_group``.

    Attributes
    ----------
    hkl : ndarray [K, 3]
        Distinct ASU indices with a finite value.
    intensity : ndarray [K]
    space_group : gemmi.SpaceGroup
    description : str
        Where they came from (file, column or model, resolution).
    """

    hkl: np.ndarray
    intensity: np.ndarray
    space_group: gemmi.SpaceGroup
    description: str

    def __post_init__(self) -> None:
        keys = _keys(self.hkl)
        order = np.argsort(keys, kind="stable")
        self._keys, self._values = keys[order], np.asarray(self.intensity, float)[order]

    def lookup(self, hkl: np.ndarray) -> np.ndarray:
        """The reference intensity of every h [M, 3] (any indices, mapped to the ASU); NaN where
        the reference has none."""
        asu, _ = to_asu(hkl, self.space_group)
        keys = _keys(asu)
        out = np.full(len(keys), np.nan)
        if len(self._keys) == 0:
            return out
        where = np.clip(np.searchsorted(self._keys, keys), 0, len(self._keys) - 1)
        found = self._keys[where] == keys
        out[found] = self._values[where[found]]
        return out


def _on_asu(hkl: np.ndarray, values: np.ndarray, space_group: gemmi.SpaceGroup,
            description: str) -> ReferenceIntensities:
    ok = np.isfinite(values)
    asu, _ = to_asu(hkl[ok], space_group)
    unique, inverse = np.unique(asu, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    mean = np.bincount(inverse, weights=values[ok], minlength=len(unique)) / \
        np.maximum(np.bincount(inverse, minlength=len(unique)), 1)
    return ReferenceIntensities(unique.astype(np.int32), mean, space_group, description)


def reference_from_mtz(path: str, space_group: gemmi.SpaceGroup, *,
                       column: str | None = None) -> ReferenceIntensities:
    """Intensities from an MTZ (see the module docstring for the column chosen).

    Raises
    ------
    ValueError
        Naming the file and the columns it has when none fits.
    """
    try:
        mtz = gemmi.read_mtz_file(path)
    except (RuntimeError, ValueError, OSError) as error:
        raise ValueError(f"{path}: not a readable MTZ file ({error})") from None
    if mtz.batches:
        raise ValueError(f"{path}: an unmerged MTZ ({len(mtz.batches)} batches); give merged "
                         "intensities or amplitudes")
    columns = {c.label: c for c in mtz.columns}
    hkl = np.ascontiguousarray(mtz.make_miller_array(), np.int32)

    def values(label: str) -> np.ndarray:
        return np.ascontiguousarray(columns[label].array, float)

    if column is not None:
        if column not in columns:
            raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(columns)})")
        kind = columns[column].type
        if kind not in "JF":
            raise ValueError(f"{path}: column {column!r} has type {kind}; give an intensity (J) "
                             "or amplitude (F) column")
        v = values(column)
        return _on_asu(hkl, v if kind == "J" else v * v, space_group,
                       f"{os.path.basename(path)} {column}{'' if kind == 'J' else '²'}")
    by_type = {t: [c.label for c in mtz.columns if c.type == t] for t in "JFKG"}
    for labels, kind in ((by_type["J"], "J"), (by_type["F"], "F")):
        if labels:
            preferred = _INTENSITY_LABELS if kind == "J" else _AMPLITUDE_LABELS
            label = next((l for l in preferred if l in labels), labels[0])
            v = values(label)
            return _on_asu(hkl, v if kind == "J" else v * v, space_group,
                           f"{os.path.basename(path)} {label}{'' if kind == 'J' else '²'}")
    for kind in "KG":
        labels = by_type[kind]
        plus = next((l for l in labels if "+" in l), None)
        minus = next((l for l in labels if "-" in l), None)
        if plus and minus:
            a, b = values(plus), values(minus)
            if kind == "G":
                a, b = a * a, b * b
            with np.errstate(invalid="ignore"):
                v = np.nanmean(np.stack([a, b]), axis=0)
            return _on_asu(hkl, v, space_group, f"{os.path.basename(path)} mean of {plus}, {minus}"
                           + ("²" if kind == "G" else ""))
    raise ValueError(f"{path}: no intensity (J), amplitude (F) or anomalous pair (K, G) column; "
                     f"columns: {', '.join(f'{c.label} ({c.type})' for c in mtz.columns)}")


def reference_from_model(path: str, space_group: gemmi.SpaceGroup, d_min: float, *,
                         unit_cell=None) -> ReferenceIntensities:
    """|Fcalc|² of a PDB or mmCIF model to ``d_min`` (see the module docstring).

    The model's own cell and space group are used for the calculation (the data's when the
    model has none); the result is mapped into ``space_group``'s ASU.
    """
    try:
        structure = gemmi.read_structure(path)
    except (RuntimeError, ValueError, OSError) as error:
        raise ValueError(f"{path}: not a readable PDB or mmCIF model ({error})") from None
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        raise ValueError(f"{path}: the model has no atoms")
    structure.setup_entities()
    if not structure.cell.is_crystal():
        if unit_cell is None:
            raise ValueError(f"{path}: the model has no unit cell (CRYST1) and the data none")
        structure.cell = gemmi.UnitCell(*np.asarray(unit_cell, float))
    if not structure.find_spacegroup():
        structure.spacegroup_hm = space_group.xhm()
    model_group = structure.find_spacegroup()
    calc = gemmi.DensityCalculatorX()
    calc.d_min = d_min
    calc.rate = 1.5
    calc.grid.setup_from(structure)
    calc.set_refmac_compatible_blur(structure[0])
    calc.put_model_density_on_grid(structure[0])
    grid = gemmi.transform_map_to_f_phi(calc.grid)
    asu = grid.prepare_asu_data(dmin=d_min, unblur=calc.blur)
    hkl = np.ascontiguousarray(asu.miller_array, np.int32)  # gemmi's views are strided
    f2 = np.abs(np.ascontiguousarray(asu.value_array)) ** 2
    if model_group.number != space_group.number:
        # expand to P1 in the model's symmetry, then onto the data's ASU
        hkl, f2 = _expand(hkl, f2, model_group)
    return _on_asu(hkl, f2, space_group, f"|Fcalc|² of {os.path.basename(path)} to {d_min:.2f} Å")


def _expand(hkl: np.ndarray, values: np.ndarray, group: gemmi.SpaceGroup):
    """Every symmetry image (and Friedel mate) of the ASU reflections of ``group``."""
    out_h, out_v = [], []
    for op in group.operations().sym_ops:
        rotated = np.asarray([op.apply_to_hkl(h) for h in hkl.tolist()], np.int32).reshape(-1, 3)
        out_h += [rotated, -rotated]
        out_v += [values, values]
    return np.concatenate(out_h), np.concatenate(out_v)


def load_reference(path: str | os.PathLike, *, space_group: gemmi.SpaceGroup, d_min: float | None,
                   unit_cell=None, column: str | None = None) -> ReferenceIntensities:
    """An MTZ or a model, by content (``.mtz`` or the MTZ magic; otherwise a coordinate file).

    Parameters
    ----------
    d_min : float or None
        The data's resolution (Å), for a model; required then.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None
    if magic == b"MTZ ":
        return reference_from_mtz(path, space_group, column=column)
    if column is not None:
        raise ValueError(f"{path}: --reference-column applies to an MTZ; this is not one")
    if d_min is None:
        raise ValueError(f"{path}: the data's resolution is unknown (no reflections)")
    return reference_from_model(path, space_group, 0.98 * d_min, unit_cell=unit_cell)
