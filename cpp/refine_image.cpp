#include "refine_image.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include <Eigen/Dense>
#include <ceres/ceres.h>

#include "residuals.h"

namespace pixelrefine {
namespace {

// Starting R1 from the observed second moments of the clearly visible spots (median of
// 2 (M2_obs - a/12)), with the background from the shoebox's outer ring (the ring's share
// of the spot is ignored here; the refinement models it).
double initial_R1(const ImageWork& work) {
  std::vector<double> estimates;
  double fallback = kNaN;
  for (const ReflectionFit& rf : work.reflections) {
    if (rf.pixel_end == rf.pixel_begin || (rf.flags & kBadPrediction)) continue;
    if (std::isnan(fallback)) fallback = std::sqrt(2.0 * rf.a_mean);
    double S = 0.0, noise = 0.0, m2 = 0.0;
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
      S += work.signal[i];
      noise += std::max(work.counts[i], 1.0) + work.read_noise_sq[i];
      m2 += work.signal[i] * 0.5 * work.eps_sq[i];
    }
    if (S < 5.0 * std::sqrt(noise)) continue;
    const double r1_sq = 2.0 * (m2 / S - rf.a_mean / 12.0);
    if (r1_sq > 0.0) estimates.push_back(std::sqrt(r1_sq));
  }
  if (estimates.empty()) return fallback;
  std::nth_element(estimates.begin(), estimates.begin() + estimates.size() / 2, estimates.end());
  return estimates[estimates.size() / 2];
}

// Starting G: weighted least squares of J against B_term p pol I_ref (weights 1/var J), with
// J from the last update_weights.
double initial_G(const ImageWork& work, const ImageParameters& params) {
  double num = 0.0, den = 0.0;
  for (const ReflectionFit& rf : work.reflections) {
    if (!rf.use_intensity) continue;
    const double K = intensity_model(1.0, params.B, rf.pred.d, rf.partiality, rf.pred.polarization,
                                     rf.intensity_ref);
    num += rf.J * K / rf.J_variance;
    den += K * K / rf.J_variance;
  }
  const double G = num / den;
  return std::isfinite(G) && G > 0.0 ? G : 1.0;
}

struct ParameterBlocks {
  double G, B, R1, omega[3], shift;
  void load(const ImageParameters& p) {
    G = p.G;
    B = p.B;
    R1 = p.R1;
    std::copy(p.rotation, p.rotation + 3, omega);
    shift = p.detector_shift;
  }
  void store(ImageParameters& p) const {
    p.G = G;
    p.B = B;
    p.R1 = R1;
    std::copy(omega, omega + 3, p.rotation);
    p.detector_shift = shift;
  }
  // Scalar values in covariance order: G, B, R1, omega, shift.
  void values(double v[7]) const {
    v[0] = G, v[1] = B, v[2] = R1, v[3] = omega[0], v[4] = omega[1], v[5] = omega[2], v[6] = shift;
  }
};

// One Ceres context per thread, reused by every problem the thread solves.
ceres::Context* thread_context() {
  thread_local std::unique_ptr<ceres::Context> context(ceres::Context::Create());
  return context.get();
}

// Levenberg-Marquardt with a dense QR on a handful of parameters, one thread, silent.
ceres::Solver::Options make_solver_options(const RefineOptions& options) {
  ceres::Solver::Options solver_options;
  solver_options.linear_solver_type = ceres::DENSE_QR;
  solver_options.max_num_iterations = options.max_iterations;
  solver_options.logging_type = ceres::SILENT;
  solver_options.minimizer_progress_to_stdout = false;
  solver_options.num_threads = 1;
  solver_options.function_tolerance = 1e-7;
  solver_options.parameter_tolerance = 1e-8;
  solver_options.gradient_tolerance = 1e-12;
  return solver_options;
}

ceres::LossFunction* make_loss(const RefineOptions& options) {
  if (options.loss == "huber") return new ceres::HuberLoss(options.loss_scale);
  if (options.loss == "cauchy") return new ceres::CauchyLoss(options.loss_scale);
  return nullptr;
}

// Adds every residual block of the chosen objective. The functors point into `work`, whose
// weights are re-evaluated between solves; the problem is built once per image.
void build_problem(ceres::Problem& problem, ImageWork& work, ParameterBlocks& x,
                   const ImageParameters& params, const RefineOptions& options,
                   std::vector<ResidualLabel>* labels = nullptr) {
  auto label = [&](ResidualTerm term, int64_t row, int count) {
    if (labels) labels->insert(labels->end(), count, ResidualLabel{term, row});
  };
  const bool factored = options.objective == "factored";
  problem.AddParameterBlock(&x.G, 1);
  problem.AddParameterBlock(&x.B, 1);
  problem.AddParameterBlock(&x.R1, 1);
  if (options.refine_geometry) {
    problem.AddParameterBlock(x.omega, 3);
    problem.AddParameterBlock(&x.shift, 1);
    problem.AddResidualBlock(
        new ceres::AutoDiffCostFunction<RotationPrior, 3, 3>(new RotationPrior(options.sigma_rotation)),
        nullptr, x.omega);
    label(kPriorTerm, -1, 3);
    problem.AddResidualBlock(new ceres::AutoDiffCostFunction<ScalarPrior, 1, 1>(
                                 new ScalarPrior(0.0, options.sigma_shift)),
                             nullptr, &x.shift);
    label(kPriorTerm, -1, 1);
  }
  if (std::isfinite(options.sigma_G)) {
    problem.AddResidualBlock(
        new ceres::AutoDiffCostFunction<ScalarPrior, 1, 1>(new ScalarPrior(1.0, options.sigma_G)),
        nullptr, &x.G);
    label(kPriorTerm, -1, 1);
  }
  for (ReflectionFit& rf : work.reflections) {
    if (rf.pixel_end == rf.pixel_begin || (rf.flags & kBadPrediction)) continue;
    if (!factored) {
      if (rf.flags & kNoReference) continue;
      for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
        problem.AddResidualBlock(new ceres::AutoDiffCostFunction<PixelResidual, 1, 1, 1, 1>(
                                     new PixelResidual(&work, &rf, i)),
                                 make_loss(options), &x.G, &x.B, &x.R1);
        label(kPixelTerm, rf.row, 1);
      }
      continue;
    }
    if (options.refine_geometry) {
      problem.AddResidualBlock(
          new ceres::AutoDiffCostFunction<ReflectionGeometryResidual, 2, 1, 1, 1, 3>(
              new ReflectionGeometryResidual(&work, &rf, params.R0, options.eta)),
          nullptr, &x.G, &x.B, &x.R1, x.omega);
    } else {
      problem.AddResidualBlock(new ceres::AutoDiffCostFunction<ReflectionResidual, 2, 1, 1, 1>(
                                   new ReflectionResidual(&work, &rf)),
                               nullptr, &x.G, &x.B, &x.R1);
    }
    label(kIntensityTerm, rf.row, 1);
    label(kShapeTerm, rf.row, 1);
    if (options.refine_geometry) {
      problem.AddResidualBlock(new ceres::AutoDiffCostFunction<PositionResidual, 2, 3, 1>(
                                   new PositionResidual(&work, &rf)),
                               nullptr, x.omega, &x.shift);
      label(kPositionTerm, rf.row, 2);
    }
  }
}

