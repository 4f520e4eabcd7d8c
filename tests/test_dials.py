"""DIALS in: .expt/.refl pairs written by the tests to DIALS's layout (``dials_format``), imported
without DIALS; the same geometry, counts, masks and reflections come back."""

import json

import h5py
import msgpack
import numpy as np
import pytest
from click.testing import CliRunner

import pixelrefine as pr
from pixelrefine.cli import main
from pixelrefine.dials import (DialsFormatError, ReflectionTable, attenuation_length,
                               dials_to_lab_rotation, import_dials, read_experiments)
from pixelrefine.simulate import predict, ray_on_panel, tiled_detector

from dials_format import imported_order, write_dials


@pytest.fixture(scope="module")
def tiled_set():
    """Four stills on a 2×2 tiled detector (boxes against the panels' edges included)."""
    detector = tiled_detector(2, 2, (300, 300), (10, 10), distance=80.0)
    return pr.simulate(4, seed=3, detector=detector, max_reflections=80, shoebox_size=(5, 9))


def c_pred(shoeboxes, rows=None):
    """c_pred of every reflection from the file's geometry, computed by the simulator's code."""
    refl, im = shoeboxes.reflections, shoeboxes.images
    rows = np.arange(shoeboxes.n_reflections) if rows is None else rows
    out = np.zeros((len(rows), 2))
    for n, r in enumerate(rows):
        i = refl.image_id[r]
        pred = predict(im.A_matrix[i], refl.miller_index[r][None], im.wavelength[i],
                       im.polarization_fraction[i])
        out[n], _ = ray_on_panel(shoeboxes.detector, np.array([refl.panel[r]]), pred.s_hat)
    return out


def write_pairs(tmp_path, shoeboxes, **kwargs):
    a = write_dials(shoeboxes, tmp_path / "a.expt", tmp_path / "a.refl", images=[0, 1],
                    hierarchy=True, **kwargs)
    b = write_dials(shoeboxes, tmp_path / "b.expt", tmp_path / "b.refl", images=[2, 3],
                    shoebox_version=1, seed=1, **kwargs)
    return [(tmp_path / "a.expt", tmp_path / "a.refl"), (tmp_path / "b.expt", tmp_path / "b.refl")], [a, b]


def test_round_trip_geometry_counts_masks_reflections(tmp_path, tiled_set):
    pairs, infos = write_pairs(tmp_path, tiled_set, gain=2.5)
    summary = import_dials(pairs, tmp_path / "imported.h5", gain=2.5)
    back = pr.read_shoeboxes(tmp_path / "imported.h5")  # validated by the reader and the core
    s = tiled_set
    # geometry: the same lab frame after DIALS's (hierarchy composed, beam along −z undone)
    for name in ("origin", "fast_axis", "slow_axis", "pixel_size", "size"):
        np.testing.assert_allclose(getattr(back.detector, name), getattr(s.detector, name),
                                   atol=1e-9, err_msg=name)
    np.testing.assert_allclose(back.images.A_matrix, s.images.A_matrix, atol=1e-12)
    np.testing.assert_allclose(back.images.wavelength, s.images.wavelength)
    np.testing.assert_allclose(back.images.polarization_fraction, s.images.polarization_fraction)
    # reflections: every one, experiment by experiment in table order
    orders = [imported_order(info) for info in infos]
    rows = np.concatenate([o[0] for o in orders])
    masks = [m for o in orders for m in o[1]]
    assert back.n_reflections == len(rows) == s.n_reflections
    assert summary.skipped == {"rows of no experiment (id -1: unindexed)": 2,
                               "rows without shoebox data": 2}
    for name in ("image_id", "panel", "miller_index", "bbox"):
        np.testing.assert_array_equal(getattr(back.reflections, name),
                                      getattr(s.reflections, name)[rows], err_msg=name)
    # counts (ADU / gain → photons) and masks (valid, not a neighbour's foreground)
    for n, r in enumerate(rows):
        start, size = back.reflections.pixel_offset[n], masks[n].size
        original = s.reflections.pixel_offset[r]
        np.testing.assert_allclose(back.pixels.counts[start:start + size],
                                   s.pixels.counts[original:original + size], rtol=1e-6)
        np.testing.assert_array_equal(back.pixels.mask[start:start + size], masks[n])
    neighbour_masked = sum(int((s.pixels.mask[s.reflections.pixel_offset[r]:][:m.size] == 1).sum()
                               - m.sum()) for r, m in zip(rows, masks))
    assert neighbour_masked > 20  # the test does exercise the overlap rule
    # c_pred from the imported geometry is the simulator's to 1e-6 px
    np.testing.assert_allclose(c_pred(back), s.truth["reflections"]["xyzcal"][rows], atol=1e-6)
    assert back.space_group == "P 1"
    np.testing.assert_allclose(back.unit_cell, [79.1, 79.1, 37.9, 90, 90, 90], atol=1e-9)
    with h5py.File(tmp_path / "imported.h5") as f:
        assert json.loads(f.attrs["dials_sources"])[1][1].endswith("b.refl")
        np.testing.assert_array_equal(f["images/dials_experiment"][()], [0, 1, 0, 1])


