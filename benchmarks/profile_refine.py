"""Where a refinement's time goes, phase by phase (not a pytest benchmark: a script).

    .venv/bin/python benchmarks/profile_refine.py                      # filling, 16 images, default refine
    .venv/bin/python benchmarks/profile_refine.py --mode single        # R0 etc. held, one round
    .venv/bin/python benchmarks/profile_refine.py --regime pilatus_like --images 4
    .venv/bin/python benchmarks/profile_refine.py --regime comfortable --images 64 \
        --max-reflections 200 --seed 99 --mode single      # the set of the issue-2 benchmark

Phases: simulate, validate (``ShoeboxSet.core()``), then every global round of the refinement:
the time inside the core's ``refine_images`` (the images' fits) and the time outside it (the
Python per-crystal step, allocation and warm-start copies), with the LM iterations and passes
per image of that round. Then the same refinement again with one image per core call
(``chunk_size=1``): per round the median time per image, per box pixel and per box pixel per
pass, and for the first (cold) round a least-squares split of the time per box pixel into a
fixed part, a part per pass (``n_outer``) and a part per LM iteration.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import numpy as np

import pixelrefine as pr
from pixelrefine import _core
from pixelrefine.simulate import REGIMES

refine_module = importlib.import_module("pixelrefine.refine")


class Recorder:
    """Wraps the core's refine_images: per call, its time, images, iterations and passes."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return getattr(_core, name)

    def refine_images(self, core_set, opts, first, last, n_threads, arrays):
        t0 = time.perf_counter()
        out = _core.refine_images(core_set, opts, first, last, n_threads, arrays)
        t1 = time.perf_counter()
        self.calls.append({"first": first, "last": last, "seconds": t1 - t0, "start": t0, "end": t1,
                           "profile": opts.profile,
                           "iterations": arrays["n_iterations"][first:last].copy(),
                           "outer": arrays["n_outer"][first:last].copy()})
        return out

    def rounds(self):
        out = []
        for call in self.calls:
            if call["first"] == 0:
                out.append([])
            out[-1].append(call)
        return out


