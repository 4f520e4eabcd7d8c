// The per-image working state of a refinement: each reflection's valid pixels with their
// tangential offsets, its background, and the Fisher weights and sigmas that are held fixed
// within one solve and re-evaluated between solves (iteratively reweighted).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "physics.h"
#include "shoebox_view.h"

namespace pixelrefine {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Reflection flags (bit field, written to /reflections/flags; METHODS.md documents them).
enum ReflectionFlag : int32_t {
  kNoReference = 1,          // intensity_ref is NaN: integrated, not used for scaling
  kTooFewPixels = 2,         // fewer than min_valid_pixels valid pixels: not integrated
  kPanelEdge = 4,            // the shoebox lies against its panel's edge (spot may be cut)
  kOutlier = 8,              // |r1| > outlier_sigma: excluded from the scale fit
  kFewBackgroundPixels = 16, // background set: the pixels farthest from the box centre
  kWeakShape = 32,           // expected signal/noise below min_snr_shape: no shape/position term
  kNotRefined = 64,          // its image was not refined (see the image's status)
  kBadPrediction = 128,      // the predicted ray misses the reflection's panel plane
};

// Image status codes (/images/status).
enum ImageStatus : int32_t {
  kConverged = 0,
  kNotConverged = 1,       // the reweighting did not settle within max_outer solves
  kTooFewReflections = 2,  // fewer than min_reflections usable reflections: not refined
  kSolverFailure = 3,      // Ceres reported failure or a non-finite parameter
  kAtBound = 4,            // converged with a parameter on its bound (sigmas unreliable)
  kSingularCovariance = 5, // converged, but the covariance could not be inverted
};

struct RefineOptions {
  std::string objective = "factored";  // "factored" or "pixel"
  std::vector<double> R0;              // per crystal index, A^-1 (given, not refined here)
  double eta = 0.0;                    // rms mosaic spread, rad
  double sigma_G = kInf;               // prior G ~ N(1, sigma_G); inf = no prior
  double reference_sigma_rel = 0.0;    // relative error of I_ref, added to Term 1's variance
  bool refine_geometry = false;        // Term 3: rotation omega and detector shift
  double sigma_rotation = 1e-3;        // prior omega ~ N(0, sigma_rotation), rad
  double sigma_shift = 1.0;            // prior shift ~ N(0, sigma_shift), mm
  int max_outer = 10;                  // reweighting rounds (Ceres solves) per image
  int max_iterations = 50;             // Levenberg-Marquardt iterations per solve
  double outer_tolerance = 0.1;        // settled when every parameter moves < tol * sigma
  double G_init = 0.0;                 // 0 = estimate
  double B_init = 0.0;
  double R1_init = 0.0;                // 0 = estimate from second moments
  double B_min = -200.0, B_max = 200.0;
  int min_background_pixels = 6;
  int min_valid_pixels = 5;
  int min_reflections = 3;
  double min_snr_shape = 5.0;          // gate for the shape and position terms
  double outlier_sigma = 10.0;         // 0 = never exclude
  double variance_floor = 1e-2;        // photons^2, lower bound of v_p
  std::string loss = "none";           // pixel objective only: "none", "huber", "cauchy"
  double loss_scale = 1.0;             // delta (Huber) or a (Cauchy)
};

// Per-image parameters: the values being refined.
struct ImageParameters {
  double G = 1.0, B = 0.0, R1 = 0.0;
  double rotation[3] = {0.0, 0.0, 0.0};
  double detector_shift = 0.0;
  double R0 = 0.0;  // given (per crystal)
};

// The profile sums of one reflection in a single pass over its valid pixels (one exp per
// pixel), from which J and the model second moment follow.
template <typename T>
struct ProfileSums {
  T wPs{0.0};   // sum w P s
  T wPP{0.0};   // sum w P^2
  T wP{0.0};    // sum w P
  T P{0.0};     // sum P
  T Pu{0.0};    // sum P u, u = |eps_t|^2 / 2
  T pbar{0.0};  // mean P over the background set (0 when the file gives the background)
};

// Per-reflection state. Pixel-level arrays live in ImageWork, in [pixel_begin, pixel_end).
struct ReflectionFit {
  int64_t row = 0;
  const Panel* panel = nullptr;
  const int32_t* hkl = nullptr;
  const int32_t* bbox = nullptr;  // x0, x1, y0, y1
  double intensity_ref = kNaN;
  int32_t flags = 0;
  int64_t pixel_begin = 0, pixel_end = 0;