def test_a_tilted_beam_is_rotated_onto_z(tmp_path, small_set):
    direction = np.array([0.002, -0.001, 1.0])
    R = dials_to_lab_rotation(direction)
    np.testing.assert_allclose(R @ (-direction / np.linalg.norm(direction)), [0, 0, 1], atol=1e-15)
    assert np.isclose(np.linalg.det(R), 1.0)
    np.testing.assert_allclose(dials_to_lab_rotation([0, 0, 1]), np.diag([-1.0, 1, -1]))
    write_dials(small_set, tmp_path / "t.expt", tmp_path / "t.refl", direction=direction)
    import_dials([(tmp_path / "t.expt", tmp_path / "t.refl")], tmp_path / "t.h5")
    back = pr.read_shoeboxes(tmp_path / "t.h5")
    np.testing.assert_allclose(back.detector.origin, small_set.detector.origin, atol=1e-9)
    np.testing.assert_allclose(back.images.A_matrix, small_set.images.A_matrix, atol=1e-12)


def test_parallax_is_reproduced_by_a_depth_per_panel(tmp_path):
    """A Pilatus-like sensor (450 µm Si, μ = 3.9 /mm, 172 µm pixels) at 100 mm: DIALS's
    xyzcal.px includes the parallax shift; the import moves the panel by the mean absorption
    depth, which reproduces it to a small residual that the summary reports."""
    detector = pr.Detector.single_panel(100.0, (610.0, 620.0), 0.172, (1230, 1250))
    s = pr.simulate(3, seed=5, detector=detector, d_min=1.6, max_reflections=300)
    mu, thickness = 3.9, 0.45
    info = write_dials(s, tmp_path / "p.expt", tmp_path / "p.refl", parallax=(mu, thickness))
    rows, _ = imported_order(info)
    order = np.concatenate([np.flatnonzero(info["table_image"] == j) for j in range(3)])
    dials_px = info["xyzcal_px"][order]
    shift = np.linalg.norm(dials_px - info["xyzcal_plane"][order], axis=1)
    summary = import_dials([(tmp_path / "p.expt", tmp_path / "p.refl")], tmp_path / "fit.h5")
    fit = pr.read_shoeboxes(tmp_path / "fit.h5")
    residual = np.linalg.norm(c_pred(fit) - dials_px, axis=1)
    p = summary.parallax
    depth = fit.detector.origin[0, 2] - s.detector.origin[0, 2]
    assert p["panels_corrected"] == 1 and p["n"] == len(rows)
    np.testing.assert_allclose(p["uncorrected_px_max"], shift.max(), rtol=1e-6)
    np.testing.assert_allclose(p["uncorrected_px_rms"], np.sqrt(np.mean(shift**2)), rtol=1e-6)
    # the summary's residual is the residual of the written geometry (to the linearisation)
    np.testing.assert_allclose(p["residual_px_max"], residual.max(), atol=2e-3)
    print(f"parallax left out: rms {p['uncorrected_px_rms']:.3f}, max {p['uncorrected_px_max']:.3f} px;"
          f" depth {depth:.4f} mm: residual rms {p['residual_px_rms']:.4f}, max {p['residual_px_max']:.4f}")
    assert shift.max() > 0.3          # what leaving it out costs here
    assert residual.max() < 0.25 * shift.max() and residual.max() < 0.08
    # Δ is a mean of o(ŝ)·cos over the spots: o·cos falls slowly from its normal-incidence value
    assert 0.9 * attenuation_length(mu, thickness, 1.0) < depth <= attenuation_length(mu, thickness, 1.0)
    summary = import_dials([(tmp_path / "p.expt", tmp_path / "p.refl")], tmp_path / "none.h5",
                           parallax="none")
    none = pr.read_shoeboxes(tmp_path / "none.h5")
    np.testing.assert_allclose(none.detector.origin, s.detector.origin, atol=1e-9)
    np.testing.assert_allclose(c_pred(none), info["xyzcal_plane"][order], atol=1e-6)
    assert summary.parallax["panels_corrected"] == 0
    assert "parallax not applied" in summary.text()


