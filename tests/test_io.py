"""HDF5 files: round trips, compression filters, tolerated variations and every malformed
input refused with an error naming file, dataset and row."""

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest

import pixelrefine as pr
from pixelrefine.io import ShoeboxFileError

from conftest import R0

GROUPS = ("detector", "images", "reflections", "pixels")


def assert_same_set(a, b):
    for group in GROUPS:
        ga, gb = getattr(a, group), getattr(b, group)
        for name in vars(ga):
            va, vb = getattr(ga, name), getattr(gb, name)
            assert va.dtype == vb.dtype, (group, name)
            np.testing.assert_array_equal(va, vb, err_msg=f"{group}/{name}")


@pytest.mark.parametrize("compression", [None, "gzip", "lzf", "bitshuffle-lz4"])
def test_shoebox_round_trip(tmp_path, small_set, compression):
    path = tmp_path / f"set-{compression}.h5"
    pr.write_shoeboxes(path, small_set, compression=compression)
    back = pr.read_shoeboxes(path)
    assert_same_set(small_set, back)
    np.testing.assert_array_equal(back.truth["images"]["G"], small_set.truth["images"]["G"])
    if compression:
        with h5py.File(path) as f:
            assert f["pixels/counts"].chunks is not None
            assert f["pixels/counts"].compression is not None or f["pixels/counts"]._filters


def test_results_round_trip(tmp_path, small_set, shoebox_file):
    results = pr.refine(pr.read_shoeboxes(shoebox_file), R0=R0)
    path = tmp_path / "results.h5"
    pr.write_results(path, results)
    back = pr.read_results(path)
    for group in ("images", "crystals", "reflections"):
        for name, value in getattr(results, group).items():
            np.testing.assert_array_equal(getattr(back, group)[name], value, err_msg=name)
    assert back.parameter_names == results.parameter_names
    assert back.parameter_names[:3] == ["G", "B", "R1"]
    assert back.objective == "factored"
    assert back.input_file == str(shoebox_file)
    assert back.options["R0"] == [R0]
    with h5py.File(path) as f:
        assert f.attrs["format"] == "pixelrefine.results"
        assert np.issubdtype(np.asarray(f.attrs["format_version"]).dtype, np.integer)
        assert set(json.loads(f["reflections/flags"].attrs["bits"]).values()) >= {"no_reference", "outlier"}
        assert json.loads(f.attrs["options"])["objective"] == "factored"


