"""The data model: a set of shoeboxes over many still images, as a struct of arrays.

One ``ShoeboxSet`` holds the four groups of the input file format (``/detector``,
``/images``, ``/reflections``, ``/pixels``; see ``shoebox-hdf5.md``) as NumPy arrays of
canonical dtype, so the C++ core reads them without copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from . import _core

__all__ = ["Detector", "Images", "Reflections", "Pixels", "ShoeboxSet"]


def as_column(value: Any, dtype: Any, ndim: int, dataset: str) -> np.ndarray:
    """``value`` as a C-contiguous array of ``dtype`` with ``ndim`` dimensions, converted only
    where nothing is lost.

    Any real dtype converts to a float column, unless a finite value would overflow it; an
    integer column takes integers (and booleans) within its range, and floats only where
    they are whole numbers in range. Read-only and non-contiguous arrays are copied.

    Raises
    ------
    TypeError
        For values that are not real numbers (strings, objects, complex numbers).
    ValueError
        For a wrong number of dimensions or a value the dtype cannot hold, naming
        ``dataset`` and the first bad row.
    """
    target = np.dtype(dtype)
    if (isinstance(value, np.ndarray) and value.dtype == target and value.ndim == ndim
            and value.flags.c_contiguous and not value.flags.writeable):
        return value  # already canonical
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:  # e.g. ragged nested lists
        raise ValueError(f"{dataset}: not an array of numbers ({error})") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{dataset}: must hold real numbers, not dtype {array.dtype}")
    if array.ndim != ndim and not (array.size == 0 and ndim > 1):
        raise ValueError(f"{dataset}: expected {ndim} dimension(s), found shape {array.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(target)
    if target.kind == "f":
        lost = np.isinf(converted) & ~np.isinf(array)
    elif array.dtype.kind == "f":
        info = np.iinfo(target)
        lost = ~(np.isfinite(array) & (array >= info.min) & (array <= info.max)
                 & (np.floor(array) == array))
    else:
        info = np.iinfo(target)
        lost = (array < info.min) | (array > info.max)
    if np.any(lost):
        where = tuple(np.argwhere(np.atleast_1d(lost))[0])
        bad = np.atleast_1d(array)[where]
        what = ("is not a whole number" if array.dtype.kind == "f" and target.kind != "f"
                and np.isfinite(bad) and np.floor(bad) != bad else f"is out of range for {target}")
        raise ValueError(f"{dataset} row {where[0]}: value {bad.item()!r} {what}")
    column = np.ascontiguousarray(converted).view()
    column.flags.writeable = False  # shared with the core once validated: no edits in place
    return column


def _canonical(group: Any, name: str, layout: dict[str, tuple[Any, int]]) -> None:
    for field_name, (dtype, ndim) in layout.items():
        value = as_column(getattr(group, field_name), dtype, ndim, f"/{name}/{field_name}")
        setattr(group, field_name, value)


@dataclass
class Detector:
    """Panels of the detector, one row per panel (mm; unit axes)."""

    origin: np.ndarray
    fast_axis: np.ndarray
    slow_axis: np.ndarray
    pixel_size: np.ndarray
    size: np.ndarray
    read_noise: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.read_noise is None:
            self.read_noise = np.zeros(len(np.atleast_1d(self.pixel_size)))
        _canonical(self, "detector", {"origin": (np.float64, 2), "fast_axis": (np.float64, 2),
                                      "slow_axis": (np.float64, 2), "pixel_size": (np.float64, 1),
                                      "size": (np.int32, 2), "read_noise": (np.float64, 1)})

    @classmethod
    def single_panel(cls, distance: float, beam_centre: tuple[float, float], pixel_size: float,
                     size: tuple[int, int], read_noise: float = 0.0) -> "Detector":
        """One panel perpendicular to the beam at ``distance`` mm, beam centre in pixels."""
        bx, by = beam_centre
        return cls(origin=[[-bx * pixel_size, -by * pixel_size, distance]],
                   fast_axis=[[1.0, 0.0, 0.0]], slow_axis=[[0.0, 1.0, 0.0]],
                   pixel_size=[pixel_size], size=[list(size)], read_noise=[read_noise])


@dataclass
class Images:
    """One row per still image: wavelength (Å), bandwidth, A = U·B (Å⁻¹), polarisation."""

    wavelength: np.ndarray
    bandwidth: np.ndarray
    A_matrix: np.ndarray
    polarization_fraction: np.ndarray
    crystal_id: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.crystal_id is None:
            self.crystal_id = np.zeros(len(np.atleast_1d(self.wavelength)), dtype=np.int32)
        _canonical(self, "images", {"wavelength": (np.float64, 1), "bandwidth": (np.float64, 1),
                                    "A_matrix": (np.float64, 3),
                                    "polarization_fraction": (np.float64, 1),
                                    "crystal_id": (np.int32, 1)})

    def __len__(self) -> int:
        return len(self.wavelength)


@dataclass
class Reflections:
    """One row per reflection, sorted by ``image_id``."""

    image_id: np.ndarray
    miller_index: np.ndarray
    intensity_ref: np.ndarray
    bbox: np.ndarray
    pixel_offset: np.ndarray
    panel: np.ndarray | None = None
    background: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(np.atleast_1d(self.image_id))
        if self.panel is None:
            self.panel = np.zeros(n, dtype=np.int16)
        if self.background is None:
            self.background = np.full(n, np.nan, dtype=np.float32)
        _canonical(self, "reflections", {"image_id": (np.int32, 1), "miller_index": (np.int32, 2),
                                         "intensity_ref": (np.float64, 1), "bbox": (np.int32, 2),
                                         "pixel_offset": (np.int64, 1), "panel": (np.int16, 1),
                                         "background": (np.float32, 1)})
        if self.miller_index.size == 0:
            self.miller_index = self.miller_index.reshape(0, 3)
        if self.bbox.size == 0:
            self.bbox = self.bbox.reshape(0, 4)

    def __len__(self) -> int:
        return len(self.image_id)

    @property
    def shoebox_shape(self) -> np.ndarray:
        """(ny, nx) of every shoebox, [M, 2]."""
        return np.stack([self.bbox[:, 3] - self.bbox[:, 2], self.bbox[:, 1] - self.bbox[:, 0]], 1)


@dataclass
class Pixels:
    """All shoeboxes' pixels, concatenated (photons; mask 1 = valid)."""

    counts: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        _canonical(self, "pixels", {"counts": (np.float32, 1), "mask": (np.uint8, 1)})


