"""A report to look at: one self-contained HTML page (figures embedded as PNG) of a refinement.

Figures (matplotlib, each a ``<figure>`` with an id and a caption): G, B, R1 per image; R0 per
crystal with its sigma; a Wilson plot; χ² per resolution shell; pull histograms when the shoebox
file has ``/truth``; CC½ and completeness by shell when a merge is given. Tables: the parameter
summary, the crystals, the merge statistics.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io import ShoeboxTables
from .merge import MergeResult
from .refine import STATUS, Results
from .report import crystal_table, summary_table

__all__ = ["html_report", "write_html_report", "FIGURES"]

#: Figure ids in the order they appear, and when each is there.
FIGURES = {"per-image": "always", "r0": "always", "wilson": "always", "chi2-shell": "always",
           "pulls": "when the shoebox file has /truth", "merge-shells": "when merged"}

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #bbb; padding: 2px 8px; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; } .note { color: #666; font-size: 0.9em; }
"""


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(fid: str, fig: Figure, caption: str) -> str:
    return (f'<figure id="{fid}"><img alt="{html.escape(fid)}" '
            f'src="data:image/png;base64,{_png(fig)}"><figcaption>{html.escape(caption)}'
            "</figcaption></figure>")


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _per_image(results: Results) -> Figure:
    im = results.images
    x = np.arange(results.n_images)
    fig = Figure(figsize=(10, 6.5))
    for k, (name, scale, unit) in enumerate((("G", 1, ""), ("B", 1, " (Å²)"), ("R1", 1e3, " (10⁻³ Å⁻¹)"))):
        ax = fig.add_subplot(3, 1, k + 1)
        ax.errorbar(x, im[name] * scale, yerr=im[f"{name}_sigma"] * scale, fmt=".", ms=4,
                    elinewidth=0.8, capsize=0)
        bad = im["status"] != 0
        if bad.any():
            ax.plot(x[bad], im[name][bad] * scale, "x", color="C3", label="status ≠ 0")
            ax.legend(loc="best", fontsize=8)
        ax.set_ylabel(name + unit)
        ax.grid(alpha=0.3)
    ax.set_xlabel("image")
    return fig


