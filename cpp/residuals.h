// Cost functors. They only assemble residuals from the physics (physics.h, profile.h) and the
// per-reflection statistics (reflection_model.h), which are held fixed within a solve. Each
// functor keeps a pointer to state that outlives the problem.
#pragma once

#include "reflection_model.h"

namespace pixelrefine {

// Term 1, intensity, geometry held (parameters G, B):
//   r1 = (J - G exp(-B/(4 d^2)) p pol I_ref) / sigma_1,  sigma_1^2 = k^2 var J + (f J_model)^2.
// J is the reflection's fitted amplitude at the held shape: dr1/dphi = 0, the shape leaves it.
struct IntensityResidual {
  explicit IntensityResidual(const ReflectionFit* rf) : rf(rf) {}
  template <typename T>
  bool operator()(const T* G, const T* B, T* residual) const {
    if (!rf->use_intensity) {
      residual[0] = T(0.0);
      return true;
    }
    const T j_model = intensity_model(G[0], B[0], rf->pred.d, rf->partiality,
                                      rf->pred.polarization, rf->intensity_ref);
    residual[0] = (T(rf->stats.J) - j_model) / rf->sigma_intensity;
    return true;
  }
  const ReflectionFit* rf;
};

// Term 1 with the crystal rotation live (parameters G, B, omega): the excitation error and the
// polarisation follow omega to first order about the held rotation omega_0 (d does not: a
// rotation keeps |q|), re-linearised at every pass, exact at the solution:
//   eps_r = eps_0 + g_eps (omega - omega_0),  pol = pol_0 + g_pol (omega - omega_0),
//   r1 = (J - G B_term exp(-eps_r^2 / R0_eff^2) pol I_ref) / sigma_1.
struct IntensityGeometryResidual {
  explicit IntensityGeometryResidual(const ReflectionFit* rf) : rf(rf) {}
  template <typename T>
  bool operator()(const T* G, const T* B, const T* omega, T* residual) const {
    if (!rf->use_intensity) {
      residual[0] = T(0.0);
      return true;
    }
    const GeometryLinearisation& l = rf->geometry_linearisation;
    T eps(l.excitation_error), pol(l.polarization);
    for (int a = 0; a < 3; ++a) {
      eps += l.excitation_error_gradient[a] * (omega[a] - l.omega[a]);
      pol += l.polarization_gradient[a] * (omega[a] - l.omega[a]);
    }
    const T p = partiality(eps, T(l.width_sq));
    const T j_model = intensity_model(G[0], B[0], rf->pred.d, p, pol, rf->intensity_ref);
    residual[0] = (T(rf->stats.J) - j_model) / rf->sigma_intensity;
    return true;
  }
  const ReflectionFit* rf;
};

// Term 2, shape (parameters dphi = phi - phi_held, the image's refined shape parameters):
//   r2 = (z - J U dphi) / k,
// the whitened shape scores z = L^-1 T against their expectation given J; T is linear in the
// counts (the weighted residuals of the local fit projected on dP/dphi), E[T] = J F dphi to
// first order, F = L L' = U'U (METHODS.md §I.8). G, B and the geometry are not arguments:
// dr2/dG = 0 exactly.
template <int N>
struct ShapeResidual {
  ShapeResidual(const ReflectionFit* rf, const double* error_scale) : rf(rf), error_scale(error_scale) {}
  template <typename T>
  bool operator()(const T* dphi, T* residual) const {
    const ReflectionStatistics& st = rf->stats;
    for (int r = 0; r < N; ++r) {
      if (!rf->use_shape) {
        residual[r] = T(0.0);
        continue;
      }
      T expected(0.0);
      for (int c = r; c < N; ++c) expected += st.shape_U[r * kMaxShape + c] * dphi[c];
      residual[r] = (T(st.shape_z[r]) - st.J * expected) / *error_scale;
    }
    return true;
  }
  const ReflectionFit* rf;
  const double* error_scale;
};

// Term 3, position (parameters omega, detector shift):
//   r3 = W (c_fit - c_pred(omega, shift)),  W'W = (k^2 C + sigma_pos^2 I)^-1,
// c_fit the spot centre the local fit estimates (pixels) and C its covariance, sigma_pos the
// image's rms scatter of spots about their predictions; c_pred to first order about the held
// geometry (GeometryLinearisation). dr3/dG = 0 exactly.
struct PositionResidual {
  PositionResidual(const ReflectionFit* rf, const double whitening[3]) : rf(rf) {
    std::copy(whitening, whitening + 3, w);
  }
  template <typename T>
  bool operator()(const T* omega, const T* shift, T* residual) const {
    if (!rf->use_position) {
      residual[0] = residual[1] = T(0.0);
      return true;
    }
    const GeometryLinearisation& l = rf->geometry_linearisation;
    T x(l.x), y(l.y);
    for (int a = 0; a < 3; ++a) {
      x += l.x_gradient[a] * (omega[a] - l.omega[a]);
      y += l.y_gradient[a] * (omega[a] - l.omega[a]);
    }
    x += l.x_gradient[3] * (shift[0] - l.shift);
    y += l.y_gradient[3] * (shift[0] - l.shift);
    const T dx = T(rf->centre_px[0]) - x, dy = T(rf->centre_px[1]) - y;
    residual[0] = w[0] * dx + w[1] * dy;  // W upper triangular (w11, w12, w22)
    residual[1] = w[2] * dy;
    return true;
  }
  const ReflectionFit* rf;
  double w[3];
};

// Baseline per-pixel objective (parameters G, B, phi (NS refined entries), the reflection's
// background b (NB = 1: flat; 3: plane)):
//   r_p = (I_p - bg_p(b) - n_p - G B_term p pol I_ref P_p(phi)) / sqrt(v_p),
// P_p at the held centre of the spot, n_p a modelled neighbour's counts of the last pass (held),
// w_p = 1/v_p the pass's weight (0 for a pixel left out);
// one residual block per pixel so that a Ceres loss function applies per pixel. A background
// given by the file is used as it is (b then unused and held constant).
template <int NS, int NB>
struct PixelResidual {
  PixelResidual(const ImageWork* work, const ReflectionFit* rf, int64_t pixel, const double* held_phi)
      : work(work), rf(rf), pixel(pixel), held_phi(held_phi) {}
  template <typename T>
  bool operator()(const T* G, const T* B, const T* phi, const T* b, T* residual) const {
    T shape[kMaxShape];
    for (int k = 0; k < kMaxShape; ++k) shape[k] = k < NS ? phi[k] : T(held_phi[k]);
    const Sym2<T> M = profile_precision(shape, rf->S, rf->pixel_smoothing);
    const Sym2<T> M_tail = tail_precision(shape, rf->S);
    const T tail = work->profile_model == ProfileModel::kTail ? shape[kShapeTail] : T(0.0);
    const T P = work->area[pixel] * pixel_density(work->eps1[pixel] - rf->delta[0],
                                                  work->eps2[pixel] - rf->delta[1],
                                                  rf->pixel_jacobian, work->subpixels, M,
                                                  M_tail, tail);
    const T j_model = intensity_model(G[0], B[0], rf->pred.d, rf->partiality,
                                      rf->pred.polarization, rf->intensity_ref);
    T bg = T(rf->file_background);
    if (rf->n_background_parameters > 0) {
      bg = b[0];
      if (NB == 3)
        bg += b[1 % NB] * ((work->x[pixel] - rf->box_centre[0]) / rf->box_half) +
              b[2 % NB] * ((work->y[pixel] - rf->box_centre[1]) / rf->box_half);
    }
    residual[0] = (work->counts[pixel] - bg - work->neighbour_counts[pixel] - j_model * P) *
                  std::sqrt(work->weight[pixel]);
    return true;
  }
  const ImageWork* work;
  const ReflectionFit* rf;
  int64_t pixel;
  const double* held_phi;
};

// Gaussian prior on one scalar: r = (x - mean) / sigma.
struct ScalarPrior {
  ScalarPrior(double mean, double sigma) : mean(mean), sigma(sigma) {}
  template <typename T>
  bool operator()(const T* x, T* residual) const {
    residual[0] = (x[0] - T(mean)) / sigma;
    return true;
  }
  double mean, sigma;
};

// Gaussian prior omega ~ N(0, sigma^2 I).
struct RotationPrior {
  explicit RotationPrior(double sigma) : sigma(sigma) {}
  template <typename T>
  bool operator()(const T* omega, T* residual) const {
    for (int i = 0; i < 3; ++i) residual[i] = omega[i] / sigma;
    return true;
  }
  double sigma;
};

}  // namespace pixelrefine