// The physical bounds G > 0, R1 > 0, B in [B_min, B_max]. They are set only when an
// unbounded solve leaves them: with bounds Ceres runs a projected line search in every
// iteration (extra evaluations), which the usual image does not need.
constexpr double kPositive = 1e-12;
bool within_bounds(const ParameterBlocks& x, const RefineOptions& options) {
  return x.G > kPositive && x.R1 > kPositive && x.B >= options.B_min && x.B <= options.B_max;
}
void set_bounds(ceres::Problem& problem, ParameterBlocks& x, const RefineOptions& options) {
  problem.SetParameterLowerBound(&x.G, 0, kPositive);
  problem.SetParameterLowerBound(&x.R1, 0, kPositive);
  problem.SetParameterLowerBound(&x.B, 0, options.B_min);
  problem.SetParameterUpperBound(&x.B, 0, options.B_max);
}

// Covariance (J^T J)^-1 of the free scalar parameters from the problem's Jacobian at the
// current values. Returns false when J^T J is singular. Rows/columns of constant blocks are NaN.
bool covariance_from_jacobian(ceres::Problem& problem, ParameterBlocks& x, int k, bool r1_free,
                              Eigen::MatrixXd& covariance) {
  std::vector<double*> blocks = {&x.G, &x.B, &x.R1};
  std::vector<int> columns = {0, 1, 2};
  if (!r1_free) {
    blocks = {&x.G, &x.B};
    columns = {0, 1};
  }
  if (k == 7) {
    blocks.push_back(x.omega);
    blocks.push_back(&x.shift);
    for (int c = 3; c < 7; ++c) columns.push_back(c);
  }
  ceres::Problem::EvaluateOptions eval;
  eval.parameter_blocks = blocks;
  ceres::CRSMatrix jac;
  double cost;
  if (!problem.Evaluate(eval, &cost, nullptr, nullptr, &jac)) return false;
  const int n = int(columns.size());
  Eigen::MatrixXd H = Eigen::MatrixXd::Zero(n, n);
  for (int row = 0; row < jac.num_rows; ++row) {
    for (int a = jac.rows[row]; a < jac.rows[row + 1]; ++a) {
      for (int b = jac.rows[row]; b < jac.rows[row + 1]; ++b) {
        H(jac.cols[a], jac.cols[b]) += jac.values[a] * jac.values[b];
      }
    }
  }
  covariance = Eigen::MatrixXd::Constant(k, k, kNaN);
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(H);
  if (eig.info() != Eigen::Success) return false;
  const Eigen::VectorXd lambda = eig.eigenvalues();
  if (!(lambda.minCoeff() > 1e-12 * lambda.maxCoeff()) || !(lambda.maxCoeff() > 0.0)) return false;
  const Eigen::MatrixXd inverse =
      eig.eigenvectors() * lambda.cwiseInverse().asDiagonal() * eig.eigenvectors().transpose();
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) covariance(columns[a], columns[b]) = inverse(a, b);
  return true;
}