  // Background: a fixed set of pixels (the shoebox's outer ring), chosen once.
  int n_background = 0;                // 0 when the file gives the background
  double background_observed = kNaN;   // Bg_obs: file value, or mean counts of the set

  // Reflection-level prediction at the current geometry.
  Prediction<double> pred{};
  double partiality = kNaN;
  double a_mean = kNaN;    // mean pixel area on the sphere over the valid pixels
  double u_sum = 0.0;      // sum of u = |eps_t|^2 / 2 over the valid pixels

  // Held fixed within one solve.
  double amplitude_expected = 0;  // A used in the weights (J_model, or J without reference)
  double sigma_intensity = kNaN;  // Term 1 sigma: sqrt(var J + (f_ref J_model)^2)
  double m2_obs = kNaN, sigma_m2 = kNaN;
  double x_obs = kNaN, y_obs = kNaN, sigma_x = kNaN, sigma_y = kNaN;
  double x_offset = 0, y_offset = 0;  // expected centroid - c_pred (box truncation, ring)
  double background_profile_held = 0;  // Pbar at the last update_weights
  // Pbar and dPbar/dR1 at R1 = background_profile_r1, set before each evaluation of the
  // pixel objective (BackgroundProfileCallback).
  double background_profile_live = 0, background_profile_slope = 0, background_profile_r1 = 0;
  // Evaluated with the weights, at the parameters of the last update_weights.
  double J = kNaN, J_variance = kNaN;  // profile-fitted amplitude and its variance
  double intensity_residual = 0.0;     // r1 (0 when Term 1 is off)
  // The cost functors' pixel sums and their derivatives in R1 at the last two values of R1
  // (with the held weights): Ceres evaluates the residuals at a candidate point and, when it
  // accepts it, the Jacobian at the same point; when it stops on a rejected candidate, the
  // covariance is evaluated at the previous point. Either reuses a pass over the pixels.
  // Invalidated (NaN) whenever the weights or the geometry change.
  mutable ProfileSums<ceres::Jet<double, 1>> sums_cache[2];
  mutable double sums_r1[2] = {kNaN, kNaN};
  mutable int sums_next = 0;
  bool use_intensity = false;     // Term 1 active
  bool use_shape = false;         // Terms 2 and 3 active
};

struct ImageWork {
  double wavelength = 0, bandwidth = 0, polarization_fraction = 0;
  const double* A = nullptr;
  std::vector<ReflectionFit> reflections;
  // Valid pixels of all reflections, concatenated.
  std::vector<double> counts, x, y;      // observed photons; pixel-centre coordinates
  std::vector<double> eps_sq, area;      // |eps_t|^2 and a_p at the current geometry
  std::vector<double> signal;            // s_p = I_p - Bg_obs (data only)
  std::vector<double> weight;            // w_p = 1 / v_p
  std::vector<double> variance;          // v_p
  std::vector<double> profile;           // P_p at the last update_weights
  std::vector<uint8_t> in_background;    // pixel of the background set
  std::vector<double> read_noise_sq;
};

// Templated pixel sums, shared by the cost functors (Jets) and the final integration.
// With Bg_obs the mean of the background set, E[I_p - Bg_obs] = A (P_p - Pbar), Pbar the
// mean profile over the set: the spot's tail in the ring is modelled, not subtracted.

template <typename T>
ProfileSums<T> profile_sums(const ImageWork& w, const ReflectionFit& rf, const T& R1) {
  // P_p = c a_p g_p (profile_density) with c = 1/(pi R_p^2) common to the reflection: the
  // sums run over a g and are scaled by c (c^2 for the quadratic one) once at the end.
  ProfileSums<T> sums;
  T ring(0.0);
  const T inverse_width_sq = 1.0 / profile_width_sq(R1, rf.a_mean);
  for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
    const T ag = w.area[i] * tangential_shape(w.eps_sq[i], inverse_width_sq);
    const T w_ag = w.weight[i] * ag;
    sums.wPs += w_ag * w.signal[i];
    sums.wPP += w_ag * ag;
    sums.wP += w_ag;
    sums.P += ag;
    sums.Pu += ag * (0.5 * w.eps_sq[i]);
    if (w.in_background[i]) ring += ag;
  }
  const T c = tangential_normalisation(inverse_width_sq);
  sums.wPs *= c;
  sums.wPP *= c * c;
  sums.wP *= c;
  sums.P *= c;
  sums.Pu *= c;
  if (rf.n_background > 0) sums.pbar = c * ring / double(rf.n_background);
  return sums;
}

