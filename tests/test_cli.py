"""The pixelrefine command: simulate → refine → report, and its refusals."""

import hashlib

import numpy as np
from click.testing import CliRunner

import pixelrefine as pr
from pixelrefine.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_simulate_refine_report(tmp_path):
    shoeboxes = tmp_path / "in.h5"
    results = tmp_path / "out.h5"
    r = run("simulate", shoeboxes, "--images", 6, "--max-reflections", 120, "--compression", "bitshuffle-lz4")
    assert r.exit_code == 0, r.output
    digest = hashlib.sha256(shoeboxes.read_bytes()).hexdigest()
    r = run("refine", shoeboxes, results, "--threads", 2, "--option", "outlier_sigma=8",
            "--no-progress")
    assert r.exit_code == 0, r.output
    assert "refined 6 images" in r.output
    out = pr.read_results(results)
    assert np.all(out.images["status"] == 0)
    assert out.options["outlier_sigma"] == 8
    assert np.isfinite(out.crystals["R0_sigma"][0])  # R0 refined (not given)
    r = run("report", results, "--shoeboxes", shoeboxes, "--per-image")
    assert r.exit_code == 0, r.output
    for text in ("G", "B (Å²)", "R1", "status: 6 × 0", "Recovery against /truth", "pull sd",
                 "Cramér–Rao", "R0 crystal 0", "error scale k", "Model vs observed shoeboxes",
                 "χ²/px", "SSIM"):
        assert text in r.output, text
    per_image_rows = [line for line in r.output.splitlines()
                      if line.split()[:1] in (["0"], ["5"]) and len(line.split()) >= 13]
    assert len(per_image_rows) == 2
    assert hashlib.sha256(shoeboxes.read_bytes()).hexdigest() == digest


def test_refine_refuses_to_overwrite(tmp_path):
    shoeboxes = tmp_path / "in.h5"
    run("simulate", shoeboxes, "--images", 2, "--max-reflections", 50)
    digest = hashlib.sha256(shoeboxes.read_bytes()).hexdigest()
    r = CliRunner().invoke(main, ["refine", str(shoeboxes), str(shoeboxes), "--R0", "5e-4"])
    assert r.exit_code != 0 and "input" in r.output
    existing = tmp_path / "existing.h5"
    existing.write_bytes(b"keep me")
    r = CliRunner().invoke(main, ["refine", str(shoeboxes), str(existing), "--R0", "5e-4"])
    assert r.exit_code != 0 and "--overwrite" in r.output
    assert existing.read_bytes() == b"keep me"
    assert hashlib.sha256(shoeboxes.read_bytes()).hexdigest() == digest


def test_refine_reports_bad_input_and_options(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("garbage")
    r = CliRunner().invoke(main, ["refine", str(bad), str(tmp_path / "o.h5"), "--R0", "5e-4"])
    assert r.exit_code != 0 and "bad.h5" in r.output and "Traceback" not in r.output
    good = tmp_path / "in.h5"
    run("simulate", good, "--images", 2, "--max-reflections", 50)
    r = CliRunner().invoke(main, ["refine", str(good), str(tmp_path / "o.h5"), "--R0", "5e-4",
                                  "--option", "no_such_option=1"])
    assert r.exit_code != 0 and "no_such_option" in r.output
    assert not (tmp_path / "o.h5").exists()
    r = CliRunner().invoke(main, ["refine", str(good), str(tmp_path / "o.h5"), "--objective", "pixel"])
    assert r.exit_code != 0 and "R0" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["refine", str(good), str(tmp_path / "o.h5"), "--option",
                                  "outer_tolerance=-1"])
    assert r.exit_code != 0 and "outer_tolerance" in r.output and "Traceback" not in r.output


def test_demo(tmp_path):
    r = run("demo", "--dir", tmp_path / "demo", "--images", 8, "--threads", 1)
    assert r.exit_code == 0, r.output
    assert "Recovery against /truth" in r.output
    assert (tmp_path / "demo" / "results-factored.h5").exists()
