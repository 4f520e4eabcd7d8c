// The one place that builds and solves a problem: one Ceres problem per image, solved again
// after each pass of per-reflection fits until the held parameters settle.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "reflection_model.h"
#include "shoebox_view.h"

namespace pixelrefine {

// Number of refined parameters in the covariance: G, B, the shape (R1[, a, c]) and, with
// refine_geometry, omega[3] and the detector shift.
int covariance_size(const RefineOptions& options);
std::vector<std::string> covariance_names(const RefineOptions& options);

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

// The problem of one image: the per-reflection fits at `held` (after `passes` passes there,
// from the default start), then the residuals and the autodiff Jacobian at `params` (columns in
// covariance order), and J per reflection.
struct ImageEvaluation {
  std::vector<double> residuals;
  std::vector<double> jacobian;  // row-major [n_residuals, k]
  std::vector<ResidualLabel> labels;
  std::vector<double> intensity_prf;  // per reflection of the image (NaN if not integrated)
  double cost = 0.0;                  // Ceres cost 1/2 sum rho(r^2), loss functions applied
  int k = 3;
};
ImageEvaluation evaluate_image(const ShoeboxSetView& set, int64_t image,
                               const RefineOptions& options, const ImageParameters& params,
                               const ImageParameters& held, int passes);

// Checks the options against the set (per-crystal vectors, names, ranges).
void validate_options(const RefineOptions& options, const ShoeboxSetView& set);

// Refines one image and writes its row of results and its reflections' rows.
void refine_image(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                  const ResultsView& out);

// Refines images [first, last) on n_threads threads (each image independent).
void refine_images(const ShoeboxSetView& set, const RefineOptions& options, int64_t first,
                   int64_t last, int n_threads, const ResultsView& out);

// The refinement's model of every pixel of one image's shoeboxes at the parameters in `out`
// (a refinement's results): expected counts mu_p = bg_p + A P_p (A = J_model where the image
// is scaled and the reflection has a reference, else the fitted J) and model variance v_p;
// NaN where a reflection is not integrated and on masked pixels.
void model_counts(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                  const ResultsView& results, double* mu, double* variance);

// Wall time of one Ceres Solve of a one-parameter problem (build + solve), averaged over
// `repeats`: the per-solve overhead beyond the evaluations of a real problem.
double trivial_solve_seconds(int repeats);

}  // namespace pixelrefine
