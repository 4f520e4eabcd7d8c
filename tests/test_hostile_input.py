"""Hostile input (issue 8): files and hand-built sets that must be refused in one line naming
the file, the dataset and the first bad row, or read; never a crash, hang or traceback; and
no non-finite result without a status or flag that explains it."""

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import pixelrefine as pr
from pixelrefine import _core, fuzz
from pixelrefine.cli import main
from pixelrefine.validation import ResultsCheckError, check_results, unexplained

from conftest import R0


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """One still, 20 reflections in 5×5 boxes: the fuzzer's smallest starting file."""
    return fuzz.make_bases(str(tmp_path_factory.mktemp("bases")))["one"]


def _copy_with(tmp_path, source, name, value):
    path = tmp_path / "edited.h5"
    shutil.copyfile(source, path)
    with h5py.File(path, "r+") as f:
        del f[name]
        f[name] = value
    return path


def refine_command(*args):
    return CliRunner().invoke(main, ["refine", *map(str, args), "--R0", str(R0), "--threads", "1",
                                     "--option", "max_global=1"])


# ------------------------------------------------------------------ the examples

def test_pixel_offset_near_int64_max_is_refused_by_reader_and_core(tmp_path, tiny_file):
    with h5py.File(tiny_file) as f:
        offsets = f["reflections/pixel_offset"][()]
    offsets[10] = 2**63 - 10  # overflowed `off + area` in the core's bounds check (SIGSEGV)
    path = _copy_with(tmp_path, tiny_file, "reflections/pixel_offset", offsets)
    result = refine_command(path, tmp_path / "out.h5")
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {path}: /reflections/pixel_offset row 10: shoebox "
                                     f"runs outside /pixels")
    # The core checks it too, reached from Python without the reader.
    s = pr.read_shoeboxes(tiny_file)
    arrays = _core_arrays(s)
    arrays[16] = offsets.astype(np.int64)
    with pytest.raises(ValueError, match=r"/reflections/pixel_offset row 10: shoebox runs outside"):
        _core.CoreShoeboxSet(*arrays)


def test_boxes_sharing_pixels_are_refused_not_refined(tmp_path, tiny_file):
    with h5py.File(tiny_file) as f:
        zeros = np.zeros_like(f["reflections/pixel_offset"][()])
    path = _copy_with(tmp_path, tiny_file, "reflections/pixel_offset", zeros)
    result = refine_command(path, tmp_path / "out.h5")
    assert result.exit_code == 1
    assert "/reflections/pixel_offset row 1: shoebox overlaps row 0's pixels" in result.output
    assert not (tmp_path / "out.h5").exists()


def test_truth_that_is_a_dataset_is_ignored(tmp_path, tiny_file):
    path = _copy_with(tmp_path, tiny_file, "truth", np.arange(4))
    result = refine_command(path, tmp_path / "out.h5")
    assert result.exit_code == 0, result.output
    assert pr.read_shoeboxes(path).truth is None


@pytest.mark.parametrize("link, expected", [
    (h5py.SoftLink("/reflections/nowhere"), "soft link to an object that does not exist"),
    (h5py.ExternalLink("/nonexistent/file.h5", "/reflections/background"), "external link"),
])
def test_links_on_an_optional_dataset_are_refused_clearly(tmp_path, tiny_file, link, expected):
    path = _copy_with(tmp_path, tiny_file, "reflections/background", link)
    result = refine_command(path, tmp_path / "out.h5")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {path}: /reflections/background")
    assert expected in result.output and len(result.output.strip().splitlines()) == 1


def test_soft_link_within_the_file_is_read(tmp_path, tiny_file):
    path = tmp_path / "linked.h5"
    shutil.copyfile(tiny_file, path)
    with h5py.File(path, "r+") as f:
        f.move("pixels/counts", "pixels/counts_stored")
        f["pixels/counts"] = h5py.SoftLink("counts_stored")
    np.testing.assert_array_equal(pr.read_shoeboxes(path).pixels.counts,
                                  pr.read_shoeboxes(tiny_file).pixels.counts)


ZEROED_HEAP = """
import sys
from pixelrefine.io import read_shoeboxes, ShoeboxFileError
try:
    read_shoeboxes(sys.argv[1])
except ShoeboxFileError as error:
    print(error)
"""