// Per-reflection outputs from the state of the last update_weights (at the final parameters).
void write_reflection_outputs(const ImageWork& work, const ImageParameters& params, bool scaled,
                              const ResultsView& out) {
  for (const ReflectionFit& rf : work.reflections) {
    const int64_t r = rf.row;
    out.partiality[r] = rf.partiality;
    out.excitation_error[r] = rf.pred.excitation_error;
    out.d[r] = rf.pred.d;
    out.xyzcal[2 * r] = rf.pred.x;
    out.xyzcal[2 * r + 1] = rf.pred.y;
    out.flags[r] = rf.flags | (scaled ? 0 : kNotRefined);
    const bool integrated = rf.pixel_end > rf.pixel_begin && !(rf.flags & kBadPrediction);
    const double J = integrated ? rf.J : kNaN;
    const double sigma = integrated ? std::sqrt(rf.J_variance) : kNaN;
    out.intensity_prf[r] = J;
    out.intensity_prf_sigma[r] = sigma;
    out.xyzobs[2 * r] = integrated ? rf.x_obs : kNaN;
    out.xyzobs[2 * r + 1] = integrated ? rf.y_obs : kNaN;
    out.m2_obs[r] = integrated ? rf.m2_obs : kNaN;
    out.background[r] = integrated ? model_background(rf, J) : kNaN;
    // intensity_scaled = J / (G B_term p pol)
    const double correction =
        scaled ? intensity_model(params.G, params.B, rf.pred.d, rf.partiality, rf.pred.polarization, 1.0)
               : kNaN;
    out.intensity_scaled[r] = J / correction;
    out.intensity_scaled_sigma[r] = sigma / correction;
  }
}

}  // namespace

