// The per-image working state of a refinement and the per-reflection fit that feeds it.
//
// Each reflection is fitted on its own, at image-level parameters held fixed: the spot's
// amplitude J and its background (flat or a plane) by weighted least squares with the Fisher
// weights, the spot's centre by a Newton step with the image's positional prior, and the
// statistics the image-level residuals compare with their models (METHODS.md §I.5-I.9):
// J and its variance (Term 1), the shape scores (Term 2) and the centre (Term 3). All of them
// come from one pass over the reflection's valid pixels, which accumulates the weighted Gram
// matrix of (P, background basis, dP/d centre, dP/d shape, counts).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "physics.h"
#include "profile.h"
#include "shoebox_view.h"

namespace pixelrefine {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Reflection flags (bit field, written to /reflections/flags; METHODS.md documents them).
enum ReflectionFlag : int32_t {
  kNoReference = 1,          // intensity_ref is NaN: integrated, not used for scaling
  kTooFewPixels = 2,         // fewer than min_valid_pixels valid pixels: not integrated
  kPanelEdge = 4,            // the shoebox lies against its panel's edge (spot may be cut)
  kOutlier = 8,              // |r1| > outlier_sigma at the final parameters: not in the scale fit
  kPixelOutliers = 16,       // pixels far above the model (zinger, a neighbour's spot) left out
  kNoShape = 32,             // J <= 0: no shape or position information
  kNotRefined = 64,          // its image was not refined (see the image's status)
  kBadPrediction = 128,      // no prediction: the ray misses the panel, or d < lambda/2
  kProfileOutsideBox = 256,  // less than min_profile_fraction of the profile in the valid pixels
  kLowPartiality = 512,      // p < min_partiality: intensity_scaled not given
  kPlaneBackground = 1024,   // the background is a plane (else flat)
  kPoorFitReflection = 2048, // the reflection's pixel chi^2 per degree of freedom above chi2_max
  kNeighbourModelled = 4096, // a neighbour's spot in the box, fitted as a second profile
};
// Boxes holding light that is not the spot's (left out, or a modelled neighbour's): they
// inform neither the shape (Term 2) nor the counting scale k.
constexpr int32_t kForeignLight = kPixelOutliers | kNeighbourModelled;

// Image status codes (/images/status).
enum ImageStatus : int32_t {
  kConverged = 0,
  kNotConverged = 1,       // the reweighting did not settle within max_outer solves
  kTooFewReflections = 2,  // fewer than min_reflections usable reflections: not scaled
  kSolverFailure = 3,      // Ceres reported failure or a non-finite parameter
  kAtBound = 4,            // converged with a parameter on its bound (sigmas unreliable)
  kSingularCovariance = 5, // converged, but the covariance could not be inverted
  kNoReferenceImage = 6,   // profile refined and every spot integrated, not scaled (G, B NaN)
  kImplausibleProfile = 7, // spot width outside [spot_sd_min, half the box] (pixels)
  kPoorFit = 8,            // pooled pixel chi^2 of the final model above chi2_max
};

struct RefineOptions {
  std::string objective = "factored";  // "factored" or "pixel"
  std::string profile = "anisotropic"; // "isotropic", "anisotropic", "tail"
  std::string background = "auto";    // "flat", "plane", "auto" (plane where the box allows)
  // Per crystal index (see /global): given or refined by the Python layer's global loop.
  std::vector<double> R0;               // A^-1
  std::vector<double> eta;              // rad (empty = 0)
  std::vector<double> error_scale;      // k: counting sigmas times k (empty = 1)
  std::vector<double> read_variance_scale;  // the read noise's variance times this (empty = 1)
  std::vector<double> reference_error;  // f: relative error of I_ref (empty = 0)
  std::vector<double> tail_fraction;    // t (profile "tail"; empty = 0)
  std::vector<double> tail_scale;       // s (profile "tail"; empty = 3)
  std::vector<double> G_prior;          // centre of the G prior (empty = no prior)
  std::vector<double> R0_sigma;         // sd of R0, propagated into intensity_scaled (empty = 0)
  // Per crystal (tt, ts, ss): the covariance of the refined tail (t, s), propagated into G, B
  // and intensity_scaled (empty = 0: a tail given, or none).
  std::vector<double> tail_covariance;
  double sigma_G = kInf;                // relative width of the G prior; inf = none
  bool reference_bias_correction = true;  // remove the scale's bias from I_ref's own error
  bool fit_centres = true;              // estimate each spot's centre (else: at c_pred)
  bool refine_geometry = false;         // Term 3: rotation omega and detector shift
  double sigma_rotation = 1e-3;         // prior omega ~ N(0, sigma_rotation), rad
  double sigma_shift = 1.0;             // prior shift ~ N(0, sigma_shift), mm
  int max_outer = 20;                   // reweighting rounds (passes + Ceres solves) per image
  int max_iterations = 50;              // Levenberg-Marquardt iterations per solve
  double outer_tolerance = 0.1;         // settled when every parameter moves < tol * sigma
  double B_min = -200.0, B_max = 200.0;
  int min_valid_pixels = 5;
  int plane_min_pixels = 100;           // "auto" background: a plane from this many valid pixels
  int min_reflections = 3;
  double outlier_sigma = 6.0;           // Term 1: |r1| above this leaves the scale fit (0 = never)
  double pixel_outlier_sigma = 6.0;     // pixels this far above the model are left out (0 = never)
  bool model_neighbours = true;         // fit a neighbour's spot found in a box as a second profile
  double min_profile_fraction = 0.2;    // integrated only when the valid pixels hold this much
  double min_partiality = 1e-3;         // intensity_scaled only above this partiality
  double position_sigma = 0.5;          // starting rms offset of spots from prediction (pixels)
  double spot_sd_min = 0.1;             // plausible spot sd (pixels), lower bound
  double chi2_max = 3.0;                // pooled pixel chi^2 per degree of freedom, upper bound
  double variance_floor = 1e-2;         // photons^2, lower bound of v_p
  std::string loss = "none";            // pixel objective only: "none", "huber", "cauchy"
  double loss_scale = 1.0;              // delta (Huber) or a (Cauchy)
};

// Per-image parameters. phi: the shape vector (R1, a, c, t, s); which entries are refined is
// set by the profile model (t, s are per crystal, held).
struct ImageParameters {
  double G = 1.0, B = 0.0;
  double phi[kMaxShape] = {0.0, 0.0, 0.0, 0.0, 3.0};
  double rotation[3] = {0.0, 0.0, 0.0};
  double detector_shift = 0.0;
  // Per crystal, held within an image's refinement.
  double R0 = 0.0, eta = 0.0, error_scale = 1.0, reference_error = 0.0;
};

// Everything one pass over a reflection's pixels yields (at held image-level parameters).
struct ReflectionStatistics {
  double J = kNaN, J_variance = kNaN;  // amplitude and its counting variance (k = 1)
  // d var J / d J_m: the counting variance with the weights at the background the fit gives
  // when J is held at J_m is J_variance + J_variance_slope (J_m - J) (METHODS.md §I.10).
  double J_variance_slope = 0.0;
  double background[3] = {kNaN, 0.0, 0.0};  // b, and the plane's slopes per normalised pixel
  double profile_fraction = 0.0;       // sum of P over the valid pixels used
  double chi2 = 0.0;                   // sum w e^2 over the pixels used (k = 1)
  int n_used = 0;                      // pixels used
  int n_parameters = 0;                // local parameters fitted (J, background, centre)
  // The counting scale's sums over the background-dominated pixels (METHODS.md §I.10): e^2,
  // their degrees of freedom sum (1 - h), and sum (1 - h) v split into the Poisson and the read
  // noise's parts (v the variance the pass weighs with).
  double residual_sq_background = 0.0;  // sum e^2 (counts^2, not divided by v)
  double dof_background = 0.0;          // sum (1 - leverage)
  double poisson_background = 0.0;      // sum (1 - h) (v - rho s_read^2)
  double read_background = 0.0;         // sum (1 - h) rho s_read^2
  // Shape: whitened scores z = L^-1 T and U = L' (L L' = F, the Fisher matrix of the image's
  // refined shape parameters with J, the background and the centre profiled out), n_shape
  // entries; and dJ/dphi (for the propagation of the shape's uncertainty into G).
  double shape_z[kMaxShape] = {0, 0, 0, 0, 0};
  double shape_U[kMaxShape * kMaxShape] = {};  // row-major, upper triangular
  double dJ_dphi[kMaxShape] = {0, 0, 0, 0, 0};
  double dJ_dtail[2] = {0, 0};  // dJ/d(t, s) at the held shape (the tail's share of G's error)
  // Scores and information of the held (t, s), for the per-crystal global step.
  double tail_score[2] = {0, 0};
  double tail_information[3] = {0, 0, 0};  // (tt, ts, ss)
  double shape_tail_cross[kMaxShape * 2] = {};  // F(phi_k, (t, s)), row-major [k][2]
  double m2_obs = kNaN;  // the seed's ratio sum (I - Bg) |u|^2/2 / sum (I - Bg) (diagnostic)
  // Centre: score and Fisher information (per unit J^2) of the centre offset delta, from the
  // profile at a known centre, and the amplitude fitted with that profile.
  double centre_amplitude = kNaN;
  double centre_score[2] = {0, 0};
  double centre_information[3] = {0, 0, 0};  // (11, 12, 22)
  // A neighbour's spot fitted in the box: its amplitude, the amplitude's variance, and the
  // score and information (per unit amplitude^2) of its centre, J and the background profiled.
  double neighbour_J = kNaN, neighbour_J_variance = kNaN;
  double neighbour_score[2] = {0, 0};
  double neighbour_information[3] = {0, 0, 0};
  bool shape_ok = false;
};

// The excitation error, the polarisation (Term 1) and the predicted centre (Term 3) to first
// order in the geometry (omega, detector shift) about the held one, and R0_eff^2 (d does not
// change with a rotation). Re-linearised at every pass; exact at the solution.
struct GeometryLinearisation {
  double omega[3] = {0, 0, 0}, shift = 0.0;
  double excitation_error = 0.0, excitation_error_gradient[3] = {0, 0, 0};
  double polarization = 1.0, polarization_gradient[3] = {0, 0, 0};
  double width_sq = 1.0;
  double x = 0.0, y = 0.0, x_gradient[4] = {0, 0, 0, 0}, y_gradient[4] = {0, 0, 0, 0};
};

constexpr int kNeighbourTries = 2;
// The counting scale k (METHODS.md §I.10) from pixels whose deviate is within this many sd
// (a pixel beyond is not counting noise), in boxes holding at least this much of their spot.
constexpr double kCountingClip = 4.0;
constexpr double kCountingProfileFraction = 0.8;

// The signed root of the Poisson deviance of a count I_p against its model mu_p with variance
// v_p (Poisson and read noise) at error scale k: Snyder's shifted count m = (I - mu)/k^2 + lambda
// against lambda = v/k^2, d = sign(m - lambda) sqrt(2 (m ln(m/lambda) - (m - lambda))). A normal
// deviate at high counts ((I - mu)/(k sqrt v)); at low counts its tails are Poisson's, not the
// normal's (2 counts where 0.1 is expected: d = 2.9, not z = 6.0).
double pixel_deviate(double counts, double expected, double variance, double error_scale);

// Per-reflection state. Pixel-level arrays live in ImageWork, in [pixel_begin, pixel_end).
struct ReflectionFit {
  int64_t row = 0;
  const Panel* panel = nullptr;
  const int32_t* hkl = nullptr;
  const int32_t* bbox = nullptr;  // x0, x1, y0, y1
  double intensity_ref = kNaN;
  double file_background = kNaN;  // /reflections/background (NaN: estimated)
  int32_t flags = 0;
  int64_t pixel_begin = 0, pixel_end = 0;
  int n_background_parameters = 1;  // 1 flat, 3 plane (0: the file gives the background)
  double box_centre[2] = {0, 0};    // pixel coordinates of the box centre
  double box_half = 1.0;            // half the box side (normalises the plane's slopes)

