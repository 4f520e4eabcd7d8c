"""The regime table of METHODS.md: every regime of pixelrefine.simulate.REGIMES refined with the
factored (default) and the per-pixel objective, nothing given but the file. The per-pixel run
cannot refine R0 or the tail: it is given the factored run's R0, profile model and tail.

    .venv/bin/python scripts/regime_table.py [--images N] [--regimes a,b,...] [--json out.json]
    .venv/bin/python scripts/regime_table.py --markdown docs/regime_table.json   # METHODS §I.15
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import pixelrefine as pr
from pixelrefine.recovery import recovery
from pixelrefine.simulate import REGIMES


def subset(shoeboxes, n_images):
    """The first n_images images of a set (for the slower per-pixel baseline)."""
    keep = shoeboxes.reflections.image_id < n_images
    refl = shoeboxes.reflections
    im = shoeboxes.images
    truth = {"images": {k: np.asarray(v)[:n_images] for k, v in shoeboxes.truth["images"].items()},
             "global": shoeboxes.truth["global"],
             "reflections": {k: np.asarray(v)[keep] for k, v in shoeboxes.truth["reflections"].items()},
             "@parameters": shoeboxes.truth["@parameters"]}
    return pr.ShoeboxSet(shoeboxes.detector,
                         pr.Images(im.wavelength[:n_images], im.bandwidth[:n_images],
                                   im.A_matrix[:n_images], im.polarization_fraction[:n_images],
                                   im.crystal_id[:n_images]),
                         pr.Reflections(refl.image_id[keep], refl.miller_index[keep],
                                        refl.intensity_ref[keep], refl.bbox[keep],
                                        refl.pixel_offset[keep], refl.panel[keep],
                                        refl.background[keep]),
                         shoeboxes.pixels, truth=truth)


def run(name: str, n_images: int, seed: int, threads: int, objectives, pixel_images: int) -> dict:
    settings = dict(REGIMES[name])
    shoeboxes = pr.simulate(n_images, seed=seed, **settings)
    rows = {}
    given = {}
    for objective in objectives:
        start = time.perf_counter()
        kwargs = {} if objective == "factored" else given
        data = shoeboxes if objective == "factored" else subset(shoeboxes, min(pixel_images, n_images))
        results = pr.refine(data, objective=objective, n_threads=threads, **kwargs)
        elapsed = time.perf_counter() - start
        if objective == "factored":  # what the baseline cannot refine, it is given
            given = {"R0": results.crystals["R0"], "profile": results.options["profile"]}
            if results.options["profile"] == "tail":
                given["tail"] = (results.crystals["tail_fraction"], results.crystals["tail_scale"])
        rec = recovery(data, results)
        rec["images"] = data.n_images
        rec["seconds"] = elapsed
        rec["profile"] = results.options.get("profile")
        rec["error_scale"] = np.asarray(results.crystals["error_scale"]).tolist()
        rec["reference_error"] = np.asarray(results.crystals["reference_error"]).tolist()
        rows[objective] = rec
    return {"n_reflections": shoeboxes.n_reflections, **rows}


def fmt(v, digits=3):
    return "—" if v is None or not np.isfinite(v) else f"{v:.{digits}g}"


def markdown(table: dict) -> str:
    """METHODS.md's table from a JSON written by --json."""
    head = ("| regime | objective | images | status 0 | G bias (σ) | G pull sd | R1 bias (σ) | "
            "R1 pull sd | J eff. | J bias | J pull sd | I pull sd | R0 (fit/true − 1, σ) |")
    lines = [head, "|" + "---|" * 13]
    for name, row in table.items():
        for objective in ("factored", "pixel"):
            rec = row.get(objective)
            if rec is None:
                continue
            images = rec.get("images", 0)
            ok = rec["status"].get("0", rec["status"].get(0, 0))
            if name == "no_reference":
                ok = rec["status"].get("6", rec["status"].get(6, 0))
            fit, sigma, true = (np.asarray(rec["R0"][k], float) for k in ("fit", "sigma", "true"))
            r0 = (f"{100 * np.max(np.abs(fit / true - 1)):.2f} %, "
                  f"{np.max(np.abs(fit - true) / sigma):.1f}" if np.all(np.isfinite(sigma)) else "given")
            lines.append(
                f"| {name} | {objective} | {images} | {ok} | {fmt(rec['G']['bias_over_sigma'], 2)} | "
                f"{fmt(rec['G']['pull_sd'], 2)} | {fmt(rec['R1']['bias_over_sigma'], 2)} | "
                f"{fmt(rec['R1']['pull_sd'], 2)} | {fmt(rec['J']['efficiency'], 3)} | "
                f"{100 * rec['J']['relative_bias']:+.2f} % | {fmt(rec['J']['pull_sd'], 2)} | "
                f"{fmt(rec['intensity_scaled']['pull_sd'], 2)} | {r0} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--objectives", default="factored,pixel")
    parser.add_argument("--pixel-images", type=int, default=20,
                        help="images of each set the (slow) per-pixel baseline refines")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None, help="print the table of a --json file")
    args = parser.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return
    table = {}
    for name in args.regimes.split(","):
        table[name] = run(name, args.images, args.seed, args.threads, args.objectives.split(","),
                          args.pixel_images)
        for objective, rec in table[name].items():
            if objective == "n_reflections":
                continue
            print(f"{name:18s} {objective:8s} status {rec['status']} profile {rec['profile']} "
                  f"G {100 * rec['G']['relative_bias']:+.2f}% ({fmt(rec['G']['bias_over_sigma'])}σ, "
                  f"pull sd {fmt(rec['G']['pull_sd'])})  R1 {100 * rec['R1']['relative_bias']:+.2f}% "
                  f"({fmt(rec['R1']['bias_over_sigma'])}σ, sd {fmt(rec['R1']['pull_sd'])})  "
                  f"J eff {fmt(rec['J']['efficiency'])} (n {rec['J']['n']}, bias "
                  f"{100 * rec['J']['relative_bias']:+.2f}%, pull sd {fmt(rec['J']['pull_sd'])})  "
                  f"I pull sd {fmt(rec['intensity_scaled']['pull_sd'])}  R0 {rec['R0']['fit']} "
                  f"± {rec['R0']['sigma']} (true {rec['R0']['true']})  k {fmt(rec['error_scale'][0])} "
                  f"f {fmt(rec['reference_error'][0])}  {rec['seconds']:.1f} s", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(table, f, indent=1, default=float)


if __name__ == "__main__":
    main()
