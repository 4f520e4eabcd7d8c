"""MTZ out and merging: the unmerged MTZ read back with gemmi gives the same numbers; the merge's
statistics on simulated observations agree with a direct numpy computation."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import gemmi
import pixelrefine as pr
from pixelrefine.cli import main
from pixelrefine.io import read_tables
from pixelrefine.merge import merge_observations, select_observations
from pixelrefine.mtz import LAB_TO_DIALS, UNMERGED_COLUMNS, mosflm_B

P43212 = "P 43 21 2"
CELL = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    """A refined simulation, its shoebox file and its results file."""
    d = tmp_path_factory.mktemp("refined")
    shoeboxes = pr.simulate(6, seed=2, max_reflections=150)
    pr.write_shoeboxes(d / "s.h5", shoeboxes)
    results = pr.refine(pr.read_shoeboxes(d / "s.h5"), n_threads=2)
    pr.write_results(d / "r.h5", results)
    return d, shoeboxes, pr.read_results(d / "r.h5")


def test_unmerged_mtz_round_trip(refined):
    d, shoeboxes, results = refined
    r = CliRunner().invoke(main, ["export-mtz", str(d / "r.h5"), str(d / "u.mtz"),
                                  "--space-group", P43212])
    assert r.exit_code == 0, r.output
    mtz = gemmi.read_mtz_file(str(d / "u.mtz"))
    assert mtz.column_labels() == ["H", "K", "L"] + [c for c, _ in UNMERGED_COLUMNS]
    assert [c.type for c in mtz.columns][3:] == [t for _, t in UNMERGED_COLUMNS]
    assert mtz.spacegroup.xhm() == P43212 and np.allclose(mtz.cell.parameters, CELL)
    refl = results.reflections
    rows = np.flatnonzero(np.isfinite(refl["intensity_prf"]) & (refl["intensity_prf_sigma"] > 0))
    data = np.array(mtz.array)
    assert len(data) == len(rows) == mtz.nreflections
    col = {c.label: i for i, c in enumerate(mtz.columns)}
    for label, name in (("I", "intensity_scaled"), ("SIGI", "intensity_scaled_sigma"),
                        ("IPR", "intensity_prf"), ("SIGIPR", "intensity_prf_sigma"),
                        ("FRACTIONCALC", "partiality"), ("BG", "background")):
        np.testing.assert_allclose(data[:, col[label]], refl[name][rows].astype(np.float32),
                                   rtol=1e-7, equal_nan=True, err_msg=label)
    np.testing.assert_array_equal(data[:, col["BATCH"]], shoeboxes.reflections.image_id[rows] + 1)
    xy = np.where(np.isfinite(refl["xyzobs"]), refl["xyzobs"], refl["xyzcal"])[rows]
    np.testing.assert_allclose(data[:, col["XDET"]], xy[:, 0].astype(np.float32), rtol=1e-7)
    np.testing.assert_allclose(data[:, col["YDET"]], xy[:, 1].astype(np.float32), rtol=1e-7)
    np.testing.assert_array_equal(data[:, col["FLAG"]], refl["flags"][rows])
    # H K L are in the ASU, M/ISYM takes them back to what was observed
    sg = gemmi.SpaceGroup(P43212)
    asu = gemmi.ReciprocalAsu(sg)
    assert all(asu.is_in([int(v) for v in h]) for h in data[:, :3])
    mtz.switch_to_original_hkl()
    np.testing.assert_array_equal(np.array(mtz.array)[:, :3], shoeboxes.reflections.miller_index[rows])
    # one batch per image: cell, wavelength, and U·B_Mosflm = UB in DIALS's frame
    assert [b.number for b in mtz.batches] == list(range(1, shoeboxes.n_images + 1))
    for b, A, wavelength in zip(mtz.batches, shoeboxes.images.A_matrix, shoeboxes.images.wavelength):
        assert math.isclose(b.wavelength, wavelength, rel_tol=1e-7)
        np.testing.assert_allclose(b.cell.parameters, CELL, rtol=1e-5)
        U = np.array([b.floats[j] for j in range(6, 15)]).reshape(3, 3).T
        np.testing.assert_allclose(U @ U.T, np.eye(3), atol=1e-6)
        np.testing.assert_allclose(U @ mosflm_B(b.cell), LAB_TO_DIALS @ A, atol=1e-7)


def test_export_needs_a_space_group_and_the_right_file(refined, tmp_path):
    d, shoeboxes, results = refined
    other = tmp_path / "other.h5"
    pr.write_shoeboxes(other, pr.simulate(2, seed=9, max_reflections=20))
    r = CliRunner().invoke(main, ["export-mtz", str(d / "r.h5"), str(tmp_path / "u.mtz"),
                                  "--shoeboxes", str(other)])
    assert r.exit_code != 0 and "other.h5" in r.output and "--shoeboxes" in r.output
    assert not (tmp_path / "u.mtz").exists()


def symmetric_observations(rng, n_images=40, per_image=250, sigma_rel=0.1, outliers=0.01):
    """Observations of a P 43 21 2 crystal: one true I per ASU reflection, Gaussian noise,
    a few gross outliers."""
    sg = gemmi.SpaceGroup(P43212)
    cell = gemmi.UnitCell(*CELL)
    unique = np.array(gemmi.make_miller_array(cell, sg, 2.5), np.int32)
    d = 1 / np.sqrt(cell.calculate_1_d2_array(unique))
    true = 1000 * np.exp(-20 / (2 * d**2)) * rng.exponential(size=len(unique))
    ops = sg.operations().sym_ops
    hkl, intensity, sigma, image = [], [], [], []
    for i in range(n_images):
        pick = rng.choice(len(unique), per_image, replace=False)
        for u in pick:
            op = ops[rng.integers(len(ops))]
            h = op.apply_to_hkl(unique[u].tolist())
            if rng.random() < 0.5:
                h = [-v for v in h]
            s = sigma_rel * true[u] + 5.0
            value = true[u] + s * rng.normal()
            if rng.random() < outliers:
                value += 50 * s
            hkl.append(h), intensity.append(value), sigma.append(s), image.append(i)
    # systematic absences observed too (should be ~0)
    for i in range(5):
        hkl.append([0, 0, 2 * i + 1]), intensity.append(rng.normal()), sigma.append(1.0), image.append(i)
    return np.array(hkl), np.array(intensity), np.array(sigma), np.array(image), unique, true


def canonical(hkl, sg):
    """A key per symmetry-equivalence class (point group and Friedel), by expanding the orbit:
    independent of gemmi's ASU."""
    ops = sg.operations().sym_ops
    keys = []
    for h in hkl.tolist():
        orbit = [tuple(op.apply_to_hkl(h)) for op in ops]
        orbit += [tuple(-v for v in o) for o in orbit]
        keys.append(min(orbit))
    return keys


