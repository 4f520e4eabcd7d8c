"""The optional root attributes space_group and unit_cell, and the symmetry helpers."""

import h5py
import numpy as np
import pytest

import gemmi
import pixelrefine as pr
from pixelrefine.io import ShoeboxFileError, read_tables
from pixelrefine.symmetry import (crystfel_point_group, space_group_from_hall,
                                  space_group_from_symbol, systematic_absences, to_asu)


def test_simulator_writes_symmetry_and_readers_read_it(tmp_path, small_set):
    assert small_set.space_group == "P 1"
    np.testing.assert_array_equal(small_set.unit_cell, [79.1, 79.1, 37.9, 90, 90, 90])
    path = tmp_path / "s.h5"
    pr.write_shoeboxes(path, small_set)
    with h5py.File(path) as f:
        assert f.attrs["space_group"] == "P 1"
        assert f.attrs["unit_cell"].dtype == np.float64 and f.attrs["unit_cell"].shape == (6,)
    back = pr.read_shoeboxes(path)
    assert back.space_group == "P 1"
    np.testing.assert_array_equal(back.unit_cell, small_set.unit_cell)
    tables = read_tables(path)
    assert tables.space_group == "P 1" and tables.n_images == small_set.n_images
    np.testing.assert_array_equal(tables.reflections["miller_index"],
                                  small_set.reflections.miller_index)
    assert tables.truth["images"]["G"].shape == (small_set.n_images,)


def test_symmetry_attributes_are_optional_and_checked(tmp_path, small_set):
    path = tmp_path / "s.h5"
    pr.write_shoeboxes(path, small_set)
    with h5py.File(path, "a") as f:
        del f.attrs["space_group"], f.attrs["unit_cell"]
    assert pr.read_shoeboxes(path).space_group is None
    assert read_tables(path).unit_cell is None
    with h5py.File(path, "a") as f:
        f.attrs["unit_cell"] = [1.0, 2.0, 3.0]
    with pytest.raises(ShoeboxFileError, match="s.h5.*unit_cell.*six numbers"):
        pr.read_shoeboxes(path)
    with h5py.File(path, "a") as f:
        f.attrs["unit_cell"] = [10.0, 10.0, -3.0, 90, 90, 90]
    with pytest.raises(ShoeboxFileError, match="unit_cell.*not a unit cell"):
        read_tables(path)


def test_space_groups_and_asu():
    assert space_group_from_symbol("P43212").xhm() == "P 43 21 2"
    assert space_group_from_symbol("96").xhm() == "P 43 21 2"
    assert space_group_from_hall("P 4nw 2abw").xhm() == "P 43 21 2"
    with pytest.raises(ValueError, match="'Q 7'"):
        space_group_from_symbol("Q 7")
    sg = space_group_from_symbol("P 43 21 2")
    hkl = np.array([[1, 2, 3], [-1, -2, -3], [2, 1, -3], [-2, 1, 3], [1, 2, 3]])
    asu, isym = to_asu(hkl, sg)
    assert np.all(asu == [2, 1, 3])
    reference = gemmi.ReciprocalAsu(sg)
    for h, a, i in zip(hkl.tolist(), asu.tolist(), isym.tolist()):
        assert (a, i) == tuple(reference.to_asu(h, sg.operations()))
    np.testing.assert_array_equal(systematic_absences([[0, 0, 1], [0, 0, 4], [1, 0, 0], [2, 0, 0]], sg),
                                  [True, False, True, False])


@pytest.mark.parametrize("symbol, name", [("P 1", "-1"), ("P 1 2 1", "2/m_uab"),
                                          ("C 1 2 1", "2/m_uab"), ("P 1 1 2", "2/m_uac"),
                                          ("P 43 21 2", "4/mmm"), ("P 61 2 2", "6/mmm"),
                                          ("P 3 2 1", "-3m1_H"), ("P 3 1 2", "-31m_H"),
                                          ("R 3", "-3_H"), ("R 3 :R", "-3_R"),
                                          ("P 21 21 21", "mmm"), ("I 2 3", "m-3")])
def test_crystfel_point_groups(symbol, name):
    assert crystfel_point_group(space_group_from_symbol(symbol)) == name