void validate_options(const RefineOptions& options, const ShoeboxSetView& set) {
  if (options.objective != "factored" && options.objective != "pixel")
    throw std::invalid_argument("objective must be 'factored' or 'pixel', not '" +
                                options.objective + "'");
  if (options.objective == "pixel" && options.refine_geometry)
    throw std::invalid_argument("refine_geometry needs the factored objective (Term 3)");
  if (options.loss != "none" && options.loss != "huber" && options.loss != "cauchy")
    throw std::invalid_argument("loss must be 'none', 'huber' or 'cauchy', not '" + options.loss + "'");
  if (options.loss != "none" && options.objective != "pixel")
    throw std::invalid_argument("a robust loss applies to the pixel objective only");
  if (!(options.loss_scale > 0.0)) throw std::invalid_argument("loss_scale must be > 0");
  for (int64_t i = 0; i < set.n_images; ++i) {
    const int32_t c = set.crystal_index[i];
    if (c >= int32_t(options.R0.size()))
      throw std::invalid_argument("R0 has no value for crystal index " + std::to_string(c));
  }
  for (double r0 : options.R0)
    if (!(r0 >= 0.0) || !std::isfinite(r0)) throw std::invalid_argument("R0 must be finite and >= 0");
  if (!(options.eta >= 0.0) || !std::isfinite(options.eta))
    throw std::invalid_argument("eta must be finite and >= 0");
  if (!(options.sigma_G > 0.0)) throw std::invalid_argument("sigma_G must be > 0 (inf = no prior)");
  if (!(options.sigma_rotation > 0.0) || !(options.sigma_shift > 0.0))
    throw std::invalid_argument("sigma_rotation and sigma_shift must be > 0");
  if (!(options.reference_sigma_rel >= 0.0))
    throw std::invalid_argument("reference_sigma_rel must be >= 0");
  if (options.max_outer < 1 || options.max_iterations < 1)
    throw std::invalid_argument("max_outer and max_iterations must be >= 1");
  if (!(options.B_min < options.B_max)) throw std::invalid_argument("B_min must be < B_max");
  if (options.min_background_pixels < 1 || options.min_valid_pixels < 1)
    throw std::invalid_argument("min_background_pixels and min_valid_pixels must be >= 1");
  if (!(options.variance_floor > 0.0)) throw std::invalid_argument("variance_floor must be > 0");
  if (options.R1_init < 0.0 || options.G_init < 0.0)
    throw std::invalid_argument("R1_init and G_init must be >= 0 (0 = estimate)");
}

