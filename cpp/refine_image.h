// The one place that builds and solves a problem: one Ceres problem per image, solved again
// after each re-evaluation of the weights until they settle.
#pragma once

#include <cstdint>

#include "reflection_model.h"
#include "shoebox_view.h"

namespace pixelrefine {

// Number of refined parameters in the covariance: G, B, R1 (+ omega[3], shift).
inline int covariance_size(const RefineOptions& options) {
  return options.refine_geometry ? 7 : 3;
}

// What each scalar residual of a problem is (for tests and diagnostics).
enum ResidualTerm : int32_t {
  kIntensityTerm = 1,
  kShapeTerm = 2,
  kPositionTerm = 3,
  kPixelTerm = 4,
  kPriorTerm = 5
};
struct ResidualLabel {
  ResidualTerm term;
  int64_t row;  // reflection row, -1 for a prior
};

// The problem of one image evaluated at given parameters, with the weights and background
// evaluated there too: residuals, the autodiff Jacobian (columns G, B, R1[, omega, shift])
// and J per reflection.
struct ImageEvaluation {
  std::vector<double> residuals;
  std::vector<double> jacobian;  // row-major [n_residuals, k]
  std::vector<ResidualLabel> labels;
  std::vector<double> intensity_prf;  // per reflection of the image (NaN if not integrated)
  double cost = 0.0;                  // Ceres cost 1/2 sum rho(r^2), loss functions applied
  int k = 3;
};
// weights_at: the parameters at which weights, sigmas and statistics are evaluated (as at the
// start of a solve); the residuals and Jacobian are evaluated at params.
ImageEvaluation evaluate_image(const ShoeboxSetView& set, int64_t image,
                               const RefineOptions& options, const ImageParameters& params,
                               const ImageParameters& weights_at);

// Checks the options against the set (R0 per crystal, objective name, ranges).
void validate_options(const RefineOptions& options, const ShoeboxSetView& set);

// Refines one image and writes its row of results and its reflections' rows.
void refine_image(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                  const ResultsView& out);

// Refines images [first, last) on n_threads threads (each image independent).
void refine_images(const ShoeboxSetView& set, const RefineOptions& options, int64_t first,
                   int64_t last, int n_threads, const ResultsView& out);

// The refinement's model of every pixel of one image's shoeboxes at given parameters, with
// weights evaluated there: expected counts mu_p = Bg + A P_p (A = J_model where there is a
// reference and the scale is known, else the fitted J) and model variance v_p; NaN where a
// reflection is not integrated. Masked pixels get the model too.
void model_counts(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                  const ImageParameters& params, bool scale_known, double* mu, double* variance);

// Wall time of one Ceres Solve of a one-parameter problem (build + solve), averaged over
// `repeats`: the per-solve overhead beyond the evaluations of a real problem.
double trivial_solve_seconds(int repeats);

}  // namespace pixelrefine
