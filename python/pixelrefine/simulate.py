"""A still-image simulator from ground truth, written from ``conventions.md`` alone.

Nothing here is shared with the C++ core: the prediction (q = A·h, ε_r, ŝ_h, the ray's
panel and c_pred), the polarisation, the partiality width R0_eff, the tangential basis
(e1, e2), the tangential offset ε_t and the pixel's area on the Ewald sphere a are computed
again in NumPy from the conventions' formulas, so a mistake in the refinement's forward model
does not cancel against the same mistake in its test data. ``pixelrefine._core`` is neither
imported nor called (the returned ``ShoeboxSet`` is only built, never validated, here).

The truth it simulates is richer than the refinement's model: the spot is a Gaussian core with
a per-image 2×2 tensor Σ in the (e1, e2) basis, optionally with a heavy tail of the same shape,
centred at an offset δ from the prediction, integrated over each pixel on sub-pixel points; the
background is a plane per shoebox; the counts are Poisson photons plus Gaussian read noise,
times a gain, with zingers and neighbouring spots left unmasked; the stored orientation may be
off by a known rotation. ``REGIMES`` names keyword sets for the regimes the tests cover.

Truth (``ShoeboxSet.truth``, written to ``/truth`` by ``io.write_shoeboxes``):

- ``images``: G, B, R1 = det(Σ)^¼, R1_tensor (Σ11, Σ12, Σ22) [N, 3], background (the level b),
  rotation ω [N, 3] (true A' = R(ω)·A, A the stored matrix), gain.
- ``global``: crystal_id, R0, eta (one row per crystal).
- ``reflections``: intensity_true, intensity_model (J_true, photons), partiality, polarization,
  excitation_error (true), d, xyzcal (c_pred from the stored A), xyz_true (the spot's true
  centre), background_mean, background_gradient [M, 2] (photons/pixel per pixel),
  fraction_in_box, has_neighbour, neighbour_intensity, n_zingers, intensity_crb and
  intensity_crb_known_background (Cramér–Rao bounds on J, photons, as standard deviations).
- ``pixels`` (``keep_expected=True``): expected (μ_p), profile (the main spot's
  pixel-integrated profile P_p) and background (Bg_p), all in photons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .shoeboxes import Detector, Images, Pixels, Reflections, ShoeboxSet

__all__ = ["simulate", "REGIMES", "tiled_detector", "predict", "Prediction", "rotation_matrix",
           "reciprocal_basis", "random_rotation", "miller_indices", "spot_tensor",
           "LYSOZYME_CELL", "MASKED_COUNTS"]

#: Tetragonal hen egg-white lysozyme-like cell (Å, degrees).
LYSOZYME_CELL = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)

#: Value a dead or gap pixel holds in the simulated counts (ignored: mask = 0).
MASKED_COUNTS = 65535.0

#: Sub-pixel points evaluated at once (bounds the memory of the profile integration).
POINTS_PER_CHUNK = 1 << 18


# --------------------------------------------------------------------------------------------
# Crystal and detector
# --------------------------------------------------------------------------------------------

def reciprocal_basis(cell: Sequence[float]) -> np.ndarray:
    """B (Å⁻¹): columns a*, b*, c* in a Cartesian frame with a along x (Busing & Levy)."""
    a, b, c, alpha, beta, gamma = cell
    al, be, ga = np.radians([alpha, beta, gamma])
    ax = np.array([a, 0.0, 0.0])
    bx = np.array([b * np.cos(ga), b * np.sin(ga), 0.0])
    cx = c * np.cos(be)
    cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    cz = np.sqrt(c * c - cx * cx - cy * cy)
    direct = np.column_stack([ax, bx, np.array([cx, cy, cz])])
    return np.linalg.inv(direct).T


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix uniform on SO(3) (from a uniform unit quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def rotation_matrix(omega: np.ndarray) -> np.ndarray:
    """Rodrigues rotation R(ω) by |ω| about ω/|ω| (radians), for one ω [3] or many [N, 3]."""
    omega = np.asarray(omega, float)
    angle = np.linalg.norm(omega, axis=-1)[..., None, None]
    k = omega / np.where(angle[..., 0, 0] > 0, angle[..., 0, 0], 1.0)[..., None]
    K = np.zeros(omega.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K[..., 1, 0], K[..., 2, 0], K[..., 2, 1] = k[..., 2], -k[..., 1], k[..., 0]
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * (K @ K)


def miller_indices(B: np.ndarray, d_min: float) -> np.ndarray:
    """All h ≠ 0 with d = 1/|B h| ≥ d_min, [K, 3] int32."""
    direct_lengths = np.linalg.norm(np.linalg.inv(B).T, axis=0)  # |a|, |b|, |c|
    limits = np.floor(direct_lengths / d_min).astype(int)
    grids = np.meshgrid(*[np.arange(-n, n + 1) for n in limits], indexing="ij")
    hkl = np.stack([g.reshape(-1) for g in grids], axis=1)
    q = hkl @ B.T
    keep = (np.einsum("ij,ij->i", q, q) <= 1.0 / d_min**2) & np.any(hkl != 0, axis=1)
    return hkl[keep].astype(np.int32)


def tiled_detector(n_fast: int = 2, n_slow: int = 2, module_size: tuple[int, int] = (512, 512),
                   gap: tuple[int, int] = (16, 16), *, pixel_size: float = 0.075,
                   distance: float = 60.0, beam_centre: tuple[float, float] | None = None,
                   read_noise: float = 0.0) -> Detector:
    """Coplanar modules perpendicular to the beam, one panel each, with gaps between them.

    Parameters
    ----------
    n_fast, n_slow : int
        Modules along lab x (fast) and lab y (slow); panel k = n_fast·row + column.
    module_size : (int, int)
        Pixels of one module (nx fast, ny slow).
    gap : (int, int)
        Width of the gaps between modules, in pixels (along fast, along slow).
    pixel_size, distance, read_noise
        mm, mm (crystal to the detector plane), photons.
    beam_centre : (float, float), optional
        Where the direct beam meets the plane, in pixel coordinates of a virtual panel that
        spans all modules and gaps from the corner of module 0; default its middle (the beam
        then falls into the central gap for an even number of modules).

    Returns
    -------
    Detector
        ``n_fast·n_slow`` panels; the default is a 2×2 detector of 512×512 modules, 16-px gaps.
    """
    nx, ny = module_size
    total = (n_fast * nx + (n_fast - 1) * gap[0], n_slow * ny + (n_slow - 1) * gap[1])
    bx, by = beam_centre if beam_centre is not None else (total[0] / 2, total[1] / 2)
    origins = [[(column * (nx + gap[0]) - bx) * pixel_size, (row * (ny + gap[1]) - by) * pixel_size,
                distance] for row in range(n_slow) for column in range(n_fast)]
    count = len(origins)
    return Detector(origin=origins, fast_axis=[[1.0, 0.0, 0.0]] * count,
                    slow_axis=[[0.0, 1.0, 0.0]] * count, pixel_size=[pixel_size] * count,
                    size=[[nx, ny]] * count, read_noise=[read_noise] * count)


def _panel_normals(detector: Detector) -> np.ndarray:
    """Unit normal n̂ = unit(f × e) of every panel, [P, 3]."""
    n = np.cross(detector.fast_axis, detector.slow_axis)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def panel_position(detector: Detector, panel: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Lab position r = o + x·p·f + y·p·e (mm) of continuous pixel coordinates, [K, 3]."""
    p = detector.pixel_size[panel][:, None]
    return (detector.origin[panel] + xy[:, :1] * p * detector.fast_axis[panel]
            + xy[:, 1:2] * p * detector.slow_axis[panel])