def test_never_writes_into_input(tmp_path, shoebox_file):
    digest = hashlib.sha256(shoebox_file.read_bytes()).hexdigest()
    shoeboxes = pr.read_shoeboxes(shoebox_file)
    results = pr.refine(shoeboxes, R0=R0)
    with pytest.raises(ValueError, match="input"):
        pr.write_results(shoebox_file, results, overwrite=True)
    with pytest.raises(ValueError, match="input"):
        pr.write_shoeboxes(shoebox_file, shoeboxes)
    out = tmp_path / "r.h5"
    pr.write_results(out, results)
    with pytest.raises(FileExistsError):
        pr.write_results(out, results)
    assert hashlib.sha256(shoebox_file.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5", "shoeboxes.h5"]  # no temporaries


def test_tolerated_variations(tmp_path, shoebox_file):
    """Other float/int dtypes, extra datasets and attributes, optional datasets absent."""
    path = tmp_path / "variant.h5"
    shutil.copy(shoebox_file, path)
    with h5py.File(path, "r+") as f:
        for name, dtype in [("images/wavelength", "f4"), ("reflections/bbox", "i8"),
                            ("reflections/image_id", "u4"), ("pixels/mask", "u2"),
                            ("pixels/counts", "f8"), ("reflections/miller_index", "i2")]:
            data = f[name][()].astype(dtype)
            del f[name]
            f.create_dataset(name, data=data, chunks=True, compression="gzip")
        del f["reflections/panel"], f["reflections/background"], f["detector/read_noise"]
        f["reflections/extra_column"] = np.arange(len(f["reflections/image_id"]))
        f["reflections"].attrs["written_by"] = "another tool"
        f.attrs["comment"] = "extra root attribute"
        f.create_group("calibration")["gain"] = 1.0
        f.attrs["format_version"] = np.int16(1)
        reference = f["reflections/intensity_ref"][()]
        reference[8], reference[2] = -3.0, 0.0  # real references have zero and negative entries
        _set(f, "reflections/intensity_ref", reference)
    back = pr.read_shoeboxes(path)
    assert back.n_reflections > 0
    assert np.all(back.reflections.panel == 0) and np.all(np.isnan(back.reflections.background))
    assert back.reflections.intensity_ref[8] == -3.0 and back.reflections.intensity_ref[2] == 0.0
    pr.refine(back, R0=R0, profile="isotropic")


def _set(f, name, value):
    data = f[name][()]
    del f[name]
    f[name] = value(data) if callable(value) else value


def _row_value(name, row, value):
    def edit(f):
        data = f[name][()]
        data[row] = value
        _set(f, name, data)
    return edit


MALFORMED = [
    ("no format attribute", lambda f: f.attrs.__delitem__("format"), ["'format'"]),
    ("another format", lambda f: f.attrs.__setitem__("format", "dials.refl"), ["'format'"]),
    ("format_version 2", lambda f: f.attrs.__setitem__("format_version", 2), ["format_version 2"]),
    ("format_version float", lambda f: f.attrs.__setitem__("format_version", 1.0), ["format_version", "integer"]),
    ("missing group", lambda f: f.__delitem__("images"), ["/images"]),
    ("missing counts", lambda f: f.__delitem__("pixels/counts"), ["/pixels/counts"]),
    ("integer counts", lambda f: _set(f, "pixels/counts", lambda d: d.astype("i4")), ["/pixels/counts", "float"]),
    ("float bbox", lambda f: _set(f, "reflections/bbox", lambda d: d.astype("f8")), ["/reflections/bbox", "integer"]),
    ("bbox with 3 columns", lambda f: _set(f, "reflections/bbox", lambda d: d[:, :3]), ["/reflections/bbox", "shape"]),
    ("short column", lambda f: _set(f, "reflections/intensity_ref", lambda d: d[:-1]), ["/reflections/intensity_ref", "shape"]),
    ("A_matrix 2x3", lambda f: _set(f, "images/A_matrix", lambda d: d[:, :2, :]), ["/images/A_matrix"]),
    ("image_id out of range", _row_value("reflections/image_id", 5, 99), ["/reflections/image_id", "row 5"]),
    ("image_id unsorted", _row_value("reflections/image_id", 0, 3), ["/reflections/image_id", "sorted"]),
    ("bbox outside panel", _row_value("reflections/bbox", 3, [-2, 5, 10, 17]), ["/reflections/bbox", "row 3", "outside"]),
    ("empty bbox", _row_value("reflections/bbox", 4, [10, 10, 10, 17]), ["/reflections/bbox", "row 4", "empty"]),
    ("pixel_offset beyond pixels", _row_value("reflections/pixel_offset", 7, 10**9), ["/reflections/pixel_offset", "row 7"]),
    ("NaN in a valid pixel", _row_value("pixels/counts", 12, np.nan), ["/pixels/counts", "row 12", "not finite"]),
    ("mask value 2", _row_value("pixels/mask", 9, 2), ["/pixels/mask", "row 9"]),
    ("infinite reference", _row_value("reflections/intensity_ref", 2, np.inf), ["/reflections/intensity_ref", "row 2"]),
    ("hkl 000", _row_value("reflections/miller_index", 6, [0, 0, 0]), ["/reflections/miller_index", "row 6"]),
    ("panel out of range", _row_value("reflections/panel", 10, 3), ["/reflections/panel", "row 10"]),
    ("panel beyond int16", lambda f: _set(f, "reflections/panel", lambda d: np.full(len(d), 40000, "i4")), ["/reflections/panel", "row 0", "range"]),
    ("fast axis not unit", _row_value("detector/fast_axis", 0, [2.0, 0.0, 0.0]), ["/detector/fast_axis", "row 0", "unit"]),
    ("slow parallel to fast", _row_value("detector/slow_axis", 0, [1.0, 0.0, 0.0]), ["/detector/slow_axis", "row 0", "parallel"]),
    ("pixel size zero", _row_value("detector/pixel_size", 0, 0.0), ["/detector/pixel_size", "row 0"]),
    ("wavelength negative", _row_value("images/wavelength", 1, -1.0), ["/images/wavelength", "row 1"]),
    ("bandwidth NaN", _row_value("images/bandwidth", 2, np.nan), ["/images/bandwidth", "row 2"]),
    ("polarisation 1.5", _row_value("images/polarization_fraction", 0, 1.5), ["/images/polarization_fraction", "row 0"]),
    ("singular A", _row_value("images/A_matrix", 3, np.zeros((3, 3))), ["/images/A_matrix", "row 3", "singular"]),
    ("background inf", _row_value("reflections/background", 0, np.inf), ["/reflections/background", "row 0"]),
    ("counts is a group", lambda f: (f.__delitem__("pixels/counts"), f.create_group("pixels/counts")), ["/pixels/counts"]),
]


@pytest.mark.parametrize("case, edit, expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_input_is_refused_clearly(tmp_path, shoebox_file, case, edit, expected):
    path = tmp_path / "bad.h5"
    shutil.copy(shoebox_file, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ShoeboxFileError) as error:
        pr.read_shoeboxes(path)
    message = str(error.value)
    assert message.startswith(str(path)), message
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_not_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("not hdf5")
    with pytest.raises(ShoeboxFileError, match="text.h5.*not a readable HDF5"):
        pr.read_shoeboxes(path)


def test_in_memory_set_validated_by_core(small_set):
    refl = small_set.reflections
    bbox = refl.bbox.copy()
    bbox[11] = [0, 5000, 0, 7]
    bad = pr.ShoeboxSet(small_set.detector, small_set.images,
                        pr.Reflections(refl.image_id, refl.miller_index, refl.intensity_ref, bbox,
                                       refl.pixel_offset), small_set.pixels)
    with pytest.raises(ValueError, match="in-memory.*/reflections/bbox row 11"):
        pr.refine(bad, R0=R0)


def test_shoebox_view_of_one_reflection(small_set):
    row = int(np.flatnonzero(small_set.reflections.bbox[:, 1] - small_set.reflections.bbox[:, 0] == 7)[3])
    box = small_set.shoebox(row)
    x0, x1, y0, y1 = small_set.reflections.bbox[row]
    assert box.shape == (y1 - y0, x1 - x0)
    start = small_set.reflections.pixel_offset[row]
    flat = small_set.pixels.counts[start:start + box.size]
    valid = small_set.pixels.mask[start:start + box.size] == 1
    np.testing.assert_array_equal(box.reshape(-1)[valid], flat[valid])
    assert np.all(np.isnan(box.reshape(-1)[~valid]))


# ------------------------------------------------------------------ killed writers

KILL_MID_WRITE = """
import os, signal, sys
import h5py
import pixelrefine as pr
shoeboxes = pr.read_shoeboxes(sys.argv[1])
results = pr.refine(shoeboxes, R0=float(sys.argv[3]))
original = h5py.Group.create_dataset
written = []
def create_then_die(self, name, *args, **kwargs):
    written.append(name)
    if len(written) == 12:  # half-way through the results' datasets
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, name, *args, **kwargs)
h5py.Group.create_dataset = create_then_die
pr.write_results(sys.argv[2], results)
"""


def test_a_killed_writer_leaves_no_result_and_the_next_write_cleans_up(tmp_path, shoebox_file):
    import signal
    import subprocess
    import sys

    out = tmp_path / "results.h5"
    run = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(shoebox_file), str(out), str(R0)],
                         capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not out.exists()  # nothing half-written under the output's name
    partials = [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert len(partials) == 1 and partials[0].name.startswith(".results.h5.pixelrefine-")
    with pytest.raises(ValueError, match="partial file"):
        pr.read_results(partials[0])
    results = pr.refine(pr.read_shoeboxes(shoebox_file), R0=R0)
    pr.write_results(out, results)
    assert not partials[0].exists()
    assert pr.read_results(out).n_images == results.n_images


def test_partials_of_running_writers_and_of_other_outputs_are_kept(tmp_path):
    import subprocess

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        alive = tmp_path / f".out.h5.pixelrefine-{sleeper.pid}-0a1b.part"
        other = tmp_path / ".other.h5.pixelrefine-999999999-0a1b.part"
        dead = tmp_path / ".out.h5.pixelrefine-999999999-0a1b.part"
        for p in (alive, other, dead):
            p.write_bytes(b"x")
        removed = pr.io.remove_stale_partials(tmp_path / "out.h5")
        assert removed == [str(dead)]
        assert alive.exists() and other.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_output_path_checked_before_any_work(tmp_path, shoebox_file):
    from click.testing import CliRunner

    from pixelrefine.cli import main

    missing = tmp_path / "no-such-folder" / "r.h5"
    result = CliRunner().invoke(main, ["refine", str(shoebox_file), str(missing), "--R0", str(R0)])
    assert result.exit_code == 1 and "does not exist" in result.output
    assert "Traceback" not in result.output and "refined" not in result.output
