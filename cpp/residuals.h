// Cost functors. They only assemble residuals from the physics (physics.h) and the pixel sums
// (reflection_model.h); weights and sigmas are read from the reflection's state, which is
// held fixed within a solve. Each functor keeps a pointer to state that outlives the problem.
#pragma once

#include <ceres/evaluation_callback.h>

#include "reflection_model.h"

namespace pixelrefine {

// Terms 1 and 2 of one reflection from a single pass over its pixels:
//   r1 = (J(R1) - G B_term p pol I_ref) / sigma_J      (0 when Term 1 is off)
//   r2 = (M2_obs - M2_model(R1)) / sigma_M2             (0 when Term 2 is off)
// r2 does not involve G, B or the geometry, so dr2/dG = 0 exactly.
template <typename T, typename D>
inline void reflection_residuals(const ImageWork& work, const ReflectionFit& rf, const T& G,
                                 const T& B, const T& R1, const D& d, const D& p, const D& pol,
                                 T residual[2]) {
  const ProfileSums<T> sums = profile_sums_of(work, rf, R1);
  residual[0] = rf.use_intensity
                    ? (profile_fit_amplitude(sums) - intensity_model(G, B, d, p, pol, rf.intensity_ref)) /
                          rf.sigma_intensity
                    : T(0.0);
  residual[1] = rf.use_shape
                    ? (T(rf.m2_obs) - model_second_moment(work, rf, sums)) / rf.sigma_m2
                    : T(0.0);
}

// Terms 1 and 2 with the geometry held (parameters G, B, R1).
struct ReflectionResidual {
  ReflectionResidual(const ImageWork* work, const ReflectionFit* rf) : work(work), rf(rf) {}
  template <typename T>
  bool operator()(const T* G, const T* B, const T* R1, T* residual) const {
    reflection_residuals(*work, *rf, G[0], B[0], R1[0], rf->pred.d, rf->partiality,
                         rf->pred.polarization, residual);
    return true;
  }
  const ImageWork* work;
  const ReflectionFit* rf;
};

// Terms 1 and 2 with the crystal rotation live (parameters G, B, R1, omega): d, eps_r, p and
// pol follow omega; the pixel-level offsets eps_t stay at the solve's starting geometry.
struct ReflectionGeometryResidual {
  ReflectionGeometryResidual(const ImageWork* work, const ReflectionFit* rf, double R0, double eta)
      : work(work), rf(rf), R0(R0), eta(eta) {}
  template <typename T>
  bool operator()(const T* G, const T* B, const T* R1, const T* omega, T* residual) const {
    const Prediction<T> pred = predict(work->A, rf->hkl, work->wavelength,
                                       work->polarization_fraction, *rf->panel, omega, T(0.0));
    const T width_sq = partiality_width_sq(T(R0), T(eta), pred.d, work->wavelength, work->bandwidth);
    const T p = partiality(pred.excitation_error, width_sq);
    reflection_residuals(*work, *rf, G[0], B[0], R1[0], pred.d, p, pred.polarization, residual);
    return true;
  }
  const ImageWork* work;
  const ReflectionFit* rf;
  double R0, eta;
};

// Term 3: r3 = (c_obs - c_pred(omega, shift) - offset) / sigma_c, per pixel axis; the offset
// (expected centroid of the cut, ring-subtracted spot minus c_pred) is held within a solve.
struct PositionResidual {
  PositionResidual(const ImageWork* work, const ReflectionFit* rf) : work(work), rf(rf) {}
  template <typename T>
  bool operator()(const T* omega, const T* shift, T* residual) const {
    if (!rf->use_shape) {
      residual[0] = T(0.0);
      residual[1] = T(0.0);
      return true;
    }
    const Prediction<T> pred = predict(work->A, rf->hkl, work->wavelength,
                                       work->polarization_fraction, *rf->panel, omega, shift[0]);
    residual[0] = (T(rf->x_obs) - (pred.x + rf->x_offset)) / rf->sigma_x;
    residual[1] = (T(rf->y_obs) - (pred.y + rf->y_offset)) / rf->sigma_y;
    return true;
  }
  const ImageWork* work;
  const ReflectionFit* rf;
};

// Baseline per-pixel objective: r_p = (I_p - mu_p) / sqrt(v_p), mu_p = Bg + J_model P_p, with
// Bg = Bg_obs - J_model Pbar: r_p = (s_p - J_model (P_p - Pbar(R1))) / sqrt(v_p). One residual
// block per pixel, so that a Ceres loss function applies per pixel; Pbar(R1), shared by the
// pixels of a reflection, is computed once per evaluation by BackgroundProfileCallback with
// its derivative, and enters here to first order about that point (exact there).
struct PixelResidual {
  PixelResidual(const ImageWork* work, const ReflectionFit* rf, int64_t pixel)
      : work(work), rf(rf), pixel(pixel) {}
  template <typename T>
  bool operator()(const T* G, const T* B, const T* R1, T* residual) const {
    if (!rf->use_intensity) {
      residual[0] = T(0.0);
      return true;
    }
    const T j_model = intensity_model(G[0], B[0], rf->pred.d, rf->partiality,
                                      rf->pred.polarization, rf->intensity_ref);
    const T P = profile_density(work->eps_sq[pixel], work->area[pixel],
                                1.0 / profile_width_sq(R1[0], rf->a_mean));
    const T pbar = T(rf->background_profile_live) +
                   (R1[0] - T(rf->background_profile_r1)) * rf->background_profile_slope;
    residual[0] = (work->signal[pixel] - j_model * (P - pbar)) * std::sqrt(work->weight[pixel]);
    return true;
  }
  const ImageWork* work;
  const ReflectionFit* rf;
  int64_t pixel;
};

// Before each evaluation of the pixel objective: Pbar(R1) and its slope for every reflection.
class BackgroundProfileCallback : public ceres::EvaluationCallback {
 public:
  BackgroundProfileCallback(ImageWork* work, const double* R1) : work_(work), R1_(R1) {}
  void PrepareForEvaluation(bool /*evaluate_jacobians*/, bool new_evaluation_point) final {
    if (new_evaluation_point || work_->reflections.empty() ||
        work_->reflections.front().background_profile_r1 != *R1_)
      update_background_profile(*work_, *R1_);
  }

 private:
  ImageWork* work_;
  const double* R1_;
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