def test_table_reader_reads_columns_in_place(tmp_path, small_set):
    write_dials(small_set, tmp_path / "s.expt", tmp_path / "s.refl", images=[0])
    with ReflectionTable(tmp_path / "s.refl") as table:
        raw = msgpack.unpackb((tmp_path / "s.refl").read_bytes(), strict_map_key=False)
        data = raw[2]["data"]
        assert table.nrows == raw[2]["nrows"] and set(table.columns) == set(data)
        for name in ("miller_index", "xyzcal.px", "id", "panel", "bbox", "entering"):
            kind, (count, blob) = data[name]
            expected = np.frombuffer(blob, {"cctbx::miller::index<>": "<i4", "vec3<double>": "<f8",
                                            "int": "<i4", "std::size_t": "<u8", "int6": "<i4",
                                            "bool": "u1"}[kind])
            np.testing.assert_array_equal(table.column(name).reshape(-1), expected)
        index = table.shoebox_index()
        assert index.flag[-1] == 0 and np.all(index.flag[:-1] == 2)
        with pytest.raises(DialsFormatError, match="s.refl.*no column 'nope'"):
            table.column("nope")
        with pytest.raises(DialsFormatError, match="'shoebox'.*not a numeric column"):
            table.column("shoebox")


def test_errors_name_file_column_and_row(tmp_path, small_set):
    write_dials(small_set, tmp_path / "n.expt", tmp_path / "n.refl", images=[0], with_shoeboxes=False)
    with pytest.raises(DialsFormatError, match=r"n\.refl.*no 'shoebox' column.*debug\.output\.shoeboxes=True"):
        import_dials([(tmp_path / "n.expt", tmp_path / "n.refl")], tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()
    # a truncated table
    write_dials(small_set, tmp_path / "t.expt", tmp_path / "t.refl", images=[0])
    blob = (tmp_path / "t.refl").read_bytes()
    (tmp_path / "cut.refl").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DialsFormatError, match="cut.refl.*truncated"):
        import_dials([(tmp_path / "t.expt", tmp_path / "cut.refl")], tmp_path / "o.h5")
    # a shoebox record with a bad flag, named by row
    raw = msgpack.unpackb(blob, strict_map_key=False)
    sb = bytearray(raw[2]["data"]["shoebox"][1][1])
    sb[28] = 7  # the first record's data flag
    raw[2]["data"]["shoebox"][1][1] = bytes(sb)
    (tmp_path / "bad.refl").write_bytes(msgpack.packb(raw, use_bin_type=True))
    with pytest.raises(DialsFormatError, match="bad.refl: column 'shoebox' row 0: data flag 7"):
        import_dials([(tmp_path / "t.expt", tmp_path / "bad.refl")], tmp_path / "o.h5")
    # a still spans one frame
    raw = msgpack.unpackb(blob, strict_map_key=False)
    sb = bytearray(raw[2]["data"]["shoebox"][1][1])
    sb[24:28] = (2).to_bytes(4, "little", signed=True)  # z1 of row 0 → two frames
    raw[2]["data"]["shoebox"][1][1] = bytes(sb)
    (tmp_path / "rot.refl").write_bytes(msgpack.packb(raw, use_bin_type=True))
    with pytest.raises(DialsFormatError, match="rot.refl: column 'shoebox'"):
        import_dials([(tmp_path / "t.expt", tmp_path / "rot.refl")], tmp_path / "o.h5")
    (tmp_path / "x.expt").write_text("{\"__id__\": \"Other\"}")
    with pytest.raises(DialsFormatError, match="x.expt: not a DIALS experiment list"):
        read_experiments(tmp_path / "x.expt")
    (tmp_path / "x.refl").write_bytes(msgpack.packb({"a": 1}))
    with pytest.raises(DialsFormatError, match="x.refl: not a DIALS reflection table"):
        ReflectionTable(tmp_path / "x.refl")