def _r0(results: Results, truth: dict | None) -> Figure:
    c = results.crystals
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(c["crystal_id"]))
    sigma = np.where(np.isfinite(c["R0_sigma"]), c["R0_sigma"], 0.0)
    ax.errorbar(x, c["R0"] * 1e3, yerr=sigma * 1e3, fmt="o", capsize=4, label="refined ± σ")
    if truth and "global" in truth and "R0" in truth["global"]:
        true = np.asarray(truth["global"]["R0"], float)
        ax.plot(x[: len(true)], true[: len(x)] * 1e3, "k_", ms=20, label="true")
    ax.set_xticks(x, [str(v) for v in c["crystal_id"]])
    ax.set_xlabel("crystal")
    ax.set_ylabel("R0 (10⁻³ Å⁻¹)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _shells(d: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-count shells in 1/d²: (bin of each finite d, bin centres in 1/d²)."""
    inv = 1.0 / d**2
    edges = np.quantile(inv, np.linspace(0, 1, n + 1))
    edges[-1] += 1e-12
    b = np.clip(np.searchsorted(edges, inv, side="right") - 1, 0, n - 1)
    centres = np.array([inv[b == k].mean() if np.any(b == k) else np.nan for k in range(n)])
    return b, centres


def _wilson(results: Results) -> tuple[Figure, str]:
    refl = results.reflections
    ok = np.isfinite(refl["intensity_scaled"]) & np.isfinite(refl["d"]) & (refl["d"] > 0)
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    note = "no scaled intensities"
    if ok.sum() >= 20:
        d, intensity = refl["d"][ok], refl["intensity_scaled"][ok]
        b, centres = _shells(d, min(20, max(3, ok.sum() // 50)))
        mean = np.array([intensity[b == k].mean() for k in range(len(centres))])
        good = mean > 0
        ax.plot(centres[good], np.log(mean[good]), "o-", ms=4)
        if good.sum() >= 3:
            slope, intercept = np.polyfit(centres[good], np.log(mean[good]), 1)
            ax.plot(centres[good], intercept + slope * centres[good], "--", color="C1",
                    label=f"B_Wilson = {-2 * slope:.1f} Å²")
            ax.legend(fontsize=8)
            note = f"ln⟨I⟩ against 1/d²; the slope gives B_Wilson = {-2 * slope:.1f} Å²"
    ax.set_xlabel("1/d² (Å⁻²)")
    ax.set_ylabel("ln ⟨intensity_scaled⟩")
    ax.grid(alpha=0.3)
    return fig, note


def _chi2(results: Results) -> Figure:
    refl = results.reflections
    chi2 = refl["chi2_pixel_reflection"]
    ok = np.isfinite(chi2) & np.isfinite(refl["d"]) & (refl["d"] > 0)
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    if ok.sum() >= 10:
        b, centres = _shells(refl["d"][ok], min(12, max(2, ok.sum() // 50)))
        values = chi2[ok]
        mean = [values[b == k].mean() for k in range(len(centres))]
        median = [np.median(values[b == k]) for k in range(len(centres))]
        d_centre = 1 / np.sqrt(centres)
        ax.plot(d_centre, mean, "o-", label="mean")
        ax.plot(d_centre, median, "s--", label="median")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("d (Å)")
    ax.set_ylabel("pixel χ² / dof per box")
    ax.grid(alpha=0.3)
    return fig


def _pulls(results: Results, truth: dict) -> tuple[Figure, str]:
    params = truth.get("@parameters")
    params = json.loads(params.decode() if isinstance(params, bytes) else str(params)) if params is not None else {}
    gain, scale = float(params.get("gain", 1.0)), float(params.get("reference_scale", 1.0))
    refl, tr = results.reflections, truth["reflections"]
    J_true = np.asarray(tr["intensity_model"]) * gain
    I_true = np.asarray(tr["intensity_true"]) * scale
    pulls = {"intensity_prf (J) against J_true": (refl["intensity_prf"] - J_true) / refl["intensity_prf_sigma"],
             "intensity_scaled against I_true": (refl["intensity_scaled"] - I_true) / refl["intensity_scaled_sigma"]}
    fig = Figure(figsize=(10, 3.6))
    grid = np.linspace(-5, 5, 201)
    texts = []
    for k, (name, p) in enumerate(pulls.items()):
        p = p[np.isfinite(p)]
        ax = fig.add_subplot(1, 2, k + 1)
        if p.size:
            ax.hist(np.clip(p, -5, 5), bins=50, range=(-5, 5), density=True, alpha=0.7)
            texts.append(f"{name}: mean {p.mean():+.3f}, sd {p.std():.3f} (n = {p.size})")
        ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k", lw=1, label="N(0, 1)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("pull (clipped at ±5)")
        ax.legend(fontsize=8)
    return fig, "; ".join(texts)


def _merge_figure(merge: MergeResult) -> Figure:
    shells = merge.shells
    d = np.array([0.5 * (s["d_min"] + min(s["d_max"], 2 * s["d_min"])) for s in shells])
    fig = Figure(figsize=(10, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(d, [s["cc_half"] for s in shells], "o-", label="CC½ (σ-τ)")
    ax.plot(d, [s["cc_half_split"] for s in shells], "s--", label="CC½ (even/odd images)")
    ax.set_ylim(-0.1, 1.05)
    ax.set_ylabel("CC½")
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.plot(d, [100 * s["completeness"] for s in shells], "o-", color="C2")
    ax2.set_ylabel("completeness (%)")
    ax2.set_ylim(0, 105)
    for a in (ax, ax2):
        a.set_xlabel("d (Å), shell centre")
        a.invert_xaxis()
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def html_report(results: Results, tables: ShoeboxTables | None = None, *,
                merge: MergeResult | None = None, merge_note: str = "",
                title: str = "pixelrefine report") -> str:
    """The report page as a string (self-contained: figures are inline PNGs).

    Parameters
    ----------
    results : Results
    tables : ShoeboxTables, optional
        The shoebox file (without pixels): its ``/truth`` gives the pull histograms.
    merge : MergeResult, optional
        Gives the merge table and the CC½ / completeness figure.
    merge_note : str
        Shown instead when there is no merge (why not).
    """
    truth = tables.truth if tables is not None else None
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    status, counts = np.unique(results.images["status"], return_counts=True)
    parts.append(f"<p>objective {html.escape(results.objective)}, {results.n_images} images, "
                 f"{len(results.reflections['flags'])} reflections; input "
                 f"{html.escape(str(results.input_file))}; status "
                 + ", ".join(f"{c} × {s} ({html.escape(STATUS.get(int(s), '?').split(':')[0])})"
                             for s, c in zip(status, counts)) + "</p>")
    parts.append("<h2>Parameters over images</h2>" + _table(summary_table(results)))
    parts.append(_figure("per-image", _per_image(results),
                         "G, B and R1 per image with their sigmas (crosses: status ≠ 0)."))
    parts.append("<h2>Crystals</h2>" + _table(crystal_table(results)))
    parts.append(_figure("r0", _r0(results, truth), "R0 per crystal with its sigma"
                         + (" (bar: the simulated truth)." if truth else ".")))
    fig, note = _wilson(results)
    parts.append("<h2>Intensities</h2>" + _figure("wilson", fig, "Wilson plot: " + note + "."))
    parts.append(_figure("chi2-shell", _chi2(results),
                         "χ² per degree of freedom of each box's pixels, by resolution shell "
                         "(equal-count shells; 1 is a perfect error model)."))
    if truth and "reflections" in truth:
        fig, note = _pulls(results, truth)
        parts.append("<h2>Against the simulated truth</h2>"
                     + _figure("pulls", fig, "Pull histograms: " + note + "."))
    parts.append("<h2>Merge</h2>")
    if merge is not None:
        rows = [["d max", "d min", "n obs", "n unique", "completeness %", "multiplicity", "<I/σ>",
                 "CC½", "CC½ split", "Rsplit"]]
        for s in merge.shells + [dict(merge.overall, overall=True)]:
            fmt = lambda v, n: "-" if v is None or not np.isfinite(v) else f"{v:.{n}f}"  # noqa: E731
            rows.append(["overall" if s.get("overall") else fmt(s["d_max"], 2), fmt(s["d_min"], 2),
                         str(s["n_obs"]), str(s["n_unique"]), fmt(100 * s["completeness"], 1),
                         fmt(s["multiplicity"], 2), fmt(s["i_over_sigma"], 2), fmt(s["cc_half"], 3),
                         fmt(s["cc_half_split"], 3), fmt(s["r_split"], 3)])
        parts.append(f"<p>{html.escape(merge.space_group.xhm())}: {merge.n_input} observations, "
                     f"{merge.n_rejected} rejected, {merge.n_absent} systematically absent.</p>"
                     + _table(rows))
        parts.append(_figure("merge-shells", _merge_figure(merge),
                             "CC½ (σ-τ and between even and odd images) and completeness by "
                             "resolution shell."))
    else:
        parts.append(f"<p class='note'>Not merged: {html.escape(merge_note or 'no space group')}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(path: str, results: Results, tables: ShoeboxTables | None = None,
                      **kwargs: Any) -> None:
    """``html_report`` written to ``path`` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(html_report(results, tables, **kwargs))