  // At the current geometry.
  Prediction<double> pred{};
  double partiality = kNaN;
  double a_mean = kNaN;         // mean pixel area on the sphere over the valid pixels
  double pixel_jacobian[4] = {1, 0, 0, 1};  // D = d eps / d (x, y) at c_pred, row-major (A^-1/px)
  double pixel_smoothing[3] = {0, 0, 0};    // D D'/(6 n^2): a sub-cell's own width in Sigma
  GeometryLinearisation geometry_linearisation;

  // Held: the centre delta (A^-1, (e1, e2)), its posterior covariance S (11, 12, 22), the
  // background and the amplitude of the weights, and the last pass's statistics.
  double delta[2] = {0, 0};
  double S[3] = {0, 0, 0};
  double amplitude_expected = 0.0;  // A in v_p = Bg + A P + sigma_read^2
  ReflectionStatistics stats;
  // Centre estimate without the prior (pixels) and its covariance, for Term 3.
  double centre_px[2] = {kNaN, kNaN};
  double centre_cov[3] = {kNaN, kNaN, kNaN};
  double centre_sd_px = kInf;  // sd of the held centre (largest axis of S, pixels)
  // The held centre's posterior covariance C (11, 12, 22; A^-2; 0 when centres are held), for
  // the shape score's adjustment for the centre's profiling (METHODS.md §I.8).
  double centre_posterior[3] = {0, 0, 0};
  bool relocated = false;      // the centre was started again from the counts once
  int centre_searches = 0;      // how often search_centre was tried (at most kMaxCentreSearches)
  // A neighbour's spot in the box (METHODS.md §I.7): fitted as a second profile of the same
  // shape, amplitude in the local fit, centre (A^-1, (e1, e2) about c_pred) by a Gauss-Newton
  // step per pass; dropped when not significant, found at most kNeighbourTries times.
  bool neighbour = false;
  int neighbour_tries = 0;
  double neighbour_centre[2] = {0, 0};
  double neighbour_amplitude = 0.0;  // its amplitude in the weights, from the last pass
  // Term 1, held within a solve.
  double sigma_intensity = kNaN;  // sqrt(k^2 var_m J + (f J_model)^2), model_J_variance
  double intensity_residual = 0.0;
  int outlier_switches = 0;       // times Term 1's outlier decision changed (out for good at 3)
  bool use_intensity = false;     // Term 1 active
  bool use_shape = false;         // Term 2 active
  bool use_position = false;      // Term 3 active
  // D as a matrix.
  Eigen::Matrix2d jacobian() const {
    return (Eigen::Matrix2d() << pixel_jacobian[0], pixel_jacobian[1], pixel_jacobian[2],
            pixel_jacobian[3]).finished();
  }
  // The centre is profiled (a posterior C is held): the shape score is adjusted for it.
  bool centre_profiled() const { return centre_posterior[0] != 0.0 || centre_posterior[2] != 0.0; }
  bool integrated() const {
    return pixel_end > pixel_begin && !(flags & (kBadPrediction | kTooFewPixels | kProfileOutsideBox));
  }
};

struct ImageWork {
  double wavelength = 0, bandwidth = 0, polarization_fraction = 0;
  const double* A = nullptr;
  ProfileModel profile_model = ProfileModel::kAnisotropic;
  int n_shape = 3;
  std::vector<ReflectionFit> reflections;
  // Valid pixels of all reflections, concatenated.
  std::vector<double> counts, x, y;  // observed photons; pixel-centre coordinates
  std::vector<double> eps1, eps2;    // eps_t at the current geometry (A^-1)
  std::vector<double> area;          // a_p
  std::vector<double> read_noise_sq;
  std::vector<double> expected;      // mu_p of the last pass
  std::vector<double> variance;      // v_p of the last pass
  std::vector<double> weight;        // w_p = 1/v_p of the last pass (0: pixel left out)
  std::vector<uint8_t> used;         // 0: left out as an outlier pixel in the last pass
  std::vector<double> neighbour_counts;  // a modelled neighbour's J_n P_n of the last pass (else 0)
  double position_sigma_px = 0.5;    // rms offset of spots from prediction (pixels), held
  int subpixels = 1;                 // n: the profile is averaged over n x n points per pixel
  double centre_moving = 0.0;        // fraction of centres still moving last pass (update_centre)
  double spot_sd_px = kNaN;          // the core's sd along its narrow axis (pixels), held
};

// Builds the work state of one image: valid pixels and their coordinates, static flags, the
// background model of each box.
void setup_image(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                 ImageWork& work);

// Reflection-level prediction and pixel-level eps_t, a_p at the given geometry.
void update_geometry(ImageWork& work, const ImageParameters& params);

// The pixel sampling: n x n sub-pixel points, and each reflection's sub-cell width; and the n
// a shape needs (subpixels_for the narrow axis of the Gaussian core, in pixels).
void set_subpixels(ImageWork& work, int n);
int subpixels_for_shape(const ImageWork& work, const double phi[kMaxShape]);
double narrow_sd_px(const ImageWork& work, const double phi[kMaxShape]);

// Starting values before the first pass: background from the box's border, amplitude from the
// summation, centre at the prediction; and the starting shape from the strong spots' moments.
void initialise_reflections(ImageWork& work, const RefineOptions& options);
void initial_shape(const ImageWork& work, double phi[kMaxShape]);

// The pass: every reflection's fit and statistics at the held parameters (scale_known: use
// J_model as the weights' amplitude where there is a reference). Then the held centres, the
// weights' amplitudes and the image's positional scatter are updated for the next pass.
void fit_reflections(ImageWork& work, const ImageParameters& params, const RefineOptions& options,
                     bool scale_known);

// Profile P_p of every valid pixel of one reflection at the held centre and the given shape
// (the same P the pass used; for the model counts and the per-pixel objective).
double reflection_profile(const ImageWork& work, const ReflectionFit& rf, const double* phi,
                          int64_t pixel);

// The geometry linearisation of every reflection at the given parameters (Terms 1 and 3).
void linearise_geometry(ImageWork& work, const ImageParameters& params);

// J_model = G B_term p pol I_ref of one reflection at the given scale (held geometry).
double model_intensity(const ReflectionFit& rf, const ImageParameters& params);

// The counting variance of J at the background consistent with J = j_model (k = 1): Term 1's,
// uncorrelated with J's own error (METHODS.md §I.10); J_m - J taken within 3 sd, the result
// within [0.5, 2] of J_variance.
double model_J_variance(const ReflectionStatistics& st, double j_model);

}  // namespace pixelrefine
