"""Summaries of a refinement: parameter spread per image, status and flag counts, and, when
the input carries ``/truth``, the recovery of the simulated parameters."""

from __future__ import annotations

import numpy as np

from .losses import shoebox_metrics
from .refine import FLAGS, STATUS, Results, model_counts
from .shoeboxes import ShoeboxSet

__all__ = ["summary_table", "format_report", "shoebox_quality", "per_image_table"]


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


def shoebox_quality(shoeboxes: ShoeboxSet, results: Results, *, n_threads: int = 1
                    ) -> dict[str, np.ndarray]:
    """Model-vs-observed metrics of every shoebox, and their median per image.

    The model is the refinement's own (``model_counts``); the metrics are
    ``losses.shoebox_metrics``: weighted χ² per valid pixel (Σ (I − μ)²/v / n), PSNR with
    the model's range as data range, SSIM with a window that fits the box.

    Returns
    -------
    dict
        ``chi2``, ``psnr``, ``ssim`` per reflection [M], and ``image_chi2``,
        ``image_psnr``, ``image_ssim``: the median over each image's reflections [N].
    """
    mu, variance = model_counts(shoeboxes, results, n_threads=n_threads)
    refl = shoeboxes.reflections
    metrics = shoebox_metrics(shoeboxes.pixels.counts, mu, variance, shoeboxes.pixels.mask,
                              refl.pixel_offset, refl.shoebox_shape)
    out = {"chi2": metrics.chi2, "psnr": metrics.psnr, "ssim": metrics.ssim}
    start = shoeboxes.image_start()
    for name in ("chi2", "psnr", "ssim"):
        values = np.where(np.isfinite(out[name]), out[name], np.nan)
        medians = np.full(shoeboxes.n_images, np.nan)
        for i in range(shoeboxes.n_images):
            chunk = values[start[i]:start[i + 1]]
            if np.isfinite(chunk).any():
                medians[i] = np.nanmedian(chunk)
        out[f"image_{name}"] = medians
    return out


def _quality_text(quality: dict[str, np.ndarray]) -> str:
    rows = [["per-image median over shoeboxes", "median", "5 %", "95 %"]]
    for name, label in (("chi2", "χ² per pixel"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM")):
        v = quality[f"image_{name}"]
        v = v[np.isfinite(v)]
        if v.size:
            rows.append([label, f"{np.median(v):.4g}", f"{np.percentile(v, 5):.4g}",
                         f"{np.percentile(v, 95):.4g}"])
    return "Model vs observed shoeboxes\n" + _format(rows)


def per_image_table(results: Results, quality: dict[str, np.ndarray] | None = None) -> str:
    """One row per image: status, G, B, R1 with sigmas and, given ``shoebox_quality``, the
    median model-vs-observed χ², PSNR and SSIM of its shoeboxes."""
    im = results.images
    head = ["image", "status", "n_refl", "G", "σG", "B", "σB", "R1×1e3", "σR1×1e3"]
    if quality is not None:
        head += ["χ²/px", "PSNR", "SSIM"]
    rows = [head]
    for i in range(results.n_images):
        row = [str(i), str(im["status"][i]), str(im["n_reflections"][i]),
               f"{im['G'][i]:.4f}", f"{im['G_sigma'][i]:.2g}", f"{im['B'][i]:.2f}",
               f"{im['B_sigma'][i]:.2g}", f"{im['R1'][i] * 1e3:.4f}", f"{im['R1_sigma'][i] * 1e3:.2g}"]
        if quality is not None:
            row += [f"{quality['image_chi2'][i]:.3f}", f"{quality['image_psnr'][i]:.2f}",
                    f"{quality['image_ssim'][i]:.3f}"]
        rows.append(row)
    return _format(rows)


def format_report(results: Results, shoeboxes: ShoeboxSet | None = None, *,
                  per_image: bool = False) -> str:
    """The text printed by ``pixelrefine report`` (``per_image``: also one row per image)."""
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
    quality = shoebox_quality(shoeboxes, results) if shoeboxes is not None else None
    if quality is not None:
        parts.append(_quality_text(quality))
    if per_image:
        parts.append(per_image_table(results, quality))
    if shoeboxes is not None and shoeboxes.truth:
        parts.append(_recovery(results, shoeboxes.truth))
    return "\n".join(parts)