void refine_image(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                  const ResultsView& out) {
  ImageWork work;
  setup_image(set, image, options, work);
  ImageParameters params;
  params.R0 = options.R0[set.crystal_index[image]];
  params.B = options.B_init;
  update_geometry(work, params, options.eta);
  params.R1 = options.R1_init > 0.0 ? options.R1_init : initial_R1(work);
  params.G = options.G_init > 0.0 ? options.G_init : 1.0;
  const int k = covariance_size(options);

  int n_usable = 0;
  const bool r1_ok = std::isfinite(params.R1) && params.R1 > 0.0;
  if (r1_ok) {
    update_weights(work, params, options, /*scale_known=*/true);
    if (!(options.G_init > 0.0)) params.G = initial_G(work, params);
    for (const ReflectionFit& rf : work.reflections) n_usable += rf.use_intensity;
  }
  out.n_reflections[image] = n_usable;
  if (n_usable < options.min_reflections || !r1_ok) {
    out.status[image] = kTooFewReflections;
    out.n_iterations[image] = 0;
    out.cost[image] = kNaN;
    out.G[image] = out.B[image] = out.R1[image] = kNaN;
    out.G_sigma[image] = out.B_sigma[image] = out.R1_sigma[image] = kNaN;
    for (int i = 0; i < 3; ++i) out.rotation[3 * image + i] = out.rotation_sigma[3 * image + i] = kNaN;
    out.detector_shift[image] = out.detector_shift_sigma[image] = kNaN;
    std::fill(out.covariance + image * k * k, out.covariance + (image + 1) * k * k, kNaN);
    // Integrate anyway (profile fit at the starting R1, weights from the observed J), unscaled.
    if (r1_ok) {
      update_weights(work, params, options, /*scale_known=*/false);
      update_weights(work, params, options, /*scale_known=*/false);
    }
    write_reflection_outputs(work, params, /*scaled=*/false, out);
    return;
  }

  ParameterBlocks x;
  x.load(params);
  BackgroundProfileCallback background_profile(&work, &x.R1);
  ceres::Problem::Options problem_options;
  if (options.objective == "pixel") problem_options.evaluation_callback = &background_profile;
  problem_options.context = thread_context();
  ceres::Problem problem(problem_options);
  build_problem(problem, work, x, params, options);

  const ceres::Solver::Options solver_options = make_solver_options(options);

  int status = kNotConverged;
  int iterations = 0;
  double cost = kNaN;
  Eigen::MatrixXd covariance = Eigen::MatrixXd::Constant(k, k, kNaN);
  bool covariance_ok = false;
  bool settled = false;
  bool bounded = false;
  // Weights are evaluated at `held`; each solve gives `params`. The next weights are taken at
  // the new solution, or half-way to it when the step reverses the previous one (a damped
  // fixed-point iteration: reweighting can otherwise alternate between two states).
  ImageParameters held = params;
  double previous_step[7] = {0, 0, 0, 0, 0, 0, 0};
  for (int outer = 0; outer <= options.max_outer; ++outer) {
    // Weights, sigmas and statistics at `held` (fixed within the next solve).
    if (outer > 0 && options.refine_geometry) update_geometry(work, held, options.eta);
    update_weights(work, held, options, /*scale_known=*/true);
    bool new_outliers = false;
    if (options.outlier_sigma > 0.0 && options.objective == "factored") {
      for (ReflectionFit& rf : work.reflections) {
        if (rf.use_intensity && std::abs(rf.intensity_residual) > options.outlier_sigma) {
          rf.flags |= kOutlier;
          rf.use_intensity = false;
          new_outliers = true;
        }
      }
    }
    if (settled && !new_outliers) {
      status = kConverged;
      break;
    }
    if (outer == options.max_outer) break;  // weights are at the final parameters
    int n_shape = 0;
    for (const ReflectionFit& rf : work.reflections) n_shape += rf.use_shape;
    // Without any usable second moment R1 is held (the pixel objective constrains it itself).
    const bool r1_free = options.objective == "pixel" || n_shape > 0;
    if (r1_free) {
      problem.SetParameterBlockVariable(&x.R1);
    } else {
      problem.SetParameterBlockConstant(&x.R1);
    }
    x.load(params);
    ceres::Solver::Summary summary;
    ceres::Solve(solver_options, &problem, &summary);
    iterations += int(summary.iterations.size()) - 1;
    if (!bounded && !within_bounds(x, options)) {
      bounded = true;
      set_bounds(problem, x, options);
      x.load(params);
      ceres::Solve(solver_options, &problem, &summary);
      iterations += int(summary.iterations.size()) - 1;
    }
    cost = summary.final_cost;
    double after[7], before[7];
    x.values(after);
    ParameterBlocks weights_blocks;
    weights_blocks.load(held);
    weights_blocks.values(before);
    bool finite = true;
    for (int i = 0; i < 7; ++i) finite = finite && std::isfinite(after[i]);
    if (summary.termination_type == ceres::FAILURE || !finite) {
      status = kSolverFailure;
      break;
    }
    x.store(params);
    // The covariance at this solve's solution with its weights: the functors' cached pixel
    // sums are at this point already, so this costs no pass over the pixels. It judges the
    // steps, and the last one is reported.
    covariance_ok = covariance_from_jacobian(problem, x, k, r1_free, covariance);
    settled = true;
    double step[7] = {0, 0, 0, 0, 0, 0, 0}, reversal = 0.0;
    for (int i = 0; i < k; ++i) {
      if (i == 2 && !r1_free) continue;
      // Steps in sigmas; without a covariance, relative to the parameter's size.
      const double sigma = covariance_ok ? std::sqrt(covariance(i, i))
                                         : 1e-3 * std::max(std::abs(before[i]), 1e-6);
      step[i] = (after[i] - before[i]) / sigma;
      reversal += step[i] * previous_step[i];
      settled = settled && std::abs(step[i]) <= options.outer_tolerance;
    }
    const bool damp = covariance_ok && !settled && reversal < 0.0;
    held = params;
    if (damp) {
      held.G = 0.5 * (before[0] + after[0]);
      held.B = 0.5 * (before[1] + after[1]);
      held.R1 = 0.5 * (before[2] + after[2]);
      for (int i = 0; i < 3; ++i) held.rotation[i] = 0.5 * (before[3 + i] + after[3 + i]);
      held.detector_shift = 0.5 * (before[6] + after[6]);
      for (double& v : step) v *= 0.5;
    }
    std::copy(step, step + 7, previous_step);
  }

  if (status == kConverged) {
    const bool at_bound = params.G <= kPositive * 1.0001 || params.R1 <= kPositive * 1.0001 ||
                          params.B <= options.B_min + 1e-9 || params.B >= options.B_max - 1e-9;
    if (at_bound) status = kAtBound;
    else if (!covariance_ok) status = kSingularCovariance;
  }
  const bool refined = status != kSolverFailure;
  out.status[image] = status;
  out.n_iterations[image] = iterations;
  out.cost[image] = cost;
  out.G[image] = refined ? params.G : kNaN;
  out.B[image] = refined ? params.B : kNaN;
  out.R1[image] = refined ? params.R1 : kNaN;
  out.G_sigma[image] = std::sqrt(covariance(0, 0));
  out.B_sigma[image] = std::sqrt(covariance(1, 1));
  out.R1_sigma[image] = std::sqrt(covariance(2, 2));
  for (int i = 0; i < 3; ++i) {
    out.rotation[3 * image + i] = options.refine_geometry && refined ? params.rotation[i] : 0.0;
    out.rotation_sigma[3 * image + i] = options.refine_geometry ? std::sqrt(covariance(3 + i, 3 + i)) : kNaN;
  }
  out.detector_shift[image] = options.refine_geometry && refined ? params.detector_shift : 0.0;
  out.detector_shift_sigma[image] = options.refine_geometry ? std::sqrt(covariance(6, 6)) : kNaN;
  for (int a = 0; a < k; ++a)
    for (int b = 0; b < k; ++b) out.covariance[image * k * k + a * k + b] = covariance(a, b);
  write_reflection_outputs(work, params, refined, out);
}