@dataclass
class ShoeboxSet:
    """Shoeboxes of many still images (struct of arrays).

    Parameters
    ----------
    detector, images, reflections, pixels
        The four groups of the input format.
    source : str, optional
        Where the set came from (a file name), used in error messages.
    truth : dict, optional
        Ground truth written by the simulator (``/truth``); never used by refinement.
    space_group : str, optional
        Hermann–Mauguin symbol (root attribute ``space_group``), for merging and export.
    unit_cell : ndarray [6], optional
        a, b, c (Å), α, β, γ (°) (root attribute ``unit_cell``), for merging and export.
    """

    detector: Detector
    images: Images
    reflections: Reflections
    pixels: Pixels
    source: str | None = None
    truth: dict | None = None
    space_group: str | None = None
    unit_cell: np.ndarray | None = None
    _core_set: Any = field(default=None, repr=False, compare=False)
    _core_arrays: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, kind in (("detector", Detector), ("images", Images),
                           ("reflections", Reflections), ("pixels", Pixels)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"ShoeboxSet.{name} must be a {kind.__name__}, "
                                f"not {type(getattr(self, name)).__name__}")

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_reflections(self) -> int:
        return len(self.reflections)

    @property
    def crystal_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(crystal ids present, index of each image's crystal in that list)."""
        ids, index = np.unique(self.images.crystal_id, return_inverse=True)
        return ids.astype(np.int32), index.astype(np.int32).reshape(-1)

    def core(self) -> "_core.CoreShoeboxSet":
        """The validated zero-copy view the C++ core works on (built once, then cached; built
        again when an array of the set was replaced).

        The set's arrays are read-only views, so that nothing changes what was validated;
        assign new arrays (or build a new set) to change a set.

        Raises
        ------
        ValueError
            Naming the source, the dataset and the first bad row.
        """
        if self._core_set is not None and self._same_arrays():
            return self._core_set
        where = self.source or "<in-memory ShoeboxSet>"
        d, im, r, p = self.detector, self.images, self.reflections, self.pixels
        try:
            for group in (d, im, r, p):  # an array assigned since is made canonical (or refused)
                group.__post_init__()
            core_set = _core.CoreShoeboxSet(
                d.origin, d.fast_axis, d.slow_axis, d.pixel_size, d.size, d.read_noise,
                im.wavelength, im.bandwidth, im.A_matrix, im.polarization_fraction,
                self.crystal_index[1], r.image_id, r.panel, r.miller_index,
                r.intensity_ref, r.bbox, r.pixel_offset, r.background, p.counts, p.mask)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{where}: {error}") from None
        self._core_set = core_set
        self._core_arrays = self._arrays()
        return self._core_set

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(value for group in (self.detector, self.images, self.reflections, self.pixels)
                     for value in group_fields(group).values())

    def _same_arrays(self) -> bool:
        arrays = self._arrays()
        return len(arrays) == len(self._core_arrays) and all(
            a is b for a, b in zip(arrays, self._core_arrays))

    def image_start(self) -> np.ndarray:
        """First reflection row of every image, and the end, [N + 1]."""
        return np.asarray(self.core().image_start())

    def shoebox(self, row: int, masked: float = np.nan) -> np.ndarray:
        """Counts of reflection ``row`` as a 2-D array (y, x); invalid pixels set to ``masked``."""
        x0, x1, y0, y1 = self.reflections.bbox[row]
        start = self.reflections.pixel_offset[row]
        n = (x1 - x0) * (y1 - y0)
        counts = self.pixels.counts[start:start + n].astype(np.float64)
        counts[self.pixels.mask[start:start + n] == 0] = masked
        return counts.reshape(y1 - y0, x1 - x0)


def group_fields(group: Any) -> dict[str, np.ndarray]:
    """The arrays of one group (Detector, Images, Reflections, Pixels) by dataset name."""
    return {f.name: getattr(group, f.name) for f in fields(group)}
