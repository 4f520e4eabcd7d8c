"""MTZ out: unmerged intensities as DIALS's export writes them, with gemmi (METHODS.md §I.19).

One row per integrated reflection: H K L (the ASU index) M/ISYM (the symmetry operator back to
the observed index, as MTZ stores it) BATCH (image + 1), I SIGI (intensity_scaled), IPR SIGIPR
(intensity_prf), FRACTIONCALC (the partiality), XDET YDET (pixels on the reflection's panel:
the fitted centre, else c_pred), BG (background, photons per pixel), FLAG (pixelrefine's
reflection flags). One batch per image with DIALS's header fields: the image's cell, its
orientation U (Mosflm's convention: U = UB·B_Mosflm⁻¹ in DIALS's lab frame, column-major), the
wavelength, the source direction, the detector distance and the first panel's size.
"""

from __future__ import annotations

import math

import numpy as np

import gemmi

from .io import ShoeboxTables
from .merge import unit_cell_of
from .refine import Results
from .symmetry import space_group_of, to_asu

__all__ = ["unmerged_mtz", "write_unmerged_mtz", "mosflm_B", "UNMERGED_COLUMNS",
           "LAB_TO_DIALS"]

#: Column labels and MTZ types after H K L.
UNMERGED_COLUMNS = (("M/ISYM", "Y"), ("BATCH", "B"), ("I", "J"), ("SIGI", "Q"), ("IPR", "J"),
                    ("SIGIPR", "Q"), ("FRACTIONCALC", "R"), ("XDET", "R"), ("YDET", "R"),
                    ("BG", "R"), ("FLAG", "I"))

#: conventions.md's lab frame to DIALS's (beam along −z): 180° about y.
LAB_TO_DIALS = np.diag([-1.0, 1.0, -1.0])


def mosflm_B(cell: gemmi.UnitCell) -> np.ndarray:
    """Mosflm's B (as DIALS's ``ub_to_mosflm_u``) from the reciprocal cell."""
    a, b, c, alpha, beta, gamma = cell.parameters
    r = cell.reciprocal()
    ra, rb, rc = r.a, r.b, r.c
    ralpha, rbeta, rgamma = (math.radians(v) for v in (r.alpha, r.beta, r.gamma))
    return np.array([[ra, rb * math.cos(rgamma), rc * math.cos(rbeta)],
                     [0.0, rb * math.sin(rgamma), -rc * math.sin(rbeta) * math.cos(math.radians(alpha))],
                     [0.0, 0.0, 1.0 / c]])


def _cell_of_A(A: np.ndarray) -> gemmi.UnitCell:
    a, b, c = np.linalg.inv(A)

    def angle(u, v):
        return math.degrees(math.acos(float(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))))

    return gemmi.UnitCell(float(np.linalg.norm(a)), float(np.linalg.norm(b)), float(np.linalg.norm(c)),
                          angle(b, c), angle(a, c), angle(a, b))