def run_refinement(shoeboxes, kwargs, chunk_size=None):
    recorder = Recorder()
    refine_module._core = recorder
    try:
        recorder.begin = time.perf_counter()
        results = pr.refine(shoeboxes, chunk_size=chunk_size, **kwargs)
        recorder.finish = time.perf_counter()
    finally:
        refine_module._core = _core
    return results, recorder, recorder.finish - recorder.begin


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", default="filling", choices=sorted(REGIMES))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-reflections", type=int, default=None,
                        help="override the regime's max_reflections per image")
    parser.add_argument("--mode", default="default", choices=["default", "single"],
                        help="default: refine(s); single: R0, error model held at the truth, "
                             "profile isotropic, max_global=1")
    parser.add_argument("--objective", default="factored", choices=["factored", "pixel"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-per-image", action="store_true", help="skip the chunk_size=1 run")
    args = parser.parse_args()

    t0 = time.perf_counter()
    preset = dict(REGIMES[args.regime])
    if args.max_reflections is not None:
        preset["max_reflections"] = args.max_reflections
    s = pr.simulate(args.images, seed=args.seed, **preset)
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    s.core()
    t_validate = time.perf_counter() - t0
    shape = s.reflections.shoebox_shape
    box_pixels = int(np.sum(shape[:, 0].astype(np.int64) * shape[:, 1]))
    n, m = s.n_images, s.n_reflections
    print(f"{args.regime}: {n} images, {m} reflections ({m / n:.0f} per image), "
          f"{box_pixels} box pixels (median side {np.median(shape):.0f}, {shape.min()}-{shape.max()})")
    print(f"simulate {t_sim:.2f} s, validate {t_validate * 1e3:.1f} ms")

    kwargs = dict(objective=args.objective, n_threads=args.threads)
    if args.mode == "single" or args.objective == "pixel":
        kwargs["R0"] = float(s.truth["global"]["R0"][0])
    if args.mode == "single":
        kwargs.update(profile="isotropic", max_global=1, error_scale=1.0,
                      reference_error=float(json.loads(s.truth["@parameters"])["reference_error"]))
    shown = {k: v for k, v in kwargs.items() if k != "n_threads"}
    print(f"refine({shown}), {args.threads} thread(s)")

    results, rec, total = run_refinement(s, kwargs)
    in_core = sum(c["seconds"] for c in rec.calls)
    print(f"\n{'round':>5} {'profile':>11} {'core s':>8} {'ms/image':>9} {'LM it/img':>9} "
          f"{'passes/img':>10} {'refl/s/core':>12} {'px/s/core':>10} {'then Python s':>13}")
    rounds = rec.rounds()
    for i, calls in enumerate(rounds, 1):
        sec = sum(c["seconds"] for c in calls)
        it = np.concatenate([c["iterations"] for c in calls]).mean()
        outer = np.concatenate([c["outer"] for c in calls]).mean()
        # outside the core after this round: the per-crystal step, profile choice, allocation
        after = (rounds[i][0]["start"] if i < len(rounds) else rec.finish) - calls[-1]["end"]
        print(f"{i:>5} {calls[0]['profile']:>11} {sec:8.2f} {sec / n * 1e3 * args.threads:9.1f} "
              f"{it:9.2f} {outer:10.2f} {m / sec / args.threads:12.0f} "
              f"{box_pixels / sec / args.threads:10.3g} {after:13.3f}")
    print(f"before the first round (options, initial R0, allocation): "
          f"{rounds[0][0]['start'] - rec.begin:.3f} s")
    print(f"total {total:.2f} s: in the core {in_core:.2f} s ({in_core / total:.1%}), "
          f"outside (per-crystal steps, allocation, copies) {total - in_core:.2f} s; "
          f"{m / total / args.threads:.0f} reflections/s/core, "
          f"{box_pixels / total / args.threads:.3g} box pixels/s/core")
    print(f"final: profile {results.options['profile']}, R0 {results.crystals['R0'][0]:.4g}, "
          f"k {results.crystals['error_scale'][0]:.4f}, f {results.crystals['reference_error'][0]:.4f}, "
          f"status {dict(zip(*[a.tolist() for a in np.unique(results.images['status'], return_counts=True)]))}")

    if args.no_per_image:
        return
    _, rec1, total1 = run_refinement(s, kwargs, chunk_size=1)
    calls = rec1.calls
    sec = np.array([c["seconds"] for c in calls])
    it = np.array([c["iterations"][0] for c in calls], float)
    outer = np.array([c["outer"][0] for c in calls], float)
    image = np.array([c["first"] for c in calls])
    round_of = np.cumsum([c["first"] == 0 for c in calls])
    px = np.bincount(s.reflections.image_id, shape[:, 0] * shape[:, 1], n).astype(np.int64)[image]
    print(f"\none image per core call ({len(sec)} image fits, total {total1:.2f} s): "
          f"per image fit median {np.median(sec) * 1e3:.1f} ms (range {sec.min() * 1e3:.1f}-"
          f"{sec.max() * 1e3:.1f}); passes {outer.min():.0f}-{outer.max():.0f}, "
          f"LM iterations {it.min():.0f}-{it.max():.0f}")
    for r in np.unique(round_of):
        sel = round_of == r
        print(f"  round {r}: median {np.median(sec[sel]) * 1e3:.1f} ms per image, "
              f"{np.median(sec[sel] / px[sel]) * 1e9:.0f} ns per box pixel, "
              f"{np.median(sec[sel] / (outer[sel] * px[sel])) * 1e9:.0f} ns per box pixel per pass")
    # cold start (round 1): time per box pixel ~ a + b*passes + c*LM iterations
    sel = round_of == 1
    if sel.sum() >= 6:
        X = np.column_stack([np.ones(sel.sum()), outer[sel], it[sel]])
        y = sec[sel] / px[sel]
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        resid = y - X @ coef
        print(f"round 1, per box pixel: {coef[0] * 1e9:.0f} ns + {coef[1] * 1e9:.0f} ns/pass + "
              f"{coef[2] * 1e9:.0f} ns/LM iteration (rms residual {np.sqrt(np.mean(resid ** 2)) * 1e9:.0f} ns; "
              f"{sel.sum()} image fits, a rough split)")
    for k in np.argsort(sec)[-3:][::-1]:
        print(f"  slowest: image {image[k]} (round {round_of[k]}) {sec[k] * 1e3:.1f} ms, "
              f"{px[k]} box pixels, {outer[k]:.0f} passes, {it[k]:.0f} LM iterations, "
              f"profile {calls[k]['profile']}")

if __name__ == "__main__":
    main()