def test_merge_statistics_against_numpy(tmp_path):
    rng = np.random.default_rng(7)
    hkl, intensity, sigma, image, unique, true = symmetric_observations(rng)
    result = merge_observations(hkl, intensity, sigma, image, space_group=P43212, unit_cell=CELL,
                                n_shells=5)
    sg = gemmi.SpaceGroup(P43212)
    cell = gemmi.UnitCell(*CELL)
    assert result.n_absent == 5 and abs(result.absent_i_over_sigma) < 2
    assert result.n_rejected > 0.5 * 0.01 * len(intensity)

    # --- the rejection, by hand -----------------------------------------------------------
    absent = np.array([sg.operations().is_systematically_absent(h) for h in hkl.tolist()])
    keys = canonical(hkl, sg)
    keep = ~absent
    groups = {}
    for n, k in enumerate(keys):
        if keep[n]:
            groups.setdefault(k, []).append(n)
    for _ in range(2):
        rejected = []
        for members in groups.values():
            members = [m for m in members if keep[m]]
            if len(members) < 3:
                continue
            zs = []
            for m in members:
                others = [o for o in members if o != m]
                w = 1 / sigma[others] ** 2
                mean = np.sum(w * intensity[others]) / np.sum(w)
                zs.append(abs(intensity[m] - mean) / np.sqrt(sigma[m] ** 2 + 1 / np.sum(w)))
            if max(zs) > 6:  # the worst of the group only
                rejected.append(members[int(np.argmax(zs))])
        if not rejected:
            break
        keep[rejected] = False
    np.testing.assert_array_equal(result.kept, keep)

    # --- merged values --------------------------------------------------------------------
    merged = {}
    for k, members in groups.items():
        members = [m for m in members if keep[m]]
        w = 1 / sigma[members] ** 2
        merged[k] = (np.sum(w * intensity[members]) / np.sum(w), 1 / np.sqrt(np.sum(w)), len(members),
                     [image[m] for m in members], intensity[members], sigma[members])
    got_keys = canonical(result.hkl, sg)
    assert sorted(got_keys) == sorted(merged)
    for k, i, s, n in zip(got_keys, result.intensity, result.sigma, result.multiplicity):
        assert math.isclose(i, merged[k][0], rel_tol=1e-9) and math.isclose(s, merged[k][1], rel_tol=1e-9)
        assert n == merged[k][2]

    # --- shells ---------------------------------------------------------------------------
    limits = [s["d_min"] for s in result.shells]
    d_of = {k: 1 / math.sqrt(cell.calculate_1_d2(list(k))) for k in merged}
    possible = [tuple(h) for h in gemmi.make_miller_array(cell, sg, result.overall["d_min"] * (1 - 1e-9),
                                                          result.overall["d_max"] * (1 + 1e-9)).tolist()]
    possible_keys = set(canonical(np.array(possible), sg))

    def shell_of(dval):
        for b, s in enumerate(result.shells):
            if dval >= s["d_min"] * (1 - 1e-12) or b == len(result.shells) - 1:
                return b

    for b, shell in enumerate(result.shells):
        members = [k for k in merged if shell_of(d_of[k]) == b]
        n_obs = sum(merged[k][2] for k in members)
        assert shell["n_unique"] == len(members) and shell["n_obs"] == n_obs
        n_possible = sum(1 for k in possible_keys if shell_of(1 / math.sqrt(cell.calculate_1_d2(list(k)))) == b)
        assert shell["n_possible"] == n_possible
        assert math.isclose(shell["completeness"], len(members) / n_possible, rel_tol=1e-12)
        assert math.isclose(shell["multiplicity"], n_obs / len(members), rel_tol=1e-12)
        ios = np.mean([merged[k][0] / merged[k][1] for k in members])
        assert math.isclose(shell["i_over_sigma"], ios, rel_tol=1e-9)
        # CC½ by σ-τ (weighted, as gemmi's 'Y'): var of the means against the mean error var
        multi = [k for k in members if merged[k][2] > 1]
        means, eps = [], []
        for k in multi:
            _, _, n, _, I, S = merged[k]
            w = 1 / S**2
            mean = np.sum(w * I) / np.sum(w)
            means.append(mean)
            eps.append((np.sum(w * I**2) / np.sum(w) - mean**2) * 2 / (n - 1))
        sig2_y = np.var(means, ddof=1)
        sig2_eps = np.mean(eps)
        cc = (sig2_y - 0.5 * sig2_eps) / (sig2_y + 0.5 * sig2_eps)
        assert math.isclose(shell["cc_half"], cc, rel_tol=1e-9), (b, shell["cc_half"], cc)
        # CC½ and Rsplit between the even and the odd images
        i1, i2 = [], []
        for k in members:
            imgs, I, S = np.array(merged[k][3]), merged[k][4], merged[k][5]
            halves = [(imgs % 2) == 0, (imgs % 2) == 1]
            if all(h.any() for h in halves):
                i1.append(np.sum(I[halves[0]] / S[halves[0]] ** 2) / np.sum(1 / S[halves[0]] ** 2))
                i2.append(np.sum(I[halves[1]] / S[halves[1]] ** 2) / np.sum(1 / S[halves[1]] ** 2))
        i1, i2 = np.array(i1), np.array(i2)
        assert shell["n_split"] == len(i1)
        assert math.isclose(shell["cc_half_split"], np.corrcoef(i1, i2)[0, 1], rel_tol=1e-9)
        rsplit = np.sum(np.abs(i1 - i2)) / (0.5 * np.sum(i1 + i2)) / np.sqrt(2)
        assert math.isclose(shell["r_split"], rsplit, rel_tol=1e-9)
    assert result.overall["n_unique"] == len(merged)
    assert result.overall["cc_half"] > 0.9  # good data: the statistics mean what they say
    assert sorted(limits, reverse=True) == limits