def ray_on_panel(detector: Detector, panel: np.ndarray, direction: np.ndarray):
    """Where rays from the crystal along ``direction`` meet the plane of ``panel``.

    Returns
    -------
    xy : ndarray [K, 2]
        Continuous pixel coordinates (solved with the Gram matrix of (f, e), exact for unit axes
        that are not quite orthogonal).
    distance : ndarray [K]
        Ray parameter t (mm) with r = t·direction; ≤ 0 or not finite: the plane is not ahead.
    """
    origin, fast, slow = detector.origin[panel], detector.fast_axis[panel], detector.slow_axis[panel]
    normal = _panel_normals(detector)[panel]
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = np.einsum("ij,ij->i", origin, normal) / np.einsum("ij,ij->i", direction, normal)
    offset = distance[:, None] * direction - origin
    along_fast = np.einsum("ij,ij->i", offset, fast)
    along_slow = np.einsum("ij,ij->i", offset, slow)
    cosine = np.einsum("ij,ij->i", fast, slow)
    scale = (1.0 - cosine**2) * detector.pixel_size[panel]
    xy = np.stack([(along_fast - cosine * along_slow) / scale,
                   (along_slow - cosine * along_fast) / scale], axis=1)
    return xy, distance


def _inside(detector: Detector, panel: np.ndarray, xy: np.ndarray, distance: np.ndarray) -> np.ndarray:
    size = detector.size[panel]
    with np.errstate(invalid="ignore"):
        return (np.isfinite(distance) & (distance > 0) & (xy[:, 0] >= 0) & (xy[:, 0] < size[:, 0])
                & (xy[:, 1] >= 0) & (xy[:, 1] < size[:, 1]))