def test_space_group_override_and_cli(tmp_path, small_set):
    write_dials(small_set, tmp_path / "s.expt", tmp_path / "s.refl", images=[0, 1],
                hall_symbol="-P 6 2")  # DIALS 3.12's holohedry P 6/m m m
    runner = CliRunner()
    r = runner.invoke(main, ["import-dials", str(tmp_path / "s.expt"), str(tmp_path / "s.refl"),
                             str(tmp_path / "o.h5")])
    assert r.exit_code == 0, r.output
    assert pr.read_shoeboxes(tmp_path / "o.h5").space_group == "P 6/m m m"
    r = runner.invoke(main, ["import-dials", str(tmp_path / "s.expt"), str(tmp_path / "s.refl"),
                             str(tmp_path / "o.h5"), "--space-group", "P 61 2 2", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert "space group P 61 2 2" in r.output and "2 images" in r.output
    back = pr.read_shoeboxes(tmp_path / "o.h5")
    assert back.space_group == "P 61 2 2"
    with h5py.File(tmp_path / "o.h5") as f:
        absent = f["reflections/systematic_absence"][()].astype(bool)
    hkl = back.reflections.miller_index
    expected = (hkl[:, 0] == 0) & (hkl[:, 1] == 0) & (hkl[:, 2] % 6 != 0)
    np.testing.assert_array_equal(absent, expected)
    r = runner.invoke(main, ["import-dials", str(tmp_path / "s.expt"), str(tmp_path / "o.h5")])
    assert r.exit_code != 0 and "pairs" in r.output
    r = runner.invoke(main, ["import-dials", str(tmp_path / "s.expt"), str(tmp_path / "s.refl"),
                             str(tmp_path / "o.h5")])
    assert r.exit_code != 0 and "--overwrite" in r.output and "Traceback" not in r.output


def test_large_tables_are_read_in_bounded_memory(tmp_path):
    """A 44 MB table of 10 stills: the import's peak (traced) memory is a few images' worth,
    not the table's (the table is read in place; counts are written image by image)."""
    import tracemalloc

    n_images, per_image, side = 10, 1200, 20
    detector = pr.Detector.single_panel(100.0, (500.0, 500.0), 0.1, (1000, 1000))
    s = pr.simulate(n_images, seed=1, detector=detector, max_reflections=5)
    write_dials(s, tmp_path / "big.expt", tmp_path / "small.refl", extra_rows=False)
    n = n_images * per_image
    rng = np.random.default_rng(0)
    record = np.dtype([("panel", "<u4"), ("bbox", "<i4", 6), ("flag", "u1"),
                       ("data", "<f4", side * side), ("mask", "u1", side * side),
                       ("background", "<f4", side * side)])
    records = np.zeros(n, record)
    x0 = rng.integers(0, 1000 - side, n)
    y0 = rng.integers(0, 1000 - side, n)
    records["bbox"] = np.column_stack([x0, x0 + side, y0, y0 + side, np.zeros(n), np.ones(n)])
    records["flag"] = 2
    records["data"] = rng.poisson(3.0, (n, side * side))
    records["mask"] = 1 | 2
    hkl = np.column_stack([rng.integers(1, 30, n), rng.integers(-30, 30, n), rng.integers(-15, 15, n)])
    ids = np.repeat(np.arange(n_images), per_image)
    identifiers = json.loads((tmp_path / "big.expt").read_text())["experiment"]
    table = ["dials::af::reflection_table", 2,
             {"identifiers": {i: e["identifier"] for i, e in enumerate(identifiers)}, "nrows": n,
              "data": {"miller_index": ["cctbx::miller::index<>", [n, hkl.astype("<i4").tobytes()]],
                       "id": ["int", [n, ids.astype("<i4").tobytes()]],
                       "shoebox": ["Shoebox<>", [n, records.tobytes()]]}}]
    (tmp_path / "big.refl").write_bytes(msgpack.packb(table, use_bin_type=True))
    del records, table
    size = (tmp_path / "big.refl").stat().st_size
    assert size > 40e6
    tracemalloc.start()
    summary = import_dials([(tmp_path / "big.expt", tmp_path / "big.refl")], tmp_path / "big.h5",
                           compression=None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert summary.n_reflections == n and summary.n_pixels == n * side * side
    one_image = per_image * side * side * 5  # its counts (f4) and masks (u1)
    print(f"table {size / 1e6:.1f} MB, one image {one_image / 1e6:.1f} MB, peak {peak / 1e6:.1f} MB")
    assert peak < 0.15 * size and peak < 3 * one_image, (peak, size)
    back = read_experiments(tmp_path / "big.expt")[0]
    assert len(back) == n_images


def test_dials_to_mtz_on_the_command_line(tmp_path):
    """The README's path: DIALS files → import-dials (with an MTZ reference) → refine →
    export-mtz → merge → report --html."""
    import gemmi

    s = pr.simulate(6, seed=8, max_reflections=120)
    write_dials(s, tmp_path / "a.expt", tmp_path / "a.refl", images=[0, 1, 2], gain=2.0)
    write_dials(s, tmp_path / "b.expt", tmp_path / "b.refl", images=[3, 4, 5], gain=2.0, seed=3)
    hkl, first = np.unique(s.reflections.miller_index, axis=0, return_index=True)
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup("P 1")
    mtz.set_cell_for_all(gemmi.UnitCell(*s.unit_cell))
    mtz.add_dataset("ref").wavelength = 1.3
    mtz.add_column("I", "J")
    mtz.set_data(np.column_stack([hkl, s.reflections.intensity_ref[first]]).astype(np.float32))
    mtz.write_to_file(str(tmp_path / "ref.mtz"))
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    out = run("import-dials", tmp_path / "a.expt", tmp_path / "a.refl", tmp_path / "b.expt",
              tmp_path / "b.refl", tmp_path / "stills.h5", "--gain", 2.0, "--reference",
              tmp_path / "ref.mtz")
    assert "6 images" in out and "reference ref.mtz I" in out
    run("refine", tmp_path / "stills.h5", tmp_path / "results.h5", "--threads", 2, "--no-progress")
    run("export-mtz", tmp_path / "results.h5", tmp_path / "unmerged.mtz")
    out = run("merge", tmp_path / "results.h5", tmp_path / "merged.mtz", "--shells", 3)
    assert "overall" in out
    unmerged = gemmi.read_mtz_file(str(tmp_path / "unmerged.mtz"))
    merged = gemmi.read_mtz_file(str(tmp_path / "merged.mtz"))
    assert len(unmerged.batches) == 6 and unmerged.nreflections > 500
    assert merged.nreflections > 300
    run("report", tmp_path / "results.h5", "--html", tmp_path / "report.html")
    assert "merge-shells" in (tmp_path / "report.html").read_text(encoding="utf-8")