ImageEvaluation evaluate_image(const ShoeboxSetView& set, int64_t image,
                               const RefineOptions& options, const ImageParameters& given,
                               const ImageParameters& weights_at) {
  if (image < 0 || image >= set.n_images) throw std::invalid_argument("image outside the set");
  validate_options(options, set);
  ImageWork work;
  setup_image(set, image, options, work);
  ImageParameters held = weights_at;
  held.R0 = options.R0[set.crystal_index[image]];
  update_geometry(work, held, options.eta);
  update_weights(work, held, options, /*scale_known=*/true);
  update_weights(work, held, options, /*scale_known=*/true);
  ImageParameters params = given;
  params.R0 = held.R0;

  ImageEvaluation result;
  result.k = covariance_size(options);
  ParameterBlocks x;
  x.load(params);
  BackgroundProfileCallback background_profile(&work, &x.R1);
  ceres::Problem::Options problem_options;
  if (options.objective == "pixel") problem_options.evaluation_callback = &background_profile;
  ceres::Problem problem(problem_options);
  build_problem(problem, work, x, params, options, &result.labels);
  std::vector<double*> blocks = {&x.G, &x.B, &x.R1};
  if (options.refine_geometry) {
    blocks.push_back(x.omega);
    blocks.push_back(&x.shift);
  }
  ceres::Problem::EvaluateOptions eval;
  eval.parameter_blocks = blocks;
  ceres::CRSMatrix jac;
  if (!problem.Evaluate(eval, &result.cost, &result.residuals, nullptr, &jac))
    throw std::runtime_error("the problem could not be evaluated at these parameters");
  result.jacobian.assign(size_t(jac.num_rows) * result.k, 0.0);
  for (int row = 0; row < jac.num_rows; ++row)
    for (int a = jac.rows[row]; a < jac.rows[row + 1]; ++a)
      result.jacobian[size_t(row) * result.k + jac.cols[a]] = jac.values[a];
  for (const ReflectionFit& rf : work.reflections)
    result.intensity_prf.push_back(rf.pixel_end > rf.pixel_begin ? rf.J : kNaN);
  return result;
}