def unmerged_mtz(results: Results, tables: ShoeboxTables, *, space_group=None) -> gemmi.Mtz:
    """The unmerged MTZ of a refinement (see the module docstring).

    Parameters
    ----------
    results : Results
    tables : ShoeboxTables
        The shoebox file the results came from (``io.read_tables``): Miller indices, images,
        the detector, the symmetry.
    space_group : str, optional
        Instead of the file's ``space_group``.

    Raises
    ------
    ValueError
        No space group known, or results and file that do not belong together.
    """
    sg = space_group_of(space_group or tables.space_group, what=f"{tables.source}: ")
    refl, tab = results.reflections, tables.reflections
    n = len(refl["flags"])
    if len(tab["image_id"]) != n or tables.n_images != results.n_images:
        raise ValueError(f"{tables.source}: has {len(tab['image_id'])} reflections and "
                         f"{tables.n_images} images, the results {n} and {results.n_images}: not "
                         "the shoebox file these results came from (pass --shoeboxes)")
    rows = np.flatnonzero(np.isfinite(refl["intensity_prf"]) & (refl["intensity_prf_sigma"] > 0))
    if rows.size == 0:
        raise ValueError(f"{results.input_file or 'results'}: no integrated reflection to export")
    asu, isym = to_asu(tab["miller_index"][rows], sg)
    xy = refl["xyzobs"][rows]
    xy = np.where(np.isfinite(xy), xy, refl["xyzcal"][rows])
    columns = [asu[:, 0], asu[:, 1], asu[:, 2], isym, tab["image_id"][rows] + 1,
               refl["intensity_scaled"][rows], refl["intensity_scaled_sigma"][rows],
               refl["intensity_prf"][rows], refl["intensity_prf_sigma"][rows],
               refl["partiality"][rows], xy[:, 0], xy[:, 1], refl["background"][rows],
               refl["flags"][rows]]
    cell = gemmi.UnitCell(*unit_cell_of(tables))
    wavelengths = tables.images["wavelength"]
    mtz = gemmi.Mtz(with_base=True)
    mtz.title = "pixelrefine unmerged intensities"
    mtz.spacegroup = sg
    mtz.set_cell_for_all(cell)
    ds = mtz.add_dataset("pixelrefine")
    ds.project_name, ds.crystal_name = "pixelrefine", "crystal"
    ds.wavelength = float(np.mean(wavelengths))
    for label, kind in UNMERGED_COLUMNS:
        mtz.add_column(label, kind)
    mtz.set_data(np.column_stack(columns).astype(np.float32))
    _add_batches(mtz, tables)
    mtz.history = [f"From pixelrefine {results.package_version} ({results.objective}), "
                   f"{tables.source}"[:80]]
    return mtz


def _add_batches(mtz: gemmi.Mtz, tables: ShoeboxTables) -> None:
    det = tables.detector
    normal = np.cross(det["fast_axis"][0], det["slow_axis"][0])
    normal /= np.linalg.norm(normal)
    distance = float(abs(det["origin"][0] @ normal))
    source = np.array([0.0, 0.0, 1.0])  # sample to source, DIALS's frame
    batches = []
    for i, (A, wavelength) in enumerate(zip(tables.images["A_matrix"], tables.images["wavelength"])):
        cell = _cell_of_A(A)
        batch = gemmi.Mtz.Batch()
        batch.number = i + 1
        batch.title = f"Batch {i + 1}"
        batch.dataset_id = 1
        batch.wavelength = float(wavelength)
        batch.ints[12] = 1   # ncryst
        batch.ints[14] = 2   # ldtype 3D (as DIALS)
        batch.ints[15] = 1   # jsaxs
        batch.ints[17] = 1   # ngonax
        batch.ints[19] = 1   # ndet
        batch.cell = cell
        U = (LAB_TO_DIALS @ A) @ np.linalg.inv(mosflm_B(cell))
        floats = batch.floats
        for j, value in enumerate(U.T.reshape(9)):  # column-major
            floats[6 + j] = float(value)
        floats[43] = 1.0                         # bscale
        floats[80 + int(np.argmin(source))] = -1.0  # idealised source (DIALS's rule)
        for j in range(3):
            floats[83 + j] = float(source[j])     # source
        floats[111] = distance                   # dx
        floats[114] = float(det["size"][0][0])   # NX
        floats[116] = float(det["size"][0][1])   # NY
        batch.floats = floats
        batch.axes = ["AXIS"]
        batches.append(batch)
    mtz.batches = batches


def write_unmerged_mtz(path: str, results: Results, tables: ShoeboxTables, *,
                       space_group=None) -> gemmi.Mtz:
    """``unmerged_mtz`` written to ``path``; returns it."""
    mtz = unmerged_mtz(results, tables, space_group=space_group)
    mtz.write_to_file(str(path))
    return mtz
