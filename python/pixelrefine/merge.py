"""Merging: an inverse-variance weighted mean per unique reflection, outlier rejection, and
merging statistics per resolution shell (METHODS.md §I.19).

gemmi does what it already does: the reciprocal ASU (Friedel mates merged: IMEAN), the
weighted merge (``Intensities.merged``), the shells (``Binner``, equal volume in 1/d³), CC½ by
the σ-τ method, R_merge/R_meas/R_pim (``Intensities.calculate_merging_stats``) and the possible
reflections for completeness (``make_miller_array``). Here: the selection of observations, the
rejection, the half-dataset statistics CrystFEL reports (CC½ and R_split between the even and
odd images) and ⟨I/σ⟩.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import gemmi

from .io import ShoeboxTables
from .refine import FLAGS, Results
from .symmetry import crystfel_point_group, space_group_of, systematic_absences, to_asu

__all__ = ["MergeResult", "merge_observations", "select_observations", "merge_results",
           "write_merged_mtz", "write_crystfel_hkl", "EXCLUDED_FLAGS", "EXCLUDED_STATUS",
           "unit_cell_of"]

_BIT = {name: bit for bit, name in FLAGS.items()}
#: Reflections with any of these flags are not merged (their intensity_scaled is not usable).
EXCLUDED_FLAGS = (_BIT["too_few_valid_pixels"] | _BIT["outlier"] | _BIT["image_not_scaled"]
                  | _BIT["bad_prediction"] | _BIT["profile_outside_box"] | _BIT["low_partiality"])
#: Images with these statuses are not merged (3 solver failure, 7 implausible profile, 9
#: reference uninformative: their G is no scale).
EXCLUDED_STATUS = (3, 7, 9)


def unit_cell_of(tables: ShoeboxTables) -> np.ndarray:
    """The file's ``unit_cell``, else the mean over images of the cells of their A matrices."""
    if tables.unit_cell is not None:
        return np.asarray(tables.unit_cell, float)
    cells = []
    for A in tables.images["A_matrix"]:
        a, b, c = np.linalg.inv(A)  # rows: the real-space vectors
        angle = lambda u, v: math.degrees(math.acos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1)))  # noqa: E731
        cells.append([np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(c),
                      angle(b, c), angle(a, c), angle(a, b)])
    return np.mean(cells, axis=0)


