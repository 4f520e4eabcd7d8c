"""Refinement throughput: images per second for the factored and the per-pixel objective on
stills of 200 reflections with 7x7 shoeboxes, on one thread and on two.

Run:  ./dev.sh bench -k refine      (or: pytest benchmarks/test_bench_refine.py --benchmark-only)

Each benchmark refines the same 64 simulated stills; ``extra_info`` carries images/s, the
mean number of Levenberg-Marquardt iterations and the median |corr(G, R1)| of the images, so
that the JSON output (``--benchmark-json``) holds everything benchmarks/RESULTS.md quotes.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

import pixelrefine as pr  # noqa: E402
from pixelrefine import _core  # noqa: E402

N_IMAGES = 64
R0 = 5e-4


@pytest.fixture(scope="module")
def stills():
    shoeboxes = pr.simulate(N_IMAGES, seed=99, max_reflections=200, shoebox_size=7)
    assert np.all(np.diff(shoeboxes.image_start()) == 200)
    shoeboxes.core()  # validation is not part of what is timed
    return shoeboxes


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("objective", ["factored", "pixel"])
def test_refine_throughput(benchmark, stills, objective, threads):
    benchmark.group = "refine: 64 stills x 200 reflections, 7x7"
    options = {"reference_sigma_rel": 0.05} if objective == "factored" else {}
    results = benchmark.pedantic(pr.refine, args=(stills,),
                                 kwargs=dict(R0=R0, objective=objective, n_threads=threads, **options),
                                 rounds=5, iterations=1, warmup_rounds=1)
    assert np.all(results.images["status"] == 0)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update({
        "images_per_second": N_IMAGES / seconds,
        "images_per_second_per_thread": N_IMAGES / seconds / threads,
        "ms_per_image_thread": seconds / N_IMAGES * threads * 1e3,
        "mean_lm_iterations": float(results.images["n_iterations"].mean()),
        "median_abs_corr_G_R1": float(np.median(np.abs(results.correlation("G", "R1")))),
        "median_abs_corr_G_B": float(np.median(np.abs(results.correlation("G", "B")))),
    })


def test_ceres_solve_overhead(benchmark):
    """One Ceres Solve of a one-parameter problem, built fresh each time (as per image)."""
    benchmark.group = "ceres per-solve overhead"
    seconds = benchmark.pedantic(_core.trivial_solve_seconds, args=(2000,), rounds=5, iterations=1)
    benchmark.extra_info["microseconds_per_solve"] = seconds * 1e6
