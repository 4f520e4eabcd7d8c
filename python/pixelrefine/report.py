"""Summaries of a refinement: parameter spread per image, status and flag counts, and, when
the input carries ``/truth``, the recovery of the simulated parameters."""

from __future__ import annotations

import numpy as np

from .refine import FLAGS, STATUS, Results
from .shoeboxes import ShoeboxSet

__all__ = ["summary_table", "format_report"]


def _row(name: str, values: np.ndarray, sigmas: np.ndarray, scale: float = 1.0) -> list[str]:
    ok = np.isfinite(values)
    v = values[ok] * scale
    s = sigmas[ok & np.isfinite(sigmas)] * scale
    if v.size == 0:
        return [name, "0"] + ["-"] * 6
    return [name, str(v.size), f"{v.mean():.5g}", f"{np.median(v):.5g}", f"{v.std():.3g}",
            f"{v.min():.5g}", f"{v.max():.5g}", f"{np.median(s):.3g}" if s.size else "-"]


def summary_table(results: Results) -> list[list[str]]:
    """Rows (parameter, n, mean, median, sd over images, min, max, median sigma)."""
    im = results.images
    rows = [["parameter", "n", "mean", "median", "sd", "min", "max", "median σ"],
            _row("G", im["G"], im["G_sigma"]),
            _row("B (Å²)", im["B"], im["B_sigma"]),
            _row("R1 (1e-3 Å⁻¹)", im["R1"], im["R1_sigma"], 1e3)]
    if np.any(np.isfinite(im["detector_shift_sigma"])):
        for axis in range(3):
            rows.append(_row(f"rotation_{'xyz'[axis]} (mrad)", im["rotation"][:, axis],
                             im["rotation_sigma"][:, axis], 1e3))
        rows.append(_row("detector_shift (mm)", im["detector_shift"], im["detector_shift_sigma"]))
    for crystal, r0 in zip(results.crystals["crystal_id"], results.crystals["R0"]):
        rows.append([f"R0 crystal {crystal} (1e-3 Å⁻¹)", "given", f"{r0 * 1e3:.5g}", "", "", "", "", ""])
    return rows


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _recovery(results: Results, truth: dict) -> str:
    rows = [["parameter", "median (fit−true)/σ", "sd of (fit−true)/σ", "within 3σ"]]
    for name in ("G", "B", "R1"):
        true = np.asarray(truth["images"][name])
        z = (results.images[name] - true) / results.images[f"{name}_sigma"]
        z = z[np.isfinite(z)]
        if z.size:
            rows.append([name, f"{np.median(z):.3f}", f"{z.std():.3f}", f"{np.mean(np.abs(z) < 3):.1%}"])
    refl = results.reflections
    scaled = refl["intensity_scaled"]
    true_i = np.asarray(truth["reflections"]["intensity_true"])
    ok = np.isfinite(scaled) & (refl["partiality"] > 0.3)
    text = "Recovery against /truth\n" + _format(rows)
    if ok.any():
        z = (scaled[ok] - true_i[ok]) / refl["intensity_scaled_sigma"][ok]
        text += (f"\nintensity_scaled vs intensity_true (partiality > 0.3, n = {ok.sum()}): "
                 f"median z {np.median(z):.3f}, sd z {z.std():.3f}")
    return text


def format_report(results: Results, shoeboxes: ShoeboxSet | None = None) -> str:
    """The text printed by ``pixelrefine report``."""
    im, refl = results.images, results.reflections
    parts = [f"objective: {results.objective}   images: {results.n_images}   "
             f"reflections: {len(refl['flags'])}   input: {results.input_file}",
             _format(summary_table(results))]
    status, counts = np.unique(im["status"], return_counts=True)
    parts.append("status: " + ", ".join(f"{c} × {s} ({STATUS.get(int(s), '?').split(':')[0]})"
                                        for s, c in zip(status, counts)))
    flag_counts = [f"{name} {int(np.count_nonzero(refl['flags'] & bit))}" for bit, name in FLAGS.items()]
    parts.append("reflection flags: " + ", ".join(flag_counts))
    ok = np.isfinite(refl["intensity_prf"]) & (refl["intensity_prf_sigma"] > 0)
    if ok.any():
        snr = refl["intensity_prf"][ok] / refl["intensity_prf_sigma"][ok]
        parts.append(f"intensity_prf / σ: median {np.median(snr):.2f}, "
                     f"fraction > 3: {np.mean(snr > 3):.1%}")
    if "covariance" in im and im["covariance"].shape[1] >= 3:
        corr = results.correlation("G", "R1")
        corr = corr[np.isfinite(corr)]
        if corr.size:
            parts.append(f"G–R1 correlation: median {np.median(corr):+.3f} "
                         f"(|corr| max {np.abs(corr).max():.3f})")
    if shoeboxes is not None and shoeboxes.truth:
        parts.append(_recovery(results, shoeboxes.truth))
    return "\n".join(parts)
