"""Summaries of a refinement: parameter spread per image, status and flag counts, and, when
the input carries ``/truth``, the recovery of the simulated parameters."""

from __future__ import annotations

import numpy as np

from .losses import shoebox_metrics
from .recovery import recovery
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
            _row("R1 (1e-3 Å⁻¹)", im["R1"], im["R1_sigma"], 1e3),
            _row("spot sd (px)", im["spot_sd"], np.full(len(im["G"]), np.nan)),
            _row("χ²/pixel", im["chi2_pixel"], np.full(len(im["G"]), np.nan))]
    if np.any(np.isfinite(im["detector_shift_sigma"])):
        for axis in range(3):
            rows.append(_row(f"rotation_{'xyz'[axis]} (mrad)", im["rotation"][:, axis],
                             im["rotation_sigma"][:, axis], 1e3))
        rows.append(_row("detector_shift (mm)", im["detector_shift"], im["detector_shift_sigma"]))
    return rows


def crystal_table(results: Results) -> list[list[str]]:
    """Rows per crystal: R0 ± σ (or 'given'), k, f, the tail's fraction and scale."""
    c = results.crystals
    rows = [["crystal", "R0 (1e-3 Å⁻¹)", "σ(R0)", "error scale k", "reference error f",
             "tail fraction", "tail scale"]]
    for i, crystal in enumerate(c["crystal_id"]):
        sigma = c["R0_sigma"][i]
        rows.append([str(crystal), f"{c['R0'][i] * 1e3:.5g}",
                     f"{sigma * 1e3:.2g}" if np.isfinite(sigma) else "given",
                     f"{c['error_scale'][i]:.4g}", f"{c['reference_error'][i]:.4g}",
                     f"{c['tail_fraction'][i]:.3g}", f"{c['tail_scale'][i]:.3g}"])
    return rows


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _recovery(results: Results, shoeboxes: ShoeboxSet) -> str:
    rec = recovery(shoeboxes, results)
    rows = [["parameter", "bias / median σ", "pull mean", "pull sd", "n"]]
    for name in ("G", "B", "R1"):
        r = rec[name]
        if r["n"]:
            rows.append([name, f"{r['bias_over_sigma']:.3f}", f"{r['pull_mean']:.3f}",
                         f"{r['pull_sd']:.3f}", str(r["n"])])
    text = "Recovery against /truth\n" + _format(rows)
    J, I = rec["J"], rec["intensity_scaled"]
    text += (f"\nJ (SNR ≥ 3, ≥ 80 % in the box, n = {J['n']}): efficiency against the Cramér–Rao "
             f"bound {J['efficiency']:.3f}, bias {100 * J['relative_bias']:+.2f} %, pull sd "
             f"{J['pull_sd']:.3f}; intensity_scaled pull mean {I['pull_mean']:.3f}, sd "
             f"{I['pull_sd']:.3f}")
    for c, (fit, sigma, true) in enumerate(zip(rec["R0"]["fit"], rec["R0"]["sigma"], rec["R0"]["true"])):
        text += f"\nR0 crystal {c}: {fit:.5g} ± {sigma:.2g} (true {true:.5g})"
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
    head = ["image", "status", "n_refl", "G", "σG", "B", "σB", "R1×1e3", "σR1×1e3", "χ²/px"]
    if quality is not None:
        head += ["box χ²/px", "PSNR", "SSIM"]
    rows = [head]
    for i in range(results.n_images):
        row = [str(i), str(im["status"][i]), str(im["n_reflections"][i]),
               f"{im['G'][i]:.4f}", f"{im['G_sigma'][i]:.2g}", f"{im['B'][i]:.2f}",
               f"{im['B_sigma'][i]:.2g}", f"{im['R1'][i] * 1e3:.4f}", f"{im['R1_sigma'][i] * 1e3:.2g}",
               f"{im['chi2_pixel'][i]:.3f}"]
        if quality is not None:
            row += [f"{quality['image_chi2'][i]:.3f}", f"{quality['image_psnr'][i]:.2f}",
                    f"{quality['image_ssim'][i]:.3f}"]
        rows.append(row)
    return _format(rows)


def format_report(results: Results, shoeboxes: ShoeboxSet | None = None, *,
                  per_image: bool = False) -> str:
    """The text printed by ``pixelrefine report`` (``per_image``: also one row per image)."""
    im, refl = results.images, results.reflections
    parts = [f"objective: {results.objective}   profile: {results.options.get('profile', '?')}   "
             f"images: {results.n_images}   reflections: {len(refl['flags'])}   "
             f"input: {results.input_file}",
             _format(summary_table(results)), _format(crystal_table(results))]
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
        parts.append(_recovery(results, shoeboxes))
    return "\n".join(parts)