def ray_panel(detector: Detector, direction: np.ndarray):
    """The panel each ray hits inside (the nearest if several), its c_pred and distance.

    Returns
    -------
    panel : ndarray [K] int (−1: no panel hit), xy : ndarray [K, 2], distance : ndarray [K]
    """
    K = len(direction)
    panel = np.full(K, -1)
    xy = np.full((K, 2), np.nan)
    distance = np.full(K, np.inf)
    for k in range(len(detector.pixel_size)):
        xy_k, t_k = ray_on_panel(detector, np.full(K, k), direction)
        closer = _inside(detector, np.full(K, k), xy_k, t_k) & (t_k < distance)
        panel[closer], xy[closer], distance[closer] = k, xy_k[closer], t_k[closer]
    distance[panel < 0] = np.nan
    return panel, xy, distance


# --------------------------------------------------------------------------------------------
# Prediction (conventions.md, "Crystal and prediction")
# --------------------------------------------------------------------------------------------

@dataclass
class Prediction:
    """What the geometry predicts for K reflections of one image (conventions.md)."""

    d: np.ndarray                  #: resolution 1/|q| (Å)
    excitation_error: np.ndarray   #: ε_r = |s0 + q| − 1/λ (Å⁻¹)
    s_hat: np.ndarray              #: ŝ_h = (s0 + q)/|s0 + q|, [K, 3]
    e1: np.ndarray                 #: unit(ẑ × ŝ_h), [K, 3]
    e2: np.ndarray                 #: ŝ_h × e1, [K, 3]
    polarization: np.ndarray       #: 1 − f ŝx² − (1 − f) ŝy²


def predict(A: np.ndarray, hkl: np.ndarray, wavelength: float,
            polarization_fraction: float) -> Prediction:
    """Predict reflections h of one still with orientation matrix A (q = A·h).

    Where the ray along ŝ_h meets the detector is ``ray_panel`` / ``ray_on_panel``.
    """
    q = np.asarray(hkl, float) @ np.asarray(A, float).T
    s = q + np.array([0.0, 0.0, 1.0 / wavelength])
    s_norm = np.linalg.norm(s, axis=1)
    s_hat = s / s_norm[:, None]
    e1, e2 = tangential_basis(s_hat)
    f = polarization_fraction
    return Prediction(d=1.0 / np.linalg.norm(q, axis=1), excitation_error=s_norm - 1.0 / wavelength,
                      s_hat=s_hat, e1=e1, e2=e2,
                      polarization=1.0 - f * s_hat[:, 0]**2 - (1.0 - f) * s_hat[:, 1]**2)


