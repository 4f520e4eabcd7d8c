"""References for import-dials: an MTZ (intensities or amplitudes) or a model (|Fcalc|²), mapped
onto the data's reciprocal ASU, NaN where absent, systematic absences flagged."""

import h5py
import numpy as np
import pytest

import gemmi
import pixelrefine as pr
from pixelrefine.dials import import_dials
from pixelrefine.reference import load_reference

from dials_format import write_dials

P43212 = "P 43 21 2"

MODEL = """\
CRYST1   31.000   33.000   35.000  90.00  90.00  90.00 P 1           1
ATOM      1  N   GLY A   1       5.100   4.900   6.000  1.00 12.00           N
ATOM      2  CA  GLY A   1       6.300   5.700   6.200  1.00 11.00           C
ATOM      3  C   GLY A   1       7.600   4.900   6.100  1.00 13.00           C
ATOM      4  O   GLY A   1       7.700   3.700   6.400  1.00 14.00           O
ATOM      5  N   SER A   2       8.700   5.600   5.700  1.00 15.00           N
ATOM      6  CA  SER A   2      10.000   5.000   5.500  1.00 16.00           C
ATOM      7  OG  SER A   2      11.900   6.800   4.100  1.00 18.00           O
ATOM      8  S   MET A   3      14.200   9.100  12.300  1.00 20.00           S
END
"""


def write_mtz(path, cell, space_group, d_min, rng, *, amplitudes=False, missing=0.2):
    sg = gemmi.SpaceGroup(space_group)
    uc = gemmi.UnitCell(*cell)
    hkl = gemmi.make_miller_array(uc, sg, d_min)
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = sg
    mtz.set_cell_for_all(uc)
    mtz.add_dataset("reference").wavelength = 1.0
    label = "FP" if amplitudes else "IMEAN"
    mtz.add_column(label, "F" if amplitudes else "J")
    mtz.add_column("SIG" + label, "Q")
    values = rng.exponential(100.0, len(hkl))
    values[rng.random(len(hkl)) < missing] = np.nan
    mtz.set_data(np.column_stack([hkl, values, np.ones(len(hkl))]).astype(np.float32))
    mtz.write_to_file(str(path))
    return {tuple(h): v for h, v in zip(hkl.tolist(), values.astype(np.float32).astype(float))}


def expected_lookup(hkl, table, space_group, square=False):
    sg = gemmi.SpaceGroup(space_group)
    asu, ops = gemmi.ReciprocalAsu(sg), sg.operations()
    out = []
    for h in hkl.tolist():
        if ops.is_systematically_absent(h):
            out.append(np.nan)
            continue
        v = table.get(tuple(asu.to_asu(h, ops)[0]), np.nan)
        out.append(v * v if square else v)
    return np.array(out)


@pytest.mark.parametrize("amplitudes", [False, True])
def test_mtz_reference_on_the_asu(tmp_path, small_set, amplitudes):
    rng = np.random.default_rng(1)
    table = write_mtz(tmp_path / "ref.mtz", small_set.unit_cell, P43212, 1.9, rng, amplitudes=amplitudes)
    write_dials(small_set, tmp_path / "s.expt", tmp_path / "s.refl", images=[0, 1, 2])
    summary = import_dials([(tmp_path / "s.expt", tmp_path / "s.refl")], tmp_path / "o.h5",
                           reference=tmp_path / "ref.mtz", space_group="P43212")
    back = pr.read_shoeboxes(tmp_path / "o.h5")
    expected = expected_lookup(back.reflections.miller_index, table, P43212, square=amplitudes)
    np.testing.assert_allclose(back.reflections.intensity_ref, expected, rtol=1e-6)
    assert np.isnan(expected).any() and np.isfinite(expected).any()
    with h5py.File(tmp_path / "o.h5") as f:
        absent = f["reflections/systematic_absence"][()].astype(bool)
    ops = gemmi.SpaceGroup(P43212).operations()
    np.testing.assert_array_equal(absent, [ops.is_systematically_absent(h)
                                           for h in back.reflections.miller_index.tolist()])
    assert summary.reference["found"] == int(np.isfinite(expected).sum())
    assert ("FP²" if amplitudes else "IMEAN") in summary.reference["source"]


def test_model_reference_is_fcalc_squared(tmp_path):
    (tmp_path / "model.pdb").write_text(MODEL)
    structure = gemmi.read_structure(str(tmp_path / "model.pdb"))
    s = pr.simulate(2, seed=4, cell=(31.0, 33.0, 35.0, 90, 90, 90), d_min=2.5, max_reflections=60)
    write_dials(s, tmp_path / "s.expt", tmp_path / "s.refl")
    summary = import_dials([(tmp_path / "s.expt", tmp_path / "s.refl")], tmp_path / "o.h5",
                           reference=tmp_path / "model.pdb")
    back = pr.read_shoeboxes(tmp_path / "o.h5")
    calc = gemmi.StructureFactorCalculatorX(structure.cell)
    direct = np.array([abs(calc.calculate_sf_from_model(structure[0], h)) ** 2
                       for h in back.reflections.miller_index.tolist()])
    got = back.reflections.intensity_ref
    assert np.all(np.isfinite(got))
    strong = direct > np.median(direct)
    np.testing.assert_allclose(got[strong], direct[strong], rtol=0.02)
    assert np.corrcoef(got, direct)[0, 1] > 0.999
    assert "Fcalc" in summary.reference["source"]


def test_reference_errors(tmp_path, small_set):
    (tmp_path / "junk.mtz").write_bytes(b"MTZ junk")
    with pytest.raises(ValueError, match="junk.mtz"):
        load_reference(tmp_path / "junk.mtz", space_group=gemmi.SpaceGroup("P 1"), d_min=2.0)
    rng = np.random.default_rng(0)
    write_mtz(tmp_path / "r.mtz", small_set.unit_cell, "P 1", 3.0, rng)
    with pytest.raises(ValueError, match="r.mtz: no column 'NOPE'.*IMEAN"):
        load_reference(tmp_path / "r.mtz", space_group=gemmi.SpaceGroup("P 1"), d_min=2.0,
                       column="NOPE")
    with pytest.raises(ValueError, match="SIGIMEAN.*type Q"):
        load_reference(tmp_path / "r.mtz", space_group=gemmi.SpaceGroup("P 1"), d_min=2.0,
                       column="SIGIMEAN")