// The pixel sums for a cost functor, with T = double or a Jet of any size. They depend on R1
// alone, so they are differentiated in forward mode with a one-dimensional Jet seeded on R1
// (autodiff through the pixel sums) and carried to T's derivative space by the chain rule
// (d sum / d theta = d sum / d R1 * d R1 / d theta): the same derivatives as profile_sums<T>
// at a third of the per-pixel cost for T = Jet<3>. Cached per reflection (sums_cache).
inline void invalidate_profile_sums(const ReflectionFit& rf) {
  rf.sums_r1[0] = rf.sums_r1[1] = kNaN;
}

inline const ProfileSums<ceres::Jet<double, 1>>& cached_profile_sums(const ImageWork& w,
                                                                      const ReflectionFit& rf,
                                                                      double R1) {
  for (int slot = 0; slot < 2; ++slot)
    if (rf.sums_r1[slot] == R1) return rf.sums_cache[slot];
  const int slot = rf.sums_next;
  rf.sums_next = 1 - slot;
  rf.sums_cache[slot] = profile_sums(w, rf, ceres::Jet<double, 1>(R1, 0));
  rf.sums_r1[slot] = R1;
  return rf.sums_cache[slot];
}

inline ProfileSums<double> profile_sums_of(const ImageWork& w, const ReflectionFit& rf,
                                           const double& R1) {
  const ProfileSums<ceres::Jet<double, 1>>& s = cached_profile_sums(w, rf, R1);
  ProfileSums<double> out;
  out.wPs = s.wPs.a;
  out.wPP = s.wPP.a;
  out.wP = s.wP.a;
  out.P = s.P.a;
  out.Pu = s.Pu.a;
  out.pbar = s.pbar.a;
  return out;
}

template <int N>
ProfileSums<ceres::Jet<double, N>> profile_sums_of(const ImageWork& w, const ReflectionFit& rf,
                                                   const ceres::Jet<double, N>& R1) {
  const ProfileSums<ceres::Jet<double, 1>>& s = cached_profile_sums(w, rf, R1.a);
  auto lift = [&](const ceres::Jet<double, 1>& x) {
    ceres::Jet<double, N> out;
    out.a = x.a;
    out.v = x.v[0] * R1.v;
    return out;
  };
  ProfileSums<ceres::Jet<double, N>> out;
  out.wPs = lift(s.wPs);
  out.wPP = lift(s.wPP);
  out.wP = lift(s.wP);
  out.P = lift(s.P);
  out.Pu = lift(s.Pu);
  out.pbar = lift(s.pbar);
  return out;
}

// Profile-fitted amplitude J = sum w P (I - Bg_obs) / sum w P (P - Pbar), which is
// conventions.md's J = sum w P (I - Bg) / sum w P^2 with the background Bg = Bg_obs - J Pbar.
template <typename T>
T profile_fit_amplitude(const ProfileSums<T>& s) {
  return s.wPs / (s.wPP - s.pbar * s.wP);
}

// Model second moment over the valid pixels, M2 = sum (P - Pbar) u / sum (P - Pbar); for a
// spot wholly inside its box with a known background it is R1^2/2 + a/12 (the pixel term is
// in P, see profile_density).
template <typename T>
T model_second_moment(const ImageWork& w, const ReflectionFit& rf, const ProfileSums<T>& s) {
  const double n = double(rf.pixel_end - rf.pixel_begin);
  return (s.Pu - s.pbar * rf.u_sum) / (s.P - s.pbar * n);
}

// Builds the work state of one image: valid pixels and their coordinates, static flags, the
// background set (valid pixels of the shoebox's outer ring; if fewer than
// min_background_pixels, the valid pixels farthest from the box centre) and Bg_obs.
void setup_image(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                 ImageWork& work);

// Reflection-level prediction and pixel-level eps_t, a_p at the given geometry.
void update_geometry(ImageWork& work, const ImageParameters& params, double eta);

// Fisher weights, sigmas, statistics, J and the Term gates at the given parameters (one pass
// over the pixels). J of the previous call supplies the amplitude of reflections without a
// reference, and of all reflections when the scale is not known (scale_known = false).
void update_weights(ImageWork& work, const ImageParameters& params, const RefineOptions& options,
                    bool scale_known);

// Sets every reflection's Pbar(R1) and dPbar/dR1 at the given R1 (analytic derivative).
void update_background_profile(ImageWork& work, double R1);

// Flat background of the model, Bg = Bg_obs - A Pbar (Pbar at the last update_weights).
double model_background(const ReflectionFit& rf, double amplitude);

}  // namespace pixelrefine
