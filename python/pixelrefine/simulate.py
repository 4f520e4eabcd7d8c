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
off by a known rotation. Reflections are picked as an upstream predictor would pick them, from
the stored A; a reference intensity is one per h, shared by all its observations. ``REGIMES``
names keyword sets for the regimes the tests cover.

Truth (``ShoeboxSet.truth``, written to ``/truth`` by ``io.write_shoeboxes``):

- ``images``: G, B, R1 = det(Σ)^¼, R1_tensor (Σ11, Σ12, Σ22) [N, 3], background (the level b),
  rotation ω [N, 3] (true A' = R(ω)·A, A the stored matrix), gain.
- ``global``: crystal_id, R0, eta (one row per crystal).
- ``reflections``: intensity_true, intensity_model (J_true, photons), partiality, polarization
  and excitation_error (all three from the true A'), d, xyzcal (c_pred from the stored A),
  xyz_true (the spot's true centre), background_mean, background_gradient [M, 2]
  (photons/pixel per pixel), fraction_in_box, has_neighbour, neighbour_intensity (the
  neighbour's J, photons), n_zingers (valid pixels hit), intensity_crb and
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
POINTS_PER_CHUNK = 1 << 16


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


def predict(A: np.ndarray, hkl: np.ndarray, wavelength: float | np.ndarray,
            polarization_fraction: float | np.ndarray) -> Prediction:
    """Predict reflections h [K, 3] with orientation matrix A [3, 3] or one per h [K, 3, 3].

    q = A·h, s = s0 + q with s0 = (0, 0, 1/λ); λ and f scalar or [K]. Where the ray along
    ŝ_h meets the detector is ``ray_panel`` / ``ray_on_panel``.
    """
    A, hkl = np.asarray(A, float), np.asarray(hkl, float)
    q = np.einsum("kij,kj->ki", A, hkl) if A.ndim == 3 else hkl @ A.T
    s = q.copy()
    s[:, 2] += 1.0 / np.asarray(wavelength, float)
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

    def __post_init__(self) -> None:
        if not (0.0 <= self.tail_fraction <= 1.0 and self.tail_scale > 0 and self.tail_beta > 1):
            raise ValueError("need 0 <= tail_fraction <= 1, tail_scale > 0 and tail_beta > 1 "
                             "(the tail is normalisable only for beta > 1)")

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
    Columns: 0–2 r·e1 = c0 + c1 x + c2 y; 3–5 r·e2 likewise; 6–11 |r|² = c6 + c7 x + c8 y
    + c9 x² + c10 y² + c11 xy; 12 p²|o·n̂|/λ²; 13 1/λ; 14–15 δ; 16–18 M; 19 sqrt(det M).
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


def _profile_chunk(c: np.ndarray, x: np.ndarray, y: np.ndarray, weights: np.ndarray,
                   shape: SpotShape) -> np.ndarray:
    """Quadrature of a·f over the sub-pixel points (x, y) [n, S²] of n pixels with constants
    c [n, 20] and the points' weights [S²] (summing to 1)."""
    col = lambda k: c[:, k:k + 1]  # noqa: E731
    radius_sq = col(6) + x * (col(7) + col(9) * x + col(11) * y) + y * (col(8) + col(10) * y)
    inverse_radius = 1.0 / np.sqrt(radius_sq)
    scale = inverse_radius * col(13)
    eps1 = (col(0) + col(1) * x + col(2) * y) * scale - col(14)
    eps2 = (col(3) + col(4) * x + col(5) * y) * scale - col(15)
    quadratic = eps1 * (col(16) * eps1 + 2.0 * col(17) * eps2) + col(18) * eps2 * eps2
    density = shape.density(quadratic, col(19))
    density *= col(12) * inverse_radius**3  # × a
    return density @ weights


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
        Gauss–Legendre points per pixel along each axis (a product rule over the pixel; exact
        for polynomials of degree 2S − 1 per axis, so the pixel's own width is integrated, not
        approximated: the midpoint rule's comb of S points would leave a variance deficit of
        1/(12 S²) px² per axis, a bias of −0.1 % in R1 for spots of 0.8 px at S = 8).
    """
    coefficients = _profile_coefficients(detector, panel, wavelength, e1, e2, centre, inverse_tensor)
    nodes, node_weights = np.polynomial.legendre.leggauss(subsample)
    offsets = 0.5 * (nodes + 1.0)
    sub_x = np.tile(offsets, subsample)[None, :]
    sub_y = np.repeat(offsets, subsample)[None, :]
    weights = np.outer(node_weights, node_weights).reshape(-1) / 4.0
    profile = np.empty(len(pixels.row))
    step = max(1, POINTS_PER_CHUNK // subsample**2)
    for start in range(0, len(profile), step):
        part = slice(start, start + step)
        profile[part] = _profile_chunk(coefficients[pixels.row[part]],
                                       pixels.x[part, None] + sub_x, pixels.y[part, None] + sub_y,
                                       weights, shape)
    return profile


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

#: A Pilatus 2M-like detector: 3 × 8 modules of 487 × 195 pixels of 172 µm with 7-px gaps
#: along fast and 17-px gaps along slow (1475 × 1679 px), 200 mm from the crystal, the beam on
#: the middle module column, in module row 3 of 0–7 (one panel per module, 24 panels).
PILATUS_LIKE_DETECTOR = dict(n_fast=3, n_slow=8, module_size=(487, 195), gap=(7, 17),
                             pixel_size=0.172, distance=200.0, beam_centre=(740.3, 745.6))

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
    "weak": dict(intensity_scale=1250.0, background=27.5, background_range=(5 / 27.5, 50 / 27.5),
                 shoebox_size=9, reference_error=0.30),
    # Wide spots: σ 1.5–2.5 px in 11×11 boxes, planar backgrounds (gradient sd 3 % of b per px).
    "wide": dict(spot_sigma_px=(1.5, 2.5), shoebox_size=11, background_gradient=0.03),
    # Small boxes: 5×5 with σ 0.5–0.8 px.
    "small_box": dict(spot_sigma_px=(0.5, 0.8), shoebox_size=5),
    # High background: Bg 100–300 photons per pixel (spots as today).
    "high_background": dict(background=200.0, background_range=(0.5, 1.5)),
    # Photon counting far below a count per pixel: Bg 0.05–0.15 photons per pixel, J ≈ 24
    # photons on average (median 10).
    "low_background": dict(intensity_scale=100.0, background=0.1, background_range=(0.5, 1.5)),
    # Very strong spots: J ≈ 10⁵ photons on average (median 4·10⁴, the strongest 2·10⁶) on
    # Bg 0.5–1.5.
    "very_strong": dict(intensity_scale=4e5),
    # An integrating detector: read noise 3 photons, counts = 1.7 × photons.
    "read_noise": dict(read_noise=3.0, gain=1.7),
    # Heavy tails: 30 % of each spot in a Lorentzian-like tail (scale 3, β = 2), 11×11 boxes.
    "tails": dict(tail_fraction=0.3, tail_scale=3.0, tail_beta=2.0, shoebox_size=11),
    # Heavy tails that overflow their box: spots σ 1–2 px with 20 % in a tail of scale 3 (its
    # sd 3–6 px) in 15×15 boxes, as the smaller boxes DIALS cuts on Pilatus stills.
    "tails_overflow": dict(tail_fraction=0.2, tail_scale=3.0, tail_beta=2.0,
                           spot_sigma_px=(1.0, 2.0), shoebox_size=15),
    # Anisotropic spots: 2–4 px long, 1–2 px wide (axis ratio 2, random angle), 15×15 boxes.
    "anisotropic": dict(spot_sigma_px=(2**0.5, 2 * 2**0.5), anisotropy=2.0,
                        anisotropy_angle=None, shoebox_size=15),
    # Spot centres off the prediction by 1.2 px rms per axis (median 1.4 px), 9×9 boxes.
    "offset": dict(centre_offset_px=1.2, shoebox_size=9),
    # A stored orientation 1 mrad rms per axis off the true one: c_pred off by 0.35 px median
    # (0.9 px at the 90th percentile), and the true partialities differ from the predicted ones.
    "misoriented": dict(misorientation=1e-3, shoebox_size=9),
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
    # A reference on another scale (× 1e4) with absolute noise sd 2e5: ≈ 1.3 % negative I_ref.
    "reference_scale": dict(reference_scale=1e4, reference_noise=2e5),
}


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------

def simulate(n_images: int = 20, *, seed: int = 0,
             cell: Sequence[float] = LYSOZYME_CELL, d_min: float = 2.0,
             wavelength: float = 1.3, bandwidth: float = 1e-3, polarization_fraction: float = 0.99,
             distance: float = 60.0, pixel_size: float = 0.075,
             panel_size: tuple[int, int] = (1030, 1064),
             beam_centre: tuple[float, float] = (515.3, 532.7), detector: Detector | None = None,
             read_noise: float = 0.0, gain: float = 1.0,
             n_crystals: int = 1, R0: float | Sequence[float] = 5e-4, eta: float | Sequence[float] = 0.0,
             R1: float = 1.0e-3, R1_spread: float = 0.15,
             spot_sigma_px: float | tuple[float, float] | None = None,
             anisotropy: float | tuple[float, float] = 1.0, anisotropy_angle: float | None = None,
             tail_fraction: float = 0.0, tail_scale: float = 3.0, tail_beta: float = 2.0,
             centre_offset_px: float = 0.0, misorientation: float = 0.0,
             G_range: tuple[float, float] = (0.6, 1.4), B_sigma: float = 4.0,
             background: float = 1.0, background_range: tuple[float, float] = (0.5, 1.5),
             background_gradient: float = 0.0,
             intensity_scale: float = 2000.0, wilson_B: float = 20.0,
             reference_error: float = 0.05, reference_scale: float = 1.0,
             reference_noise: float = 0.0, reference_outlier_fraction: float = 0.0,
             reference_missing: float = 0.0,
             min_partiality: float = 0.1, max_reflections: int | None = None,
             shoebox_size: int | tuple[int, ...] = 7, box_jitter: int = 0, subsample: int = 8,
             dead_pixel_fraction: float = 0.005, gap_columns: tuple[int, int] | None = (700, 702),
             zinger_fraction: float = 0.0, zinger_counts: tuple[float, float] = (200.0, 2000.0),
             neighbour_fraction: float = 0.0,
             orientations: np.ndarray | None = None, truth_override: dict | None = None,
             keep_expected: bool = False) -> ShoeboxSet:
    """Simulate still images of one crystal form and cut shoeboxes around the predictions.

    Expected photons of box pixel p: μ_p = max(0, Bg_p + J_true·P_p + J_n·P_n,p), with
    J_true = G·B_term·p·pol·I_true (all from the true orientation A' = R(ω)·A), P_p the
    main spot's profile integrated over the pixel and P_n the neighbour's, if any. Counts are
    gain × (Poisson(μ_p) + N(0, read_noise²)) plus zingers. Ranges "(lo, hi)" are drawn
    uniformly, per image for image quantities and per reflection for reflection ones.

    Parameters
    ----------
    n_images : int
        Number of stills, each with its own orientation and true G, B, R1, background, ω.
    seed : int
        Seed of every random draw (the same seed gives the same set).
    cell, d_min
        Unit cell (Å, °) and resolution limit (Å); intensities are P1, one per h.
    wavelength, bandwidth, polarization_fraction
        Beam (Å, rms σλ/λ, fraction along lab x), the same for every image.
    distance, pixel_size, panel_size, beam_centre
        The default detector: one flat panel perpendicular to the beam (mm, mm, pixels
        (nx, ny), pixels).
    detector : Detector, optional
        Any detector (multi-panel, tilted) instead; ``tiled_detector`` makes tiled ones. A
        reflection belongs to the panel its predicted ray hits inside.
    read_noise, gain
        Gaussian read noise (photons rms; when ``detector`` is given and this is 0, the
        detector's own per-panel read_noise is used) and the counts per photon. The file's
        /detector/read_noise holds the read noise in photons; with gain ≠ 1 the counts are not
        photons (a mis-calibrated detector, on purpose).
    n_crystals, R0, eta
        Crystals (images assigned round-robin, /images/crystal_id), and the true partiality
        width (Å⁻¹) and mosaic spread (rad) of each: a scalar or one value per crystal.
    R1, R1_spread
        Mean true profile width R1 = det(Σ)^¼ (Å⁻¹) and its relative spread (uniform ±)
        across images.
    spot_sigma_px : float or (float, float), optional
        Instead of R1: the Gaussian core's per-axis sd in pixels (geometric mean of the two
        axes), drawn per image; R1 = √2·σ·√ā with ā the image's median pixel area on the
        Ewald sphere at the spots (per-axis variance of f_G is R1²/2, a pixel is √a wide).
    anisotropy, anisotropy_angle
        Ratio k of the long to the short axis of Σ (1 = isotropic; scalar or range per image)
        and the long axis's angle from e1 (rad; None = uniform per image).
    tail_fraction, tail_scale, tail_beta
        Heavy tail sharing the core's shape: f = (1 − t)·f_G + t·f_T, f_T with M_T = M/scale²
        and exponent −β (see ``SpotShape``).
    centre_offset_px : float
        rms offset per axis (pixels) of each spot's true centre from its prediction, drawn in
        the (e1, e2) basis and converted to Å⁻¹ with √a.
    misorientation : float
        rms per axis (rad) of the image's rotation ω: spots follow A' = R(ω)·A, the file
        stores A.
    G_range, B_sigma
        True G uniform in ``G_range``; true B normal with sd ``B_sigma`` (Å²).
    background, background_range, background_gradient
        The image's background level b = background × U(background_range) photons/pixel; per
        box the plane Bg_p = b + g_x (x_p − x_c) + g_y (y_p − y_c) about the box centre, with
        g ~ N(0, (background_gradient·b)²) per pixel.
    intensity_scale, wilson_B
        Wilson statistics: I_true ~ Exponential(mean = intensity_scale·exp(−wilson_B/(2d²))).
    reference_error, reference_scale, reference_noise
        I_ref = reference_scale·I_true·exp(σz − σ²/2) + N(0, reference_noise²), σ =
        ``reference_error``; written as drawn (negative values included). One per h.
    reference_outlier_fraction, reference_missing
        Fraction of h whose reference is an independent Wilson draw (× reference_scale), and
        fraction with I_ref = NaN (1.0: no reference at all).
    min_partiality, max_reflections
        Reflections whose predicted partiality (stored A, the crystal's R0 and η) is at least
        ``min_partiality`` and whose ray hits a panel inside; at most ``max_reflections`` per
        image (a random subset), if given.
    shoebox_size : int, (lo, hi) or (lo, median, hi)
        Square box side (pixels), fixed, uniform per reflection, or half uniform in
        [lo, median] and half in [median, hi]; placed around ⌊c_pred⌋, clipped by the panel.
    box_jitter : int
        Random integer shift of each box of up to this many pixels per axis (at most side//2,
        so the predicted pixel stays inside).
    subsample : int
        Each pixel integrates the profile on subsample × subsample points.
    dead_pixel_fraction, gap_columns
        Random dead pixels of each panel (the same in every image), and a band of panel columns
        [x0, x1) on every panel; both masked (counts set to ``MASKED_COUNTS``).
    zinger_fraction, zinger_counts
        Fraction of box pixels that get + U(zinger_counts) counts, unmasked.
    neighbour_fraction : float
        Fraction of reflections whose box holds a second spot of the same profile at 0.3–0.45
        of the box side from the box centre, with the J of a random reflection of the image.
    orientations : ndarray, optional
        [n_images, 3, 3] U matrices to use instead of random ones.
    truth_override : dict, optional
        Per-image truth to use instead of random draws: "G", "B", "R1", "background" ([N] or
        scalar), "R1_tensor" ([N, 3] or [3]), "rotation" ([N, 3] or [3]).
    keep_expected : bool
        Also keep per-pixel μ_p ("expected"), P_p ("profile") and Bg_p ("background") in
        ``truth["pixels"]`` (photons; to redraw the noise without re-simulating).

    Returns
    -------
    ShoeboxSet
        With ``truth`` as described in the module docstring and the parameters as JSON in
        ``truth["@parameters"]``.
    """
    parameters = _jsonable({k: v for k, v in locals().items()
                            if k not in ("orientations", "truth_override", "keep_expected")})
    rng = np.random.default_rng(seed)
    detector = _simulation_detector(detector, distance, beam_centre, pixel_size, panel_size, read_noise)
    crystals = {"crystal_id": np.arange(n_crystals, dtype=np.int32),
                "R0": _per_crystal(R0, n_crystals, "R0"), "eta": _per_crystal(eta, n_crystals, "eta")}
    form = _crystal_form(cell, d_min, intensity_scale, wilson_B, rng)
    form["intensity_ref"] = _reference_intensities(
        form, rng, reference_error=reference_error, reference_scale=reference_scale,
        reference_noise=reference_noise, outlier_fraction=reference_outlier_fraction,
        missing=reference_missing)
    U = np.asarray(orientations, float) if orientations is not None else \
        np.stack([random_rotation(rng) for _ in range(n_images)])
    images = Images(wavelength=np.full(n_images, wavelength), bandwidth=np.full(n_images, bandwidth),
                    A_matrix=U @ form["B"], polarization_fraction=np.full(n_images, polarization_fraction),
                    crystal_id=np.arange(n_images) % n_crystals)
    truth_images = _image_truth(n_images, rng, G_range=G_range, B_sigma=B_sigma, background=background,
                                background_range=background_range, misorientation=misorientation)
    widths = _width_draws(n_images, rng, R1=R1, R1_spread=R1_spread, spot_sigma_px=spot_sigma_px,
                          anisotropy=anisotropy, anisotropy_angle=anisotropy_angle)
    selected = _select_reflections(form, images, detector, crystals, min_partiality,
                                   max_reflections, rng)
    override = _override(truth_images, truth_override, n_images)
    spots = _true_spots(selected, form, images, detector, crystals, truth_images["rotation"])
    truth_images.update(_spot_tensors(widths, spots, selected["image_id"], n_images, override))
    spots.update(_spot_centres(detector, selected["panel"], spots, centre_offset_px, rng))
    spots["inverse_tensor"] = _inverse_tensor(truth_images["R1_tensor"])[selected["image_id"]]
    bbox = _boxes(detector, selected, shoebox_size, box_jitter, rng)
    pixels = BoxPixels.from_bbox(bbox)
    model = _expected_counts(detector, pixels, bbox, selected, spots, form, truth_images,
                             SpotShape(tail_fraction, tail_scale, tail_beta), subsample=subsample,
                             background_gradient=background_gradient,
                             neighbour_fraction=neighbour_fraction, rng=rng)
    read_noise_px = detector.read_noise[selected["panel"]][pixels.row]
    counts = _noisy_counts(model["expected"], read_noise_px, gain, rng)
    mask = _mask(detector, pixels, selected["panel"], dead_pixel_fraction, gap_columns, rng)
    zingers = _zingers(len(counts), zinger_fraction, zinger_counts, rng)
    counts += zingers
    counts[mask == 0] = MASKED_COUNTS

    reflections = Reflections(image_id=selected["image_id"], miller_index=form["hkl"][selected["index"]],
                              intensity_ref=form["intensity_ref"][selected["index"]], bbox=bbox,
                              pixel_offset=pixels.start, panel=selected["panel"])
    shoeboxes = ShoeboxSet(detector, images, reflections, Pixels(counts.astype(np.float32), mask),
                           space_group="P 1", unit_cell=np.asarray(cell, float))  # one I per h
    truth_images["gain"] = np.full(n_images, float(gain))
    shoeboxes.truth = {
        "images": truth_images, "global": crystals,
        "reflections": _reflection_truth(pixels, selected, form, spots, model, zingers, mask,
                                         read_noise_px, with_gradient=background_gradient > 0),
        "@parameters": json.dumps(parameters)}
    if keep_expected:
        shoeboxes.truth["pixels"] = {"expected": model["expected"], "profile": model["profile"],
                                     "background": model["background"]}
    return shoeboxes


# ---- set-up ---------------------------------------------------------------------------------

def _simulation_detector(detector: Detector | None, distance: float, beam_centre, pixel_size: float,
                         panel_size, read_noise: float) -> Detector:
    if detector is None:
        return Detector.single_panel(distance, beam_centre, pixel_size, panel_size, read_noise)
    noise = np.full(len(detector.pixel_size), read_noise) if read_noise > 0 else detector.read_noise
    return Detector(origin=detector.origin.copy(), fast_axis=detector.fast_axis.copy(),
                    slow_axis=detector.slow_axis.copy(), pixel_size=detector.pixel_size.copy(),
                    size=detector.size.copy(), read_noise=np.array(noise, float))


def _per_crystal(value, n_crystals: int, name: str) -> np.ndarray:
    values = np.atleast_1d(np.asarray(value, float))
    if values.size == 1:
        return np.full(n_crystals, values[0])
    if values.size != n_crystals:
        raise ValueError(f"{name}: give one value or one per crystal ({n_crystals}), not {values.size}")
    return values.copy()


def _crystal_form(cell, d_min: float, intensity_scale: float, wilson_B: float,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every h to d_min with its d and a Wilson-distributed I_true (P1, one per h)."""
    B = reciprocal_basis(cell)
    hkl = miller_indices(B, d_min)
    d = 1.0 / np.linalg.norm(hkl @ B.T, axis=1)
    mean = intensity_scale * np.exp(-wilson_B / (2 * d**2))
    return {"B": B, "hkl": hkl, "d": d, "wilson_mean": mean,
            "intensity": mean * rng.exponential(size=len(hkl))}


def _reference_intensities(form: dict, rng: np.random.Generator, *, reference_error: float,
                           reference_scale: float, reference_noise: float,
                           outlier_fraction: float, missing: float) -> np.ndarray:
    """I_ref per h: scaled lognormal error, absolute noise, outliers, missing (NaN)."""
    K = len(form["hkl"])
    sigma = reference_error
    reference = reference_scale * form["intensity"] * np.exp(sigma * rng.normal(size=K) - sigma**2 / 2)
    reference += reference_noise * rng.normal(size=K)
    outlier = rng.random(K) < outlier_fraction
    reference[outlier] = reference_scale * form["wilson_mean"][outlier] * rng.exponential(size=outlier.sum())
    reference[rng.random(K) < missing] = np.nan
    return reference


def _draw(value, n: int, rng: np.random.Generator) -> np.ndarray:
    """A scalar broadcast to n, or n uniform draws from a (lo, hi) range."""
    if np.ndim(value) == 0:
        return np.full(n, float(value))
    lo, hi = value
    return rng.uniform(lo, hi, n)


def _image_truth(n_images: int, rng: np.random.Generator, *, G_range, B_sigma: float,
                 background: float, background_range, misorientation: float) -> dict[str, np.ndarray]:
    """Per-image G, B, background level b and misorientation ω."""
    return {"G": rng.uniform(*G_range, n_images), "B": rng.normal(0.0, B_sigma, n_images),
            "background": background * rng.uniform(*background_range, n_images),
            "rotation": rng.normal(0.0, 1.0, (n_images, 3)) * misorientation + 0.0}  # no −0


def _width_draws(n_images: int, rng: np.random.Generator, *, R1: float, R1_spread: float,
                 spot_sigma_px, anisotropy, anisotropy_angle) -> dict[str, np.ndarray | None]:
    """Per-image profile width (R1, or σ in pixels), axis ratio and angle of the long axis."""
    return {"R1": R1 * rng.uniform(1 - R1_spread, 1 + R1_spread, n_images),
            "sigma_px": None if spot_sigma_px is None else _draw(spot_sigma_px, n_images, rng),
            "anisotropy": _draw(anisotropy, n_images, rng),
            "angle": rng.uniform(0.0, np.pi, n_images) if anisotropy_angle is None
            else np.full(n_images, float(anisotropy_angle))}


def _override(truth_images: dict, override: dict | None, n_images: int) -> dict[str, np.ndarray]:
    """Apply ``truth_override`` to G, B, background, rotation; return the R1 / R1_tensor part."""
    shapes = {"G": (), "B": (), "background": (), "R1": (), "rotation": (3,), "R1_tensor": (3,)}
    unknown = set(override or {}) - set(shapes)
    if unknown:
        raise ValueError(f"truth_override: unknown keys {sorted(unknown)}; allowed {sorted(shapes)}")
    arrays = {k: np.broadcast_to(np.asarray(v, float), (n_images,) + shapes[k]).copy()
              for k, v in (override or {}).items()}
    truth_images.update({k: v for k, v in arrays.items() if k not in ("R1", "R1_tensor")})
    return {k: v for k, v in arrays.items() if k in ("R1", "R1_tensor")}


# ---- reflections and their true geometry ----------------------------------------------------

def _select_reflections(form: dict, images: Images, detector: Detector, crystals: dict,
                        min_partiality: float, max_reflections: int | None,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What an upstream predictor would pick from the stored A: p ≥ min and on a panel.

    A first pass over every h needs only |q|² and q_z: |s0 + q|² = |q|² + 2 q_z/λ + 1/λ².
    """
    chosen = {"image_id": [], "index": [], "panel": [], "xyzcal": []}
    hkl = form["hkl"].astype(float)
    for i in range(len(images)):
        crystal, wavelength = images.crystal_id[i], images.wavelength[i]
        q = hkl @ images.A_matrix[i].T
        q_sq = np.einsum("ij,ij->i", q, q)
        excitation_error = np.sqrt(q_sq + 2 * q[:, 2] / wavelength + wavelength**-2) - 1 / wavelength
        width_sq = partiality_width_sq(crystals["R0"][crystal], crystals["eta"][crystal],
                                       1 / np.sqrt(q_sq), wavelength, images.bandwidth[i])
        near = np.flatnonzero(np.exp(-excitation_error**2 / width_sq) >= min_partiality)
        pred = predict(images.A_matrix[i], hkl[near], wavelength, images.polarization_fraction[i])
        panel, xy, _ = ray_panel(detector, pred.s_hat)
        keep = np.flatnonzero(panel >= 0)
        if max_reflections is not None and len(keep) > max_reflections:
            keep = np.sort(rng.choice(keep, max_reflections, replace=False))
        chosen["image_id"].append(np.full(len(keep), i, np.int32))
        chosen["index"].append(near[keep])
        chosen["panel"].append(panel[keep])
        chosen["xyzcal"].append(xy[keep])
    return {k: np.concatenate(v) if v else np.zeros((0, 2) if k == "xyzcal" else 0, int)
            for k, v in chosen.items()}


def _true_spots(selected: dict, form: dict, images: Images, detector: Detector, crystals: dict,
                rotation: np.ndarray) -> dict[str, np.ndarray]:
    """Prediction with the true A' = R(ω)·A: ε_r, p, pol, ŝ_h, e1, e2 and a at the prediction."""
    image = selected["image_id"]
    true_A = rotation_matrix(rotation) @ images.A_matrix
    wavelength = images.wavelength[image]
    pred = predict(true_A[image], form["hkl"][selected["index"]], wavelength,
                   images.polarization_fraction[image])
    crystal = images.crystal_id[image]
    width_sq = partiality_width_sq(crystals["R0"][crystal], crystals["eta"][crystal], pred.d,
                                   wavelength, images.bandwidth[image])
    _, distance = ray_on_panel(detector, selected["panel"], pred.s_hat)
    area = pixel_area(detector, selected["panel"], pred.s_hat * distance[:, None], wavelength)
    return {"d": pred.d, "excitation_error": pred.excitation_error,
            "partiality": np.exp(-pred.excitation_error**2 / width_sq),
            "polarization": pred.polarization, "s_hat": pred.s_hat, "e1": pred.e1, "e2": pred.e2,
            "wavelength": wavelength, "pixel_area": area}


def _spot_tensors(widths: dict, spots: dict, image_id: np.ndarray, n_images: int,
                  override: dict) -> dict[str, np.ndarray]:
    """Per-image R1 and Σ (from R1 or σ in pixels, the axis ratio and angle; or overridden)."""
    R1 = widths["R1"]
    if widths["sigma_px"] is not None:
        # An image without reflections takes the set's median area (NaN for an empty set).
        fallback = np.median(spots["pixel_area"]) if len(image_id) else np.nan
        median_area = np.array([np.median(spots["pixel_area"][image_id == i]) if np.any(image_id == i)
                                else fallback for i in range(n_images)])
        R1 = np.sqrt(2.0 * median_area) * widths["sigma_px"]
    R1 = override.get("R1", R1)
    tensor = spot_tensor(R1, widths["anisotropy"], widths["angle"])
    if "R1_tensor" in override:
        tensor = override["R1_tensor"]
        det = tensor[:, 0] * tensor[:, 2] - tensor[:, 1]**2
        R1 = det**0.25
    return {"R1": R1, "R1_tensor": tensor}


def _spot_centres(detector: Detector, panel: np.ndarray, spots: dict, centre_offset_px: float,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """δ (Å⁻¹, in (e1, e2)): N(0, centre_offset_px²) pixels per axis × √a; and xyz_true.

    xyz_true is the pixel where ε_t = δ: the ray along √(1 − λ²|δ|²)·ŝ_h + λ(δ1 e1 + δ2 e2).
    """
    offset_px = rng.normal(0.0, 1.0, (len(spots["d"]), 2)) * centre_offset_px
    centre = offset_px * np.sqrt(spots["pixel_area"])[:, None]
    delta = centre * spots["wavelength"][:, None]
    along = np.sqrt(1.0 - np.sum(delta**2, axis=1))[:, None]
    direction = along * spots["s_hat"] + delta[:, :1] * spots["e1"] + delta[:, 1:] * spots["e2"]
    xy, _ = ray_on_panel(detector, panel, direction)
    return {"centre": centre, "xyz_true": xy}


def _box_sides(shoebox_size, M: int, rng: np.random.Generator) -> np.ndarray:
    sizes = np.atleast_1d(np.asarray(shoebox_size, int))
    if sizes.size == 1:
        sides = np.full(M, sizes[0])
    elif sizes.size == 2:
        sides = rng.integers(sizes[0], sizes[1] + 1, M)
    elif sizes.size == 3:
        lo, median, hi = sizes
        upper = rng.random(M) < 0.5
        sides = np.where(upper, rng.integers(median, hi + 1, M), rng.integers(lo, median + 1, M))
    else:
        raise ValueError("shoebox_size: an int, (lo, hi) or (lo, median, hi)")
    if np.any(sides < 1):
        raise ValueError("shoebox_size must be >= 1")
    return sides


def _boxes(detector: Detector, selected: dict, shoebox_size, box_jitter: int,
           rng: np.random.Generator) -> np.ndarray:
    """Square boxes around ⌊c_pred⌋, optionally shifted, clipped by the panel: bbox [M, 4]."""
    M = len(selected["image_id"])
    side = _box_sides(shoebox_size, M, rng)
    half = side // 2
    limit = np.minimum(box_jitter, half)[:, None]
    shift = np.clip(rng.integers(-box_jitter, box_jitter + 1, (M, 2)), -limit, limit)
    corner = np.floor(selected["xyzcal"]).astype(np.int64) - half[:, None] + shift
    size = detector.size[selected["panel"]]
    x0, y0 = np.clip(corner[:, 0], 0, size[:, 0]), np.clip(corner[:, 1], 0, size[:, 1])
    x1 = np.clip(corner[:, 0] + side, 0, size[:, 0])
    y1 = np.clip(corner[:, 1] + side, 0, size[:, 1])
    return np.stack([x0, x1, y0, y1], axis=1).astype(np.int32)


# ---- counts ---------------------------------------------------------------------------------

def _spot_profile(detector: Detector, pixels: BoxPixels, panel: np.ndarray, spots: dict,
                  shape: SpotShape, subsample: int, centre: np.ndarray | None = None) -> np.ndarray:
    return pixel_integrated_profile(detector, pixels, panel, spots["wavelength"], spots["e1"],
                                    spots["e2"], spots["centre"] if centre is None else centre,
                                    spots["inverse_tensor"], shape, subsample)


def _expected_counts(detector: Detector, pixels: BoxPixels, bbox: np.ndarray, selected: dict,
                     spots: dict, form: dict, truth_images: dict, shape: SpotShape, *,
                     subsample: int, background_gradient: float, neighbour_fraction: float,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """μ_p = max(0, Bg_p + J_true·P_p + J_n·P_n,p), J_true = G·B_term·p·pol·I_true."""
    image = selected["image_id"]
    profile = _spot_profile(detector, pixels, selected["panel"], spots, shape, subsample)
    J_true = (truth_images["G"][image] * np.exp(-truth_images["B"][image] / (4 * spots["d"]**2))
              * spots["partiality"] * spots["polarization"] * form["intensity"][selected["index"]])
    plane = _background_plane(pixels, bbox, truth_images["background"][image],
                              background_gradient, rng)
    neighbour = _neighbours(detector, pixels, bbox, selected, spots, J_true, shape, subsample,
                            neighbour_fraction, rng)
    expected = np.maximum(plane["background"] + J_true[pixels.row] * profile + neighbour["counts"], 0.0)
    return {"expected": expected, "profile": profile, "J_true": J_true,
            "has_neighbour": neighbour["has_neighbour"],
            "neighbour_intensity": neighbour["intensity"], **plane}


def _reflection_truth(pixels: BoxPixels, selected: dict, form: dict, spots: dict, model: dict,
                      zingers: np.ndarray, mask: np.ndarray, read_noise_px: np.ndarray,
                      with_gradient: bool) -> dict[str, np.ndarray]:
    area = pixels.box_sum(np.ones(len(pixels.row)))
    return {
        "intensity_true": form["intensity"][selected["index"]], "intensity_model": model["J_true"],
        "partiality": spots["partiality"], "polarization": spots["polarization"],
        "excitation_error": spots["excitation_error"], "d": spots["d"],
        "xyzcal": selected["xyzcal"], "xyz_true": spots["xyz_true"],
        "background_mean": pixels.box_sum(model["background"]) / area,
        "background_gradient": model["gradient"], "fraction_in_box": pixels.box_sum(model["profile"]),
        "has_neighbour": model["has_neighbour"], "neighbour_intensity": model["neighbour_intensity"],
        "n_zingers": pixels.box_sum(((zingers > 0) & (mask == 1)).astype(float)).astype(np.int32),
        **_intensity_crb(pixels, model, mask, read_noise_px**2, with_gradient)}


def _background_plane(pixels: BoxPixels, bbox: np.ndarray, level: np.ndarray,
                      background_gradient: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Bg_p = b + g_x (x_p − x_c) + g_y (y_p − y_c), (x_c, y_c) the box centre, pixel centres."""
    gradient = rng.normal(0.0, 1.0, (len(bbox), 2)) * (background_gradient * level)[:, None]
    dx = pixels.x + 0.5 - 0.5 * (bbox[pixels.row, 0] + bbox[pixels.row, 1])
    dy = pixels.y + 0.5 - 0.5 * (bbox[pixels.row, 2] + bbox[pixels.row, 3])
    values = level[pixels.row] + gradient[pixels.row, 0] * dx + gradient[pixels.row, 1] * dy
    return {"background": values, "gradient": gradient, "dx": dx, "dy": dy}


def _neighbours(detector: Detector, pixels: BoxPixels, bbox: np.ndarray, selected: dict,
                spots: dict, J_true: np.ndarray, shape: SpotShape, subsample: int,
                fraction: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A second spot in a fraction of the boxes, 0.3–0.45 of the side from the box centre."""
    M = len(bbox)
    has = rng.random(M) < fraction
    rows = np.flatnonzero(has)
    side = np.maximum(bbox[rows, 1] - bbox[rows, 0], bbox[rows, 3] - bbox[rows, 2])
    radius = rng.uniform(0.3, 0.45, len(rows)) * side
    direction = rng.uniform(0.0, 2 * np.pi, len(rows))
    centre_px = np.stack([0.5 * (bbox[rows, 0] + bbox[rows, 1]) + radius * np.cos(direction),
                          0.5 * (bbox[rows, 2] + bbox[rows, 3]) + radius * np.sin(direction)], 1)
    image = selected["image_id"]
    first = np.searchsorted(image, image[rows], "left")
    count = np.searchsorted(image, image[rows], "right") - first
    intensity = np.zeros(M)
    intensity[rows] = J_true[first + np.floor(rng.random(len(rows)) * count).astype(int)]
    extra = np.zeros(len(pixels.row))
    if len(rows):
        position = panel_position(detector, selected["panel"][rows], centre_px)
        centre = tangential_offset(position, spots["e1"][rows], spots["e2"][rows],
                                   spots["wavelength"][rows])
        sub = BoxPixels.from_bbox(bbox[rows])
        sub_spots = {k: v[rows] for k, v in spots.items()}
        profile = _spot_profile(detector, sub, selected["panel"][rows], sub_spots, shape,
                                subsample, centre)
        in_sub = np.repeat(has, pixels.box_sum(np.ones(len(pixels.row))).astype(int))
        extra[in_sub] = intensity[rows][sub.row] * profile
    return {"counts": extra, "has_neighbour": has, "intensity": intensity}


def _noisy_counts(expected: np.ndarray, read_noise: np.ndarray, gain: float,
                  rng: np.random.Generator) -> np.ndarray:
    """gain × (Poisson(μ) + N(0, read_noise²))."""
    photons = rng.poisson(expected).astype(np.float64)
    photons += rng.normal(0.0, 1.0, len(expected)) * read_noise
    return gain * photons


def _zingers(n: int, fraction: float, counts: tuple[float, float],
             rng: np.random.Generator) -> np.ndarray:
    hit = rng.random(n) < fraction
    extra = np.zeros(n)
    extra[hit] = rng.uniform(*counts, hit.sum())
    return extra


def _mask(detector: Detector, pixels: BoxPixels, panel: np.ndarray, dead_pixel_fraction: float,
          gap_columns: tuple[int, int] | None, rng: np.random.Generator) -> np.ndarray:
    """1 = valid; 0 for the panels' dead pixels (one map per panel) and the gap columns."""
    pixel_panel = panel[pixels.row]
    mask = np.ones(len(pixels.row), np.uint8)
    if dead_pixel_fraction > 0:
        n_pixels = detector.size[:, 0].astype(np.int64) * detector.size[:, 1]
        first = np.concatenate([[0], np.cumsum(n_pixels)[:-1]])
        dead = rng.random(int(n_pixels.sum())) < dead_pixel_fraction
        flat = first[pixel_panel] + pixels.y * detector.size[pixel_panel, 0] + pixels.x
        mask[dead[flat]] = 0
    if gap_columns is not None:
        mask[(pixels.x >= gap_columns[0]) & (pixels.x < gap_columns[1])] = 0
    return mask


def _intensity_crb(pixels: BoxPixels, model: dict, mask: np.ndarray, read_noise_sq: np.ndarray,
                   with_gradient: bool) -> dict[str, np.ndarray]:
    """Cramér–Rao bounds (sd, photons) on J with the background as a nuisance, and known.

    Fisher information I = Σ_valid (∂μ/∂θ)(∂μ/∂θ)ᵀ/(μ + σ_read²), θ = (J, b[, g_x, g_y]),
    ∂μ/∂J = P (the main spot), ∂μ/∂b = 1, ∂μ/∂g = (x_p − x_c, y_p − y_c).
    """
    profile = model["profile"]
    weight = mask / np.maximum(model["expected"] + read_noise_sq, 1e-12)
    columns = [profile, np.ones_like(profile)] + ([model["dx"], model["dy"]] if with_gradient else [])
    k = len(columns)
    fisher = np.empty((len(pixels.start), k, k))
    for a in range(k):
        for b in range(a, k):
            fisher[:, a, b] = fisher[:, b, a] = pixels.box_sum(weight * columns[a] * columns[b])
    with np.errstate(divide="ignore", invalid="ignore"):
        known = 1.0 / np.sqrt(fisher[:, 0, 0])
        cross = fisher[:, 0, 1:]
        schur = fisher[:, 0, 0] - np.einsum("mi,mij,mj->m", cross, np.linalg.pinv(fisher[:, 1:, 1:]), cross)
        nuisance = np.where(schur > 0, 1.0 / np.sqrt(np.where(schur > 0, schur, 1.0)), np.nan)
    known[~np.isfinite(known)] = np.nan
    return {"intensity_crb": nuisance, "intensity_crb_known_background": known}


def _jsonable(value: Any) -> Any:
    """Parameters as JSON-ready values (a Detector as its arrays)."""
    if isinstance(value, Detector):
        return {k: np.asarray(getattr(value, k)).tolist()
                for k in ("origin", "fast_axis", "slow_axis", "pixel_size", "size", "read_noise")}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