def test_zeroed_global_heap_is_refused_not_looped_on(tmp_path, tiny_file):
    """libhdf5 loops forever on a global heap object of size 0 (zeroed bytes) when it reads
    the root attribute ``format``; the reader must refuse the file first."""
    data = bytearray(open(tiny_file, "rb").read())
    heap = data.find(b"GCOL\x01")
    assert heap > 0
    end = heap + int.from_bytes(data[heap + 8:heap + 16], "little")
    data[heap + 16 + 48:end] = bytes(end - heap - 16 - 48)  # after the first object's header
    path = tmp_path / "zeroed.h5"
    path.write_bytes(bytes(data))
    run = subprocess.run([sys.executable, "-c", ZEROED_HEAP, str(path)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"{path}: HDF5 global heap at byte {heap} is corrupt" in run.stdout


def test_a_chance_heap_signature_in_the_counts_is_not_taken_for_a_heap(tmp_path, tiny_file):
    with h5py.File(tiny_file) as f:
        counts = f["pixels/counts"][()]
    signature = np.frombuffer(b"GCOL\x01\x00\x00\x00" + np.float32([1e30, 1e30]).tobytes(), "<f4")
    counts[:4] = signature  # finite values whose bytes read "GCOL", version 1, a huge size
    path = _copy_with(tmp_path, tiny_file, "pixels/counts", counts)
    assert open(path, "rb").read().count(b"GCOL\x01") == 2
    np.testing.assert_array_equal(pr.read_shoeboxes(path).pixels.counts[:4], signature)


# ------------------------------------------------------------------ hand-built sets

def _core_arrays(s):
    d, im, r, p = s.detector, s.images, s.reflections, s.pixels
    return [d.origin, d.fast_axis, d.slow_axis, d.pixel_size, d.size, d.read_noise,
            im.wavelength, im.bandwidth, im.A_matrix, im.polarization_fraction,
            s.crystal_index[1], r.image_id, r.panel, r.miller_index, r.intensity_ref, r.bbox,
            r.pixel_offset, r.background, p.counts, p.mask]


@pytest.mark.parametrize("index, value, message", [
    (6, lambda a: a.astype(np.float32), "/images/wavelength must be a C-contiguous float64"),
    (18, lambda a: np.repeat(a, 2)[::2], "/pixels/counts must be a C-contiguous float32"),
    (15, lambda a: np.asfortranarray(a), "/reflections/bbox must be a C-contiguous int32"),
    (19, lambda a: list(a), "/pixels/mask must be a C-contiguous uint8"),
    (12, lambda a: None, "/reflections/panel must be a C-contiguous int16"),
])
def test_core_refuses_arrays_it_would_have_to_convert(tiny_file, index, value, message):
    arrays = _core_arrays(pr.read_shoeboxes(tiny_file))
    arrays[index] = value(arrays[index])
    with pytest.raises(TypeError, match=message):
        _core.CoreShoeboxSet(*arrays)


def test_core_refuses_inconsistent_lengths(tiny_file):
    arrays = _core_arrays(pr.read_shoeboxes(tiny_file))
    arrays[15] = arrays[15][:-1].copy()
    with pytest.raises(ValueError, match=r"/reflections/bbox: expected shape \(20, 4\), got \(19, 4\)"):
        _core.CoreShoeboxSet(*arrays)


def test_core_keeps_its_own_copy_of_the_index_arrays(tiny_file):
    """Editing an array after validation cannot send the core out of bounds: the set below
    refines on a core view whose source arrays were overwritten with absurd offsets and boxes
    after it was built (without the core's own copies this reads far outside /pixels)."""
    shoeboxes = pr.read_shoeboxes(tiny_file)
    expected = pr.refine(shoeboxes, R0=R0, max_global=1, profile="isotropic")
    arrays = [np.array(a) for a in _core_arrays(shoeboxes)]
    edited = pr.read_shoeboxes(tiny_file)
    edited._core_set = _core.CoreShoeboxSet(*arrays)
    edited._core_arrays = edited._arrays()  # the view above is the one refine() uses
    arrays[16][:] = 2**62                   # pixel_offset
    arrays[15][:] = [0, 2**31 - 1, 0, 2**31 - 1]  # bbox
    arrays[11][:] = 10**6                   # image_id
    got = pr.refine(edited, R0=R0, max_global=1, profile="isotropic")
    np.testing.assert_array_equal(got.images["G"], expected.images["G"])
    np.testing.assert_array_equal(got.reflections["intensity_prf"],
                                  expected.reflections["intensity_prf"])


def test_hand_built_set_of_other_layouts_refines_like_the_canonical_one(tiny_file):
    s = pr.read_shoeboxes(tiny_file)
    r = s.reflections
    read_only = np.array(r.miller_index)
    read_only.flags.writeable = False
    odd = pr.ShoeboxSet(s.detector, s.images,
                        pr.Reflections(image_id=r.image_id.astype(np.uint8),
                                       miller_index=read_only,
                                       intensity_ref=np.repeat(r.intensity_ref, 2)[::2],
                                       bbox=np.asfortranarray(r.bbox.astype(np.int64)),
                                       pixel_offset=list(r.pixel_offset)),
                        pr.Pixels(s.pixels.counts.astype(np.float64), s.pixels.mask.astype(bool)))
    a = pr.refine(s, R0=R0, max_global=1, profile="isotropic")
    b = pr.refine(odd, R0=R0, max_global=1, profile="isotropic")
    np.testing.assert_array_equal(a.images["G"], b.images["G"])
    np.testing.assert_array_equal(a.reflections["intensity_prf"], b.reflections["intensity_prf"])


@pytest.mark.parametrize("edit, error, message", [
    (dict(bbox=lambda r: r.bbox[:-1]), ValueError, r"in-memory ShoeboxSet>: /reflections/bbox: expected shape"),
    (dict(bbox=lambda r: r.bbox.astype(str)), TypeError, r"/reflections/bbox: must hold real numbers"),
    (dict(intensity_ref=lambda r: r.intensity_ref + 0j), TypeError, r"/reflections/intensity_ref: must hold real"),
    (dict(pixel_offset=lambda r: r.pixel_offset.astype(float) + 0.5), ValueError,
     r"/reflections/pixel_offset row 0: value 0.5 is not a whole number"),
    (dict(image_id=lambda r: r.image_id[None]), ValueError, r"/reflections/image_id: expected 1 dimension"),
])
def test_hand_built_set_refused_with_a_documented_type(tiny_file, edit, error, message):
    s = pr.read_shoeboxes(tiny_file)
    r = s.reflections
    fields = dict(image_id=r.image_id, miller_index=r.miller_index, intensity_ref=r.intensity_ref,
                  bbox=r.bbox, pixel_offset=r.pixel_offset)
    fields.update({name: change(r) for name, change in edit.items()})
    with pytest.raises(error, match=message):
        pr.refine(pr.ShoeboxSet(s.detector, s.images, pr.Reflections(**fields), s.pixels), R0=R0)


def test_refine_refuses_what_is_not_a_set_or_thread_count(tiny_file):
    with pytest.raises(TypeError, match="must be a ShoeboxSet"):
        pr.refine("shoeboxes.h5", R0=R0)
    with pytest.raises(ValueError, match="n_threads"):
        pr.refine(pr.read_shoeboxes(tiny_file), R0=R0, n_threads=10**12)


# ------------------------------------------------------------------ results check, last resort

def test_results_check_finds_an_unexplained_value(tiny_file):
    s = pr.read_shoeboxes(tiny_file)
    results = pr.refine(s, R0=R0, max_global=1, profile="isotropic")
    assert unexplained(results, s.reflections.image_id) == []
    integrated = int(np.flatnonzero(np.isfinite(results.reflections["intensity_prf"]))[0])
    results.reflections["intensity_prf"][integrated] = np.nan
    results.images["G"][0] = np.inf
    found = unexplained(results, s.reflections.image_id)
    assert any(f"/reflections/intensity_prf row {integrated}: NaN" in line for line in found)
    assert any("/images/G row 0" in line for line in found)
    with pytest.raises(ResultsCheckError, match="nothing explains it"):
        check_results(results, s.reflections.image_id)


def test_cli_turns_an_unexpected_exception_into_one_line(tmp_path, tiny_file, monkeypatch):
    def broken(path):
        raise KeyError("a bug")

    monkeypatch.setattr("pixelrefine.cli.read_shoeboxes", broken)
    monkeypatch.delenv("PIXELREFINE_TRACEBACK", raising=False)
    result = refine_command(tiny_file, tmp_path / "out.h5")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: internal error (KeyError: a bug)")


# ------------------------------------------------------------------ fuzzing

def test_fuzz_harness_sees_crashes_hangs_and_tracebacks(tmp_path):
    base = fuzz.generate_cases(1, seed=3)[0]
    cases = [dict(base, id=i, selftest=how) for i, how in enumerate(["abort", "hang", "raise", None])]
    records = fuzz.run_cases(cases, str(tmp_path), workers=1, timeout=3.0)
    assert [r["outcome"] for r in records[:3]] == ["crash", "hang", "traceback"]
    assert records[3]["outcome"] in ("accepted", "refused")
    assert "alone: crash" in records[0]["detail"]


def test_fuzz_classifies_wrong_refusals_and_unclear_errors():
    valid = {"kind": "structured", "base": "one", "mutations": [{"op": "extra", "kind": "group"}]}
    assert fuzz.expected_valid(valid)
    assert not fuzz.expected_valid({**valid, "mutations": [{"op": "offsets", "how": "zero", "row": 0}]})
    assert fuzz.refusal_subject("Error: a.h5: /reflections/bbox row 3: empty box") == "/reflections/bbox"
    assert fuzz.refusal_subject("Error: a.h5: something went wrong") is None


FUZZ_CASES = 300


def test_fuzzed_shoebox_files(tmp_path):
    """A few hundred fuzzed files (structured and byte-level) through ``pixelrefine refine``:
    none may crash, hang, print a traceback, refuse a valid file or leave a non-finite value
    unexplained (the long run: README, docs/fuzz-10000.json)."""
    cases = fuzz.generate_cases(FUZZ_CASES, seed=20261202, process_fraction=0.01)
    records = fuzz.run_cases(cases, str(tmp_path), workers=1, timeout=60.0)
    summary = fuzz.summarize(cases, records)
    assert summary["cases"] == FUZZ_CASES
    assert summary["bugs"] == 0, summary["bug_cases"][:3]
    counts = summary["counts"]
    assert counts["accepted"] >= 30 and counts["refused"] >= 30, counts