def test_merge_cli_writes_mtz_hkl_and_json(refined):
    d, shoeboxes, results = refined
    r = CliRunner().invoke(main, ["merge", str(d / "r.h5"), str(d / "m.mtz"), "--hkl",
                                  str(d / "m.hkl"), "--shells", "3", "--d-min", "2.2"])
    assert r.exit_code == 0, r.output
    assert "CC½" in r.output and "Rsplit" in r.output and "overall" in r.output
    stats = json.loads((d / "m.json").read_text())
    assert len(stats["shells"]) == 3 and stats["space_group"] == "P 1"
    mtz = gemmi.read_mtz_file(str(d / "m.mtz"))
    assert mtz.column_labels() == ["H", "K", "L", "IMEAN", "SIGIMEAN", "N"] and not mtz.batches
    data = np.array(mtz.array)
    assert data[:, 5].sum() == stats["overall"]["n_obs"]
    obs = select_observations(results, read_tables(d / "s.h5"))
    cell = gemmi.UnitCell(*CELL)
    ok = np.isfinite(obs["intensity"]) & (obs["sigma"] > 0)
    dval = 1 / np.sqrt(cell.calculate_1_d2_array(obs["hkl"].astype(np.int32)))
    assert stats["overall"]["n_obs"] + stats["n_rejected"] == int((ok & (dval >= 2.2)).sum())
    assert 1 / np.sqrt(cell.calculate_1_d2_array(data[:, :3].astype(np.int32))).min() >= 2.2
    lines = (d / "m.hkl").read_text().splitlines()
    assert lines[:3] == ["CrystFEL reflection list version 2.0", "Symmetry: -1",
                         "   h    k    l          I    phase   sigma(I)   nmeas"]
    assert "End of reflections" in lines
    body = lines[3:lines.index("End of reflections")]
    assert len(body) == len(data)
    h, k, l, i, phase, s, n = body[0].split()
    assert phase == "-" and int(n) == int(data[0, 5]) and abs(float(i) - data[0, 3]) < 0.01
    r = CliRunner().invoke(main, ["merge", str(d / "r.h5"), str(d / "m.mtz")])
    assert r.exit_code != 0 and "--overwrite" in r.output