void refine_images(const ShoeboxSetView& set, const RefineOptions& options, int64_t first,
                   int64_t last, int n_threads, const ResultsView& out) {
  if (first < 0 || last > set.n_images || first > last)
    throw std::invalid_argument("image range outside the set");
  validate_options(options, set);
  std::atomic<int64_t> next(first);
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&]() {
    for (int64_t image = next++; image < last; image = next++) {
      try {
        refine_image(set, image, options, out);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next = last;
      }
    }
  };
  const int threads = std::max(1, std::min<int>(n_threads, int(last - first)));
  if (threads == 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(worker);
    for (std::thread& t : pool) t.join();
  }
  if (error) std::rethrow_exception(error);
}

void model_counts(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                  const ImageParameters& given, bool scale_known, double* mu, double* variance) {
  ImageWork work;
  setup_image(set, image, options, work);
  ImageParameters params = given;
  params.R0 = options.R0[set.crystal_index[image]];
  update_geometry(work, params, options.eta);
  update_weights(work, params, options, scale_known);
  update_weights(work, params, options, scale_known);
  for (const ReflectionFit& rf : work.reflections) {
    const int32_t* b = rf.bbox;
    const int64_t offset = set.pixel_offset[rf.row];
    const int64_t n = int64_t(b[1] - b[0]) * (b[3] - b[2]);
    const bool integrated = rf.pixel_end > rf.pixel_begin && !(rf.flags & kBadPrediction);
    const double amplitude = rf.amplitude_expected;
    const double background = model_background(rf, std::max(rf.J, 0.0));
    const double inverse_width_sq = 1.0 / profile_width_sq(params.R1, rf.a_mean);
    const double read_noise_sq = rf.panel->read_noise * rf.panel->read_noise;
    for (int64_t t = 0; t < n; ++t) {
      if (!integrated) {
        mu[offset + t] = variance[offset + t] = kNaN;
        continue;
      }
      const double x = b[0] + t % (b[1] - b[0]) + 0.5, y = b[2] + t / (b[1] - b[0]) + 0.5;
      double eps_t[2], area;
      tangential_offset(*rf.panel, rf.pred, work.wavelength, params.detector_shift, x, y, eps_t,
                        &area);
      const double P = profile_density(eps_t[0] * eps_t[0] + eps_t[1] * eps_t[1], area,
                                        inverse_width_sq);
      mu[offset + t] = background + amplitude * P;
      variance[offset + t] =
          std::max(std::max(background, 0.0) + amplitude * P + read_noise_sq, options.variance_floor);
    }
  }
}

double trivial_solve_seconds(int repeats) {
  // r = x - 1 on one parameter, solved from x = 0 (one LM step), with refine_image's solver
  // options and a fresh problem each time, as refine_image builds one per image.
  const ceres::Solver::Options solver_options = make_solver_options(RefineOptions{});
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < repeats; ++i) {
    double x = 0.0;
    ceres::Problem::Options problem_options;
    problem_options.context = thread_context();
    ceres::Problem problem(problem_options);
    problem.AddResidualBlock(
        new ceres::AutoDiffCostFunction<ScalarPrior, 1, 1>(new ScalarPrior(1.0, 1.0)), nullptr, &x);
    ceres::Solver::Summary summary;
    ceres::Solve(solver_options, &problem, &summary);
  }
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  return elapsed.count() / std::max(1, repeats);
}

}  // namespace pixelrefine