@dataclass
class MergeResult:
    """Merged intensities and their statistics.

    Attributes
    ----------
    hkl, intensity, sigma, multiplicity, d : ndarray
        One row per unique reflection (ASU indices, IMEAN, SIGIMEAN, observations merged, Å).
    shells : list of dict
        Per resolution shell, low to high: d_max, d_min, n_obs, n_unique, n_possible,
        completeness, multiplicity, i_over_sigma, cc_half (σ-τ), cc_half_split, r_split,
        r_merge, r_meas, r_pim, n_split (reflections in both halves).
    overall : dict
        The same over all shells.
    space_group, unit_cell
        gemmi objects used.
    n_input, n_rejected, n_absent : int
        Observations given, rejected as outliers, systematically absent (not merged).
    absent_i_over_sigma : float
        Mean I/σ of the absent observations (≈ 0 when the space group is right).
    settings : dict
        reject_sigma, reject_passes, d_min, n_shells, half_split.
    kept : ndarray of bool
        Which of the input observations were merged.
    """

    hkl: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    multiplicity: np.ndarray
    d: np.ndarray
    shells: list[dict[str, float]]
    overall: dict[str, float]
    space_group: gemmi.SpaceGroup
    unit_cell: gemmi.UnitCell
    n_input: int
    n_rejected: int
    n_absent: int
    absent_i_over_sigma: float
    settings: dict[str, Any] = field(default_factory=dict)
    kept: np.ndarray | None = None

    def as_dict(self) -> dict[str, Any]:
        """Everything but the per-reflection arrays (JSON-ready)."""
        return {"space_group": self.space_group.xhm(),
                "unit_cell": list(self.unit_cell.parameters),
                "n_input": self.n_input, "n_rejected": self.n_rejected, "n_absent": self.n_absent,
                "absent_i_over_sigma": _json_number(self.absent_i_over_sigma),
                "n_unique": int(len(self.hkl)), "settings": self.settings,
                "overall": {k: _json_number(v) for k, v in self.overall.items()},
                "shells": [{k: _json_number(v) for k, v in s.items()} for s in self.shells]}

    def table(self) -> str:
        """The statistics as a text table (one row per shell, then the overall row)."""
        head = ["d max", "d min", "n obs", "n uniq", "compl %", "mult", "<I/σ>", "CC½",
                "CC½ split", "Rsplit", "Rmerge"]
        rows = [head]
        for s in self.shells + [dict(self.overall, label=True)]:
            rows.append(["overall" if s.get("label") else f"{s['d_max']:.2f}", f"{s['d_min']:.2f}",
                         str(s["n_obs"]), str(s["n_unique"]), _fmt(100 * s["completeness"], 1),
                         _fmt(s["multiplicity"], 2), _fmt(s["i_over_sigma"], 2),
                         _fmt(s["cc_half"], 3), _fmt(s["cc_half_split"], 3), _fmt(s["r_split"], 3),
                         _fmt(s["r_merge"], 3)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        notes = (f"{self.space_group.xhm()}, {self.n_input} observations: {self.n_rejected} rejected "
                 f"(> {self.settings.get('reject_sigma')} σ from the weighted mean of the others), "
                 f"{self.n_absent} systematically absent (<I/σ> {_fmt(self.absent_i_over_sigma, 2)}), "
                 f"{len(self.hkl)} unique")
        return notes + "\n" + "\n".join(lines)


def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _json_number(value):
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def _keys(hkl: np.ndarray) -> np.ndarray:
    h = np.asarray(hkl, np.int64) + (1 << 20)
    return (h[:, 0] << 42) | (h[:, 1] << 21) | h[:, 2]


def _reject(group: np.ndarray, intensity: np.ndarray, sigma: np.ndarray, threshold: float,
            passes: int) -> np.ndarray:
    """Keep-mask after leave-one-out rejection. In each pass, in every group of ≥ 3 kept
    observations, the observation with the largest |z_i|, z_i = (I_i − Ī_(−i)) /
    √(σ_i² + σ²(Ī_(−i))) with Ī_(−i) the weighted mean of the others, is rejected when
    |z_i| > threshold (one per group and pass: an outlier inflates the others' z too);
    ``passes`` passes, stopping when nothing moves."""
    keep = np.ones(len(group), bool)
    if not np.isfinite(threshold) or len(group) == 0:
        return keep
    w = 1.0 / sigma**2
    n_groups = int(group.max()) + 1
    for _ in range(passes):
        kw, kwi = np.where(keep, w, 0.0), np.where(keep, w * intensity, 0.0)
        sum_w = np.bincount(group, kw, n_groups)
        sum_wi = np.bincount(group, kwi, n_groups)
        count = np.bincount(group, keep.astype(float), n_groups)
        others_w = sum_w[group] - w
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_others = (sum_wi[group] - w * intensity) / others_w
            z = np.abs(intensity - mean_others) / np.sqrt(sigma**2 + 1.0 / others_w)
        z = np.where(keep & (count[group] >= 3) & np.isfinite(z), z, -1.0)
        order = np.lexsort((-z, group))          # per group, the largest |z| first
        first = order[np.r_[True, group[order][1:] != group[order][:-1]]]
        reject = first[z[first] > threshold]
        if reject.size == 0:
            break
        keep[reject] = False
    return keep


def _weighted_means(group: np.ndarray, intensity: np.ndarray, sigma: np.ndarray, n: int):
    w = 1.0 / sigma**2
    sum_w = np.bincount(group, w, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.bincount(group, w * intensity, n) / sum_w, np.bincount(group, minlength=n)


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def merge_observations(hkl: np.ndarray, intensity: np.ndarray, sigma: np.ndarray,
                       image_id: np.ndarray, *, space_group, unit_cell, d_min: float | None = None,
                       n_shells: int = 10, reject_sigma: float = 6.0,
                       reject_passes: int = 2) -> MergeResult:
    """Merge observations of intensities into one per unique reflection.

    Parameters
    ----------
    hkl : ndarray [M, 3]
        Miller indices (any; mapped to the ASU of ``space_group``, Friedel mates together).
    intensity, sigma : ndarray [M]
        Observations on a common scale (``intensity_scaled``) and their sigmas; rows with a
        non-finite value or σ ≤ 0 are left out.
    image_id : ndarray [M]
        Image of each observation: the half-datasets are the even and the odd images.
    space_group : str or gemmi.SpaceGroup
    unit_cell : sequence of 6 or gemmi.UnitCell
    d_min : float, optional
        Leave out observations with d < d_min (Å).
    n_shells : int
        Resolution shells of equal volume in reciprocal space.
    reject_sigma, reject_passes
        Outlier rejection (see ``_reject``); ``inf`` disables it.

    Returns
    -------
    MergeResult
    """
    sg = space_group_of(space_group)
    cell = unit_cell if isinstance(unit_cell, gemmi.UnitCell) else gemmi.UnitCell(*np.asarray(unit_cell, float))
    hkl = np.asarray(hkl, np.int32).reshape(-1, 3)
    intensity, sigma = np.asarray(intensity, float), np.asarray(sigma, float)
    image_id = np.asarray(image_id, np.int64)
    n_input = len(intensity)
    usable = np.isfinite(intensity) & np.isfinite(sigma) & (sigma > 0) & np.any(hkl != 0, axis=1)
    d = np.full(n_input, np.nan)
    d[usable] = 1.0 / np.sqrt(cell.calculate_1_d2_array(hkl[usable]))
    if d_min is not None:
        usable &= d >= d_min
    asu, _ = to_asu(hkl, sg)
    absent = usable & systematic_absences(asu, sg)
    with np.errstate(invalid="ignore", divide="ignore"):
        absent_ios = float(np.mean(intensity[absent] / sigma[absent])) if absent.any() else float("nan")
    candidates = np.flatnonzero(usable & ~absent)
    if candidates.size == 0:
        raise ValueError("no observations to merge (none finite, with σ > 0, inside d_min and "
                         "not systematically absent)")
    keys = _keys(asu[candidates])
    unique_keys, group = np.unique(keys, return_inverse=True)
    group = group.reshape(-1)
    keep_c = _reject(group, intensity[candidates], sigma[candidates], reject_sigma, reject_passes)
    kept = np.zeros(n_input, bool)
    kept[candidates[keep_c]] = True
    rows = np.flatnonzero(kept)

    # gemmi: the weighted merge and its statistics
    obs = gemmi.Intensities()
    obs.set_data(cell, sg, asu[rows], intensity[rows], sigma[rows])
    obs.type = gemmi.DataType.Unmerged
    obs.prepare_for_merging(gemmi.DataType.Mean)
    obs.sort()
    merged = obs.merged(gemmi.DataType.Mean)
    # gemmi's arrays are strided views of its records: copy them before passing them back
    m_hkl = np.ascontiguousarray(merged.miller_array, np.int32)
    m_i = np.ascontiguousarray(merged.value_array, float)
    m_s = np.ascontiguousarray(merged.sigma_array, float)
    m_n = np.ascontiguousarray(merged.nobs_array, np.int64)
    m_inv_d2 = cell.calculate_1_d2_array(m_hkl)
    binner = gemmi.Binner()
    n_shells = max(1, min(int(n_shells), len(m_hkl)))
    binner.setup(n_shells, gemmi.Binner.Method.Dstar3, m_hkl, cell)
    gemmi_shells = obs.calculate_merging_stats(binner, use_weights="Y")
    gemmi_overall = obs.calculate_merging_stats(None, use_weights="Y")[0]
    m_bin = np.asarray(binner.get_bins(m_hkl))

    # possible reflections for completeness
    d_lo, d_hi = 1.0 / math.sqrt(m_inv_d2.max()), 1.0 / math.sqrt(m_inv_d2.min())
    possible = np.ascontiguousarray(gemmi.make_miller_array(cell, sg, d_lo * (1 - 1e-9), d_hi * (1 + 1e-9)), np.int32)
    possible = possible[~systematic_absences(possible, sg)]
    p_bin = np.asarray(binner.get_bins(possible)) if len(possible) else np.zeros(0, int)

    # half-datasets: even and odd images
    r_keys = _keys(asu[rows])
    r_group = np.searchsorted(np.sort(unique_keys), r_keys)
    halves = []
    for parity in (0, 1):
        sel = (image_id[rows] % 2) == parity
        mean, count = _weighted_means(r_group[sel], intensity[rows][sel], sigma[rows][sel], len(unique_keys))
        halves.append((mean, count))
    both = (halves[0][1] > 0) & (halves[1][1] > 0)
    u_hkl = _unkey(np.sort(unique_keys))
    u_bin = np.asarray(binner.get_bins(u_hkl))

    def shell_stats(in_shell_m, in_shell_p, in_shell_u, gstats) -> dict[str, float]:
        i1, i2 = halves[0][0][in_shell_u & both], halves[1][0][in_shell_u & both]
        denominator = 0.5 * np.sum(i1 + i2)
        n_unique = int(in_shell_m.sum())
        n_obs = int(m_n[in_shell_m].sum())
        inv = m_inv_d2[in_shell_m]
        return {"n_obs": n_obs, "n_unique": n_unique, "n_possible": int(in_shell_p.sum()),
                "completeness": n_unique / in_shell_p.sum() if in_shell_p.sum() else float("nan"),
                "multiplicity": n_obs / n_unique if n_unique else float("nan"),
                "i_over_sigma": float(np.mean(m_i[in_shell_m] / m_s[in_shell_m])) if n_unique else float("nan"),
                "cc_half": float(gstats.cc_half()) if gstats.stats_refl > 1 else float("nan"),
                "cc_half_split": _correlation(i1, i2),
                "r_split": float(np.sum(np.abs(i1 - i2)) / denominator / math.sqrt(2))
                if len(i1) and denominator > 0 else float("nan"),
                "r_merge": float(gstats.r_merge()) if gstats.stats_refl else float("nan"),
                "r_meas": float(gstats.r_meas()) if gstats.stats_refl else float("nan"),
                "r_pim": float(gstats.r_pim()) if gstats.stats_refl else float("nan"),
                "n_split": int(len(i1)),
                "d_max": float(1 / math.sqrt(inv.min())) if n_unique else float("nan"),
                "d_min": float(1 / math.sqrt(inv.max())) if n_unique else float("nan")}

    shells = []
    for b in range(binner.size):
        s = shell_stats(m_bin == b, p_bin == b, u_bin == b, gemmi_shells[b])
        s["d_max"], s["d_min"] = binner.dmax_of_bin(b), binner.dmin_of_bin(b)
        shells.append(s)
    overall = shell_stats(np.ones(len(m_hkl), bool), np.ones(len(possible), bool),
                          np.ones(len(u_hkl), bool), gemmi_overall)
    overall["d_max"], overall["d_min"] = d_hi, d_lo
    return MergeResult(hkl=m_hkl, intensity=m_i, sigma=m_s, multiplicity=m_n,
                       d=1.0 / np.sqrt(m_inv_d2), shells=shells, overall=overall, space_group=sg,
                       unit_cell=cell, n_input=n_input, n_rejected=int(len(candidates) - keep_c.sum()),
                       n_absent=int(absent.sum()), absent_i_over_sigma=absent_ios,
                       settings={"reject_sigma": reject_sigma if np.isfinite(reject_sigma) else None,
                                 "reject_passes": reject_passes, "d_min": d_min,
                                 "n_shells": binner.size, "half_split": "even/odd image",
                                 "shell_binning": "equal volume in 1/d^3 (gemmi Binner Dstar3)"},
                       kept=kept)


def _unkey(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, np.int64)
    mask = (1 << 21) - 1
    return np.stack([(keys >> 42) & mask, (keys >> 21) & mask, keys & mask], 1).astype(np.int64) \
        .astype(np.int32) - (1 << 20)


def select_observations(results: Results, tables: ShoeboxTables, *,
                        excluded_flags: int = EXCLUDED_FLAGS,
                        excluded_status: tuple[int, ...] = EXCLUDED_STATUS) -> dict[str, np.ndarray]:
    """The observations a merge takes from a refinement: intensity_scaled and its sigma of
    the reflections without ``excluded_flags`` on images whose status is not excluded.

    Raises
    ------
    ValueError
        When the results and the shoebox file do not have the same reflections.
    """
    refl = results.reflections
    n = len(refl["flags"])
    if len(tables.reflections["image_id"]) != n or tables.n_images != results.n_images:
        raise ValueError(f"{tables.source}: has {len(tables.reflections['image_id'])} reflections "
                         f"and {tables.n_images} images, the results {n} and {results.n_images}: "
                         "not the shoebox file these results came from (pass --shoeboxes)")
    image_id = tables.reflections["image_id"]
    status_ok = ~np.isin(results.images["status"], excluded_status)
    ok = ((refl["flags"] & excluded_flags) == 0) & status_ok[image_id]
    return {"hkl": tables.reflections["miller_index"], "intensity": np.where(ok, refl["intensity_scaled"], np.nan),
            "sigma": np.where(ok, refl["intensity_scaled_sigma"], np.nan), "image_id": image_id}


def merge_results(results: Results, tables: ShoeboxTables, *, space_group=None,
                  d_min: float | None = None, n_shells: int = 10, reject_sigma: float = 6.0,
                  reject_passes: int = 2) -> MergeResult:
    """Merge a refinement's intensity_scaled (``select_observations``) in the file's space
    group (or ``space_group``) and cell."""
    sg = space_group_of(space_group or tables.space_group, what=f"{tables.source}: ")
    obs = select_observations(results, tables)
    return merge_observations(obs["hkl"], obs["intensity"], obs["sigma"], obs["image_id"],
                              space_group=sg, unit_cell=unit_cell_of(tables), d_min=d_min,
                              n_shells=n_shells, reject_sigma=reject_sigma,
                              reject_passes=reject_passes)


def write_merged_mtz(path: str, merge: MergeResult, *, wavelength: float = 0.0,
                     history: str = "") -> None:
    """A merged MTZ: H K L IMEAN SIGIMEAN N (observations merged), with gemmi."""
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = merge.space_group
    mtz.set_cell_for_all(merge.unit_cell)
    ds = mtz.add_dataset("pixelrefine")
    ds.project_name, ds.crystal_name, ds.wavelength = "pixelrefine", "crystal", float(wavelength)
    for label, kind in (("IMEAN", "J"), ("SIGIMEAN", "Q"), ("N", "I")):
        mtz.add_column(label, kind)
    data = np.column_stack([merge.hkl, merge.intensity, merge.sigma, merge.multiplicity])
    mtz.set_data(data.astype(np.float32))
    mtz.title = "pixelrefine merge"
    mtz.history = [history or "pixelrefine merge", json.dumps(merge.settings)[:80]]
    mtz.write_to_file(str(path))


def write_crystfel_hkl(path: str, merge: MergeResult) -> None:
    """CrystFEL's reflection list version 2.0 (``Symmetry:`` the Laue class merged in)."""
    lines = ["CrystFEL reflection list version 2.0",
             f"Symmetry: {crystfel_point_group(merge.space_group)}",
             "   h    k    l          I    phase   sigma(I)   nmeas"]
    for (h, k, l), i, s, n in zip(merge.hkl.tolist(), merge.intensity, merge.sigma, merge.multiplicity):
        lines.append(f"{h:4d} {k:4d} {l:4d} {i:10.2f} {'-':>8s} {s:10.2f} {int(n):7d}")
    lines.append("End of reflections")
    lines.append(f"Generated by pixelrefine merge ({merge.space_group.xhm()})")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