def tangential_basis(s_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """e1 = unit(ẑ × ŝ) (azimuthal) and e2 = ŝ × e1 (in the scattering plane), [K, 3] each."""
    rho = np.hypot(s_hat[:, 0], s_hat[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.stack([-s_hat[:, 1] / rho, s_hat[:, 0] / rho, np.zeros(len(s_hat))], axis=1)
    return e1, np.cross(s_hat, e1)


def partiality_width_sq(R0: np.ndarray, eta: np.ndarray, d: np.ndarray, wavelength: float,
                        bandwidth: float) -> np.ndarray:
    """R0_eff² = R0² + 2 (η cosθ/d)² + (bλ)²/(2 d⁴), with sinθ = λ/(2d)."""
    cos_theta_sq = 1.0 - (wavelength / (2.0 * d))**2
    return R0**2 + 2.0 * eta**2 * cos_theta_sq / d**2 + (bandwidth * wavelength)**2 / (2.0 * d**4)


def tangential_offset(position: np.ndarray, e1: np.ndarray, e2: np.ndarray,
                      wavelength: np.ndarray | float) -> np.ndarray:
    """ε_t = ((s(r) − ŝ_h/λ)·e1, (s(r) − ŝ_h/λ)·e2) of lab points r, with s(r) = r̂/λ, [K, 2].

    ŝ_h·e1 = ŝ_h·e2 = 0, so ε_t = (r̂·e1, r̂·e2)/λ.
    """
    r_hat = position / np.linalg.norm(position, axis=1, keepdims=True)
    return np.stack([np.einsum("ij,ij->i", r_hat, e1), np.einsum("ij,ij->i", r_hat, e2)],
                    axis=1) / np.reshape(wavelength, (-1, 1))


def pixel_area(detector: Detector, panel: np.ndarray, position: np.ndarray,
               wavelength: np.ndarray | float) -> np.ndarray:
    """a = p²·|n̂·r̂|/(|r|²·λ²): a pixel's area on the Ewald sphere (Å⁻²) at lab points r."""
    r = np.linalg.norm(position, axis=1)
    cosine = np.abs(np.einsum("ij,ij->i", position, _panel_normals(detector)[panel])) / r
    return detector.pixel_size[panel]**2 * cosine / (r**2 * np.asarray(wavelength)**2)


# --------------------------------------------------------------------------------------------
# The spot: an area-normalised density on the tangent plane, integrated over pixels
# --------------------------------------------------------------------------------------------

def spot_tensor(R1: np.ndarray, anisotropy: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Σ = R1²·Rot(φ)·diag(k, 1/k)·Rot(φ)ᵀ as (Σ11, Σ12, Σ22), [N, 3] (Å⁻²).

    k = ``anisotropy`` is the ratio of the long to the short axis (standard deviations), φ the
    angle of the long axis from e1; det Σ = R1⁴, so R1 = det(Σ)^¼ for every k.
    """
    c, s = np.cos(angle), np.sin(angle)
    long_, short = R1**2 * anisotropy, R1**2 / anisotropy
    return np.stack([long_ * c * c + short * s * s, (long_ - short) * c * s,
                     long_ * s * s + short * c * c], axis=-1)


def _inverse_tensor(tensor: np.ndarray) -> np.ndarray:
    """M = Σ⁻¹ as (M11, M12, M22)."""
    det = tensor[..., 0] * tensor[..., 2] - tensor[..., 1]**2
    return np.stack([tensor[..., 2], -tensor[..., 1], tensor[..., 0]], axis=-1) / det[..., None]


@dataclass
class SpotShape:
    """The profile family shared by every spot of a set: Gaussian core plus optional tail.

    f = (1 − t)·f_G + t·f_T, f_G = sqrt(det M)/π·exp(−εᵀMε),
    f_T = (β − 1)/π·sqrt(det M_T)·(1 + εᵀM_Tε)^(−β), M_T = M/tail_scale².
    """

    tail_fraction: float = 0.0
    tail_scale: float = 3.0
    tail_beta: float = 2.0

    def density(self, quadratic: np.ndarray, sqrt_det: np.ndarray) -> np.ndarray:
        """f at points with εᵀMε = ``quadratic``, sqrt(det M) = ``sqrt_det`` (broadcast), Å²."""
        core = np.exp(-quadratic)
        core *= sqrt_det / np.pi
        if self.tail_fraction <= 0:
            return core
        scaled = quadratic / self.tail_scale**2
        scaled += 1.0
        tail = scaled**-2 if self.tail_beta == 2.0 else scaled**-self.tail_beta
        tail *= (self.tail_beta - 1.0) / np.pi * sqrt_det / self.tail_scale**2
        return (1.0 - self.tail_fraction) * core + self.tail_fraction * tail


@dataclass
class BoxPixels:
    """Every shoebox pixel: its reflection row and integer panel indices (row-major boxes)."""

    row: np.ndarray
    x: np.ndarray
    y: np.ndarray
    start: np.ndarray  #: first pixel of every box, [M]

    @classmethod
    def from_bbox(cls, bbox: np.ndarray) -> "BoxPixels":
        width, height = bbox[:, 1] - bbox[:, 0], bbox[:, 3] - bbox[:, 2]
        area = width * height
        start = np.concatenate([[0], np.cumsum(area)[:-1]]).astype(np.int64)
        row = np.repeat(np.arange(len(bbox)), area)
        local = np.arange(int(area.sum())) - start[row]
        return cls(row=row, x=bbox[row, 0] + local % width[row],
                   y=bbox[row, 2] + local // width[row], start=start)

    def box_sum(self, values: np.ndarray) -> np.ndarray:
        """Σ of a per-pixel array over every box, [M] (boxes are never empty)."""
        return np.add.reduceat(values, self.start) if len(self.start) else np.zeros(0)


def _profile_coefficients(detector: Detector, panel: np.ndarray, wavelength: np.ndarray,
                          e1: np.ndarray, e2: np.ndarray, centre: np.ndarray,
                          inverse_tensor: np.ndarray) -> np.ndarray:
    """Per-reflection constants of ε_t and a as functions of continuous pixel coordinates.

    On a panel r(x, y) = o + x p f + y p e, so r·e_i is linear in (x, y), |r|² quadratic and
    r·n̂ = o·n̂ constant: ε_t,i = (r·e_i)/(|r| λ) − δ_i, a = p²|o·n̂|/(|r|³ λ²).
    Columns: r·e1 (3), r·e2 (3), |r|² (6), p²|o·n̂|/λ², 1/λ, δ (2), M (3), sqrt(det M).
    """
    o, f, e = detector.origin[panel], detector.fast_axis[panel], detector.slow_axis[panel]
    p = detector.pixel_size[panel]
    dot = lambda u, v: np.einsum("ij,ij->i", u, v)  # noqa: E731
    normal = _panel_normals(detector)[panel]
    det_M = inverse_tensor[:, 0] * inverse_tensor[:, 2] - inverse_tensor[:, 1]**2
    return np.column_stack([
        dot(o, e1), p * dot(f, e1), p * dot(e, e1), dot(o, e2), p * dot(f, e2), p * dot(e, e2),
        dot(o, o), 2 * p * dot(o, f), 2 * p * dot(o, e), p**2 * dot(f, f), p**2 * dot(e, e),
        2 * p**2 * dot(f, e), p**2 * np.abs(dot(o, normal)) / wavelength**2, 1.0 / wavelength,
        centre, inverse_tensor, np.sqrt(det_M)])


def _profile_chunk(c: np.ndarray, x: np.ndarray, y: np.ndarray, shape: SpotShape) -> np.ndarray:
    """Mean of a·f over the sub-pixel points (x, y) [n, S²] of n pixels with constants c [n, 21]."""
    col = lambda k: c[:, k:k + 1]  # noqa: E731
    radius_sq = col(6) + x * (col(7) + col(9) * x + col(11) * y) + y * (col(8) + col(10) * y)
    inverse_radius = 1.0 / np.sqrt(radius_sq)
    scale = inverse_radius * col(13)
    eps1 = (col(0) + col(1) * x + col(2) * y) * scale - col(14)
    eps2 = (col(3) + col(4) * x + col(5) * y) * scale - col(15)
    quadratic = eps1 * (col(16) * eps1 + 2.0 * col(17) * eps2) + col(18) * eps2 * eps2
    density = shape.density(quadratic, col(19))
    density *= col(12) * inverse_radius**3  # × a
    return density.mean(axis=1)


def pixel_integrated_profile(detector: Detector, pixels: BoxPixels, panel: np.ndarray,
                             wavelength: np.ndarray, e1: np.ndarray, e2: np.ndarray,
                             centre: np.ndarray, inverse_tensor: np.ndarray, shape: SpotShape,
                             subsample: int = 8) -> np.ndarray:
    """P_p = mean over subsample² points of a·f(ε_t − δ) for every box pixel, [T].

    Parameters
    ----------
    detector, pixels
        The panels and the box pixels (``BoxPixels.from_bbox``).
    panel, wavelength, e1, e2, centre, inverse_tensor
        Per reflection [M]: its panel, λ (Å), tangential basis at the spot's prediction, the
        spot centre δ (Å⁻¹, in that basis) and M = Σ⁻¹ as (M11, M12, M22).
    shape : SpotShape
        Core and tail.
    subsample : int
        Points per pixel along each axis, at (i + (k + ½)/S, j + (l + ½)/S).
    """
    coefficients = _profile_coefficients(detector, panel, wavelength, e1, e2, centre, inverse_tensor)
    offsets = (np.arange(subsample) + 0.5) / subsample
    sub_x = np.tile(offsets, subsample)[None, :]
    sub_y = np.repeat(offsets, subsample)[None, :]
    profile = np.empty(len(pixels.row))
    step = max(1, POINTS_PER_CHUNK // subsample**2)
    for start in range(0, len(profile), step):
        part = slice(start, start + step)
        profile[part] = _profile_chunk(coefficients[pixels.row[part]],
                                       pixels.x[part, None] + sub_x, pixels.y[part, None] + sub_y,
                                       shape)
    return profile


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

#: A Pilatus 2M-like detector: 3 × 8 modules of 487 × 195 pixels of 172 µm with 7-px gaps
#: along fast and 17-px gaps along slow (1475 × 1679 px), 200 mm from the crystal, the beam
#: near the middle of module row 3/4 (one panel per module, 24 panels).
PILATUS_LIKE_DETECTOR = dict(n_fast=3, n_slow=8, module_size=(487, 195), gap=(7, 17),
                             pixel_size=0.172, distance=200.0, beam_centre=(740.3, 830.6))

#: Keyword sets of ``simulate`` naming the regimes the tests cover:
#: ``simulate(n_images, seed=..., **REGIMES[name])``. Geometry is the default (60 mm, 75 µm,
#: λ 1.3 Å, σ_spot ≈ 0.74 px for R1 = 1e-3 Å⁻¹) unless a preset says otherwise.
REGIMES: dict[str, dict[str, Any]] = {
    # Today's defaults: 7×7 boxes, isotropic σ ≈ 0.7 px, Bg ≈ 1 (0.5–1.5), 5 % reference error.
    "comfortable": {},
    # Spots filling 7×7 boxes: R1 1–2e-3 Å⁻¹ at 100 mm, 75 µm, λ = 1 Å (σ ≈ 0.95–1.9 px),
    # Bg 0.5–5, reference 10 % off; R0 = 2.5e-3 Å⁻¹ gives ≈ 1,000 reflections per image.
    "filling": dict(distance=100.0, wavelength=1.0, R0=2.5e-3, R1=1.5e-3, R1_spread=1 / 3,
                    background=2.75, background_range=(0.5 / 2.75, 5.0 / 2.75),
                    reference_error=0.10, max_reflections=1000, shoebox_size=7),
    # Weak spots: mean J ≈ 300 photons on Bg 5–50 per pixel, 9×9 boxes, reference 30 % off.
    "weak": dict(intensity_scale=1600.0, background=27.5, background_range=(5 / 27.5, 50 / 27.5),
                 shoebox_size=9, reference_error=0.30),
    # Wide spots: σ 1.5–2.5 px in 11×11 boxes, planar backgrounds (gradient sd 3 % of b per px).
    "wide": dict(spot_sigma_px=(1.5, 2.5), shoebox_size=11, background_gradient=0.03),
    # Small boxes: 5×5 with σ 0.5–0.8 px.
    "small_box": dict(spot_sigma_px=(0.5, 0.8), shoebox_size=5),
    # High background: Bg 100–300 photons per pixel (spots as today).
    "high_background": dict(background=200.0, background_range=(0.5, 1.5)),
    # An integrating detector: read noise 3 photons, counts = 1.7 × photons.
    "read_noise": dict(read_noise=3.0, gain=1.7),
    # Heavy tails: 30 % of each spot in a Lorentzian-like tail (scale 3, β = 2), 11×11 boxes.
    "tails": dict(tail_fraction=0.3, tail_scale=3.0, tail_beta=2.0, shoebox_size=11),
    # Anisotropic spots: 2–4 px long, 1–2 px wide (axis ratio 2, random angle), 15×15 boxes.
    "anisotropic": dict(spot_sigma_px=(2**0.5, 2 * 2**0.5), anisotropy=2.0,
                        anisotropy_angle=None, shoebox_size=15),
    # Spot centres off the prediction by 1.2 px rms per axis (median 1.4 px), 9×9 boxes.
    "offset": dict(centre_offset_px=1.2, shoebox_size=9),
    # A stored orientation 0.5 mrad rms per axis off the true one (c_pred wrong by ~1 px).
    "misoriented": dict(misorientation=5e-4, shoebox_size=9),
    # Unmasked defects: zingers in 0.2 % of pixels, a neighbour's spot in 20 % of 11×11 boxes.
    "zingers_neighbours": dict(zinger_fraction=2e-3, neighbour_fraction=0.2, shoebox_size=11),
    # Three crystals of one form with R0 = 4, 6, 8e-4 Å⁻¹ (images round-robin).
    "crystals": dict(n_crystals=3, R0=(4e-4, 6e-4, 8e-4)),
    # A 2×2 tiled detector with 16-px gaps (the beam in the gap cross).
    "tiled": dict(detector=tiled_detector(), gap_columns=None),
    # Pilatus-like (a synchrotron, photon-counting pixel array detector with large boxes):
    # PILATUS_LIKE_DETECTOR (24 modules of 172 µm at 200 mm, the middle of 150–250 mm), λ 1 Å,
    # bandwidth 1e-4; boxes 13–47 px a side, median 38 (half uniform in 13–38, half in 38–47);
    # spots σ 1–2 px (geometric mean of the axes) with axis ratio 1.2–2, 20 % tail (scale 3,
    # β 2); centre offsets 1 px rms per axis (median 1.18 px); neighbours in 15 % of boxes;
    # read noise 1 photon and gain 1.3 (not Pilatus physics: there to cross those code paths);
    # R0 = 1e-3 Å⁻¹; at most 300 reflections per image.
    "pilatus_like": dict(detector=tiled_detector(**PILATUS_LIKE_DETECTOR), gap_columns=None,
                         wavelength=1.0, bandwidth=1e-4, R0=1e-3, shoebox_size=(13, 38, 47),
                         spot_sigma_px=(1.0, 2.0), anisotropy=(1.2, 2.0), anisotropy_angle=None,
                         tail_fraction=0.2, centre_offset_px=1.0, neighbour_fraction=0.15,
                         read_noise=1.0, gain=1.3, background=2.0, dead_pixel_fraction=1e-3,
                         max_reflections=300),
    # No reference at all (every I_ref NaN).
    "no_reference": dict(reference_missing=1.0),
    # A reference on another scale (× 1e4) with absolute noise sd 1e5: ≈ 1 % negative I_ref.
    "reference_scale": dict(reference_scale=1e4, reference_noise=1e5),
}
