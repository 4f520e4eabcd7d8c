"""Shared fixtures: small simulated data sets (made here, never downloaded)."""

import numpy as np
import pytest

import pixelrefine as pr

#: Partiality width used by every simulation in the tests (Å⁻¹), given to the refinement.
R0 = 5e-4


@pytest.fixture(scope="session")
def small_set():
    """Eight stills, 150 reflections each, the simulator's defaults otherwise."""
    return pr.simulate(8, seed=11, max_reflections=150)


@pytest.fixture(scope="session")
def recovery_set():
    """Forty stills with 5 % reference error: for parameter recovery."""
    return pr.simulate(40, seed=2024, max_reflections=200, reference_error=0.05)


@pytest.fixture()
def shoebox_file(tmp_path, small_set):
    path = tmp_path / "shoeboxes.h5"
    pr.write_shoeboxes(path, small_set)
    return path


def with_counts(shoeboxes, counts):
    """A copy of a set with other counts (same geometry, reflections and mask)."""
    return pr.ShoeboxSet(shoeboxes.detector, shoeboxes.images, shoeboxes.reflections,
                         pr.Pixels(np.asarray(counts, np.float32), shoeboxes.pixels.mask),
                         truth=shoeboxes.truth)
