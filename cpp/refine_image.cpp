#include "refine_image.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <array>
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

using Matrix = Eigen::MatrixXd;
using Vector = Eigen::VectorXd;

int n_shape_of(const RefineOptions& options) {
  return options.profile == "isotropic" ? 1 : 3;
}

// The per-crystal values of image `image`, and the starting parameters (warm start from the
// result arrays where they are finite).
ImageParameters starting_parameters(const ShoeboxSetView& set, int64_t image,
                                    const RefineOptions& options, const ResultsView& out) {
  const int32_t c = set.crystal_index[image];
  auto value = [&](const std::vector<double>& v, double fallback) {
    return v.empty() ? fallback : v[c];
  };
  ImageParameters p;
  p.R0 = options.R0[c];
  p.eta = value(options.eta, 0.0);
  p.error_scale = value(options.error_scale, 1.0);
  p.reference_error = value(options.reference_error, 0.0);
  p.phi[kShapeTail] = options.profile == "tail" ? value(options.tail_fraction, 0.0) : 0.0;
  p.phi[kShapeTailScale] = value(options.tail_scale, 3.0);
  p.G = std::isfinite(out.G[image]) ? out.G[image] : kNaN;
  p.B = std::isfinite(out.B[image]) ? out.B[image] : 0.0;
  const double* shape = out.shape + kMaxShape * image;
  p.phi[kShapeR1] = std::isfinite(shape[0]) && shape[0] > 0.0 ? shape[0] : kNaN;
  for (int k = kShapeA; k <= kShapeC; ++k)
    p.phi[k] = std::isfinite(shape[k]) && options.profile != "isotropic" ? shape[k] : 0.0;
  if (options.refine_geometry) {
    for (int i = 0; i < 3; ++i)
      p.rotation[i] = std::isfinite(out.rotation[3 * image + i]) ? out.rotation[3 * image + i] : 0.0;
    p.detector_shift = std::isfinite(out.detector_shift[image]) ? out.detector_shift[image] : 0.0;
  }
  return p;
}

// Parameter blocks of the Ceres problem. The factored objective refines the shape as an
// offset dphi from the held shape (Term 2 is linearised there); the per-pixel objective
// refines phi itself and one background block per reflection.
struct ParameterBlocks {
  double G = 1, B = 0;
  double dphi[kMaxShape] = {0, 0, 0, 0, 0};
  double phi[kMaxShape] = {0, 0, 0, 0, 3};
  double omega[3] = {0, 0, 0};
  double shift = 0;
  std::vector<std::array<double, 3>> background;
  void load(const ImageParameters& p) {
    G = p.G;
    B = p.B;
    std::fill(dphi, dphi + kMaxShape, 0.0);
    std::copy(p.phi, p.phi + kMaxShape, phi);
    std::copy(p.rotation, p.rotation + 3, omega);
    shift = p.detector_shift;
  }
  void store(ImageParameters& p, bool factored, int n_shape) const {
    p.G = G;
    p.B = B;
    for (int k = 0; k < n_shape; ++k) p.phi[k] = factored ? p.phi[k] + dphi[k] : phi[k];
    std::copy(omega, omega + 3, p.rotation);
    p.detector_shift = shift;
  }
};

// Values in covariance order: G, B, shape, [omega, shift].
std::vector<double> parameter_vector(const ImageParameters& p, int n_shape, bool geometry) {
  std::vector<double> v = {p.G, p.B};
  for (int k = 0; k < n_shape; ++k) v.push_back(p.phi[k]);
  if (geometry) {
    v.insert(v.end(), p.rotation, p.rotation + 3);
    v.push_back(p.detector_shift);
  }
  return v;
}

// One Ceres context per thread, reused by every problem the thread solves.
ceres::Context* thread_context() {
  thread_local std::unique_ptr<ceres::Context> context(ceres::Context::Create());
  return context.get();
}

ceres::Solver::Options make_solver_options(const RefineOptions& options) {
  ceres::Solver::Options solver_options;
  solver_options.linear_solver_type = ceres::DENSE_QR;
  solver_options.max_num_iterations = options.max_iterations;
  solver_options.logging_type = ceres::SILENT;
  solver_options.minimizer_progress_to_stdout = false;
  solver_options.num_threads = 1;
  solver_options.function_tolerance = 1e-8;
  solver_options.parameter_tolerance = 1e-9;
  solver_options.gradient_tolerance = 1e-12;
  return solver_options;
}

ceres::LossFunction* make_loss(const RefineOptions& options) {
  if (options.loss == "huber") return new ceres::HuberLoss(options.loss_scale);
  if (options.loss == "cauchy") return new ceres::CauchyLoss(options.loss_scale);
  return nullptr;
}

// Whitening W (upper triangular, W'W = (k^2 C + s^2 I)^-1) of one reflection's Term 3.
bool position_whitening(const ReflectionFit& rf, double k, double sigma_px, double w[3]) {
  Eigen::Matrix2d C;
  C << rf.centre_cov[0], rf.centre_cov[1], rf.centre_cov[1], rf.centre_cov[2];
  C = k * k * C + sigma_px * sigma_px * Eigen::Matrix2d::Identity();
  if (!C.allFinite()) return false;
  Eigen::LLT<Eigen::Matrix2d> llt(C.inverse());
  if (llt.info() != Eigen::Success) return false;
  const Eigen::Matrix2d U = llt.matrixU();
  w[0] = U(0, 0);
  w[1] = U(0, 1);
  w[2] = U(1, 1);
  return true;
}

// Covariance from the information matrix H (k x k; rows/columns of fixed parameters zero):
// inverted on its free part, scaled to unit diagonal first so that the singularity test does
// not depend on the units of the parameters (nor of I_ref). False when singular.
bool invert_information(const Matrix& H, const std::vector<bool>& free, Matrix& covariance) {
  const int k = int(H.rows());
  std::vector<int> idx;
  for (int i = 0; i < k; ++i)
    if (free[i]) idx.push_back(i);
  covariance = Matrix::Constant(k, k, kNaN);
  const int n = int(idx.size());
  if (n == 0) return true;
  Matrix Hf(n, n);
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) Hf(a, b) = H(idx[a], idx[b]);
  const Vector d = Hf.diagonal().cwiseMax(0.0).cwiseSqrt();
  if (!(d.minCoeff() > 0.0) || !Hf.allFinite()) return false;
  const Matrix scaled = d.cwiseInverse().asDiagonal() * Hf * d.cwiseInverse().asDiagonal();
  Eigen::SelfAdjointEigenSolver<Matrix> eig(scaled);
  if (eig.info() != Eigen::Success) return false;
  const Vector lambda = eig.eigenvalues();
  if (!(lambda.minCoeff() > 1e-10 * lambda.maxCoeff())) return false;
  const Matrix inverse = d.cwiseInverse().asDiagonal() * eig.eigenvectors() *
                         lambda.cwiseInverse().asDiagonal() * eig.eigenvectors().transpose() *
                         d.cwiseInverse().asDiagonal();
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) covariance(idx[a], idx[b]) = inverse(a, b);
  return true;
}

// The refinement of one image: its work state, its problem and the loop of passes and solves.
class ImageRefinement {
 public:
  ImageRefinement(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                  const ResultsView& out)
      : set_(set), image_(image), options_(options), out_(out),
        factored_(options.objective == "factored"), geometry_(options.refine_geometry),
        n_shape_(n_shape_of(options)), k_(covariance_size(options)) {}

  void run();
  void write() const;

  // For evaluate_image: the state after passes at `held`, then the problem.
  void prepare_at(const ImageParameters& held, int passes);
  ImageEvaluation evaluate(const ImageParameters& params);
  // For model_counts.
  const ImageWork& work() const { return work_; }
  const ImageParameters& held() const { return held_; }
  bool scaled() const { return scale_fit_; }

 private:
  void start();
  void pass(const ImageParameters& at, bool scale_known);
  void update_terms(const ImageParameters& at);
  void build_problem(std::vector<ResidualLabel>* labels = nullptr);
  bool solve(ImageParameters& result);
  Matrix information_at_solution(Matrix* term1_jacobian, std::vector<double>* term1_residuals);
  void compute_covariance(bool final = false);
  void correct_reference_bias(const Matrix& H, const Matrix& term1_jacobian);
  std::vector<double> reference_error_weights() const;
  void regeometrize(const ImageParameters& at);
  bool geometry_moved() const;
  double initial_G() const;
  void diagnostics();
  int decide_status(bool converged) const;
  void global_contributions(const Matrix& term1_jacobian, const std::vector<double>& r1) const;
  bool tail_normal_equations(Matrix& H, Vector& g) const;
  void propagate_tail(const Matrix& Htt, const Matrix& Jt, const std::vector<int>& scale_idx);
  void write_image() const;
  void write_reflections() const;
  double parameter_relative_variance(const ReflectionFit& rf) const;

  const ShoeboxSetView& set_;
  int64_t image_;
  const RefineOptions& options_;
  const ResultsView& out_;
  const bool factored_, geometry_;
  const int n_shape_, k_;

  ImageWork work_;
  ImageParameters held_;
  ImageParameters geometry_at_;  // the geometry the pixels' eps_t were computed at
  bool has_reference_ = false, scale_fit_ = false;
  bool solver_failed_ = false, converged_ = false, not_refined_ = false;
  double G_floor_ = 0.0;  // G's lower bound, once bounds were needed
  std::vector<double> step_history_;  // the largest step of each pass (sigmas)
  int iterations_ = 0, n_outer_ = 0, status_ = kNotConverged;
  double cost_ = kNaN;
  double chi2_pixel_ = kNaN, chi2_intensity_ = kNaN, chi2_shape_ = kNaN, chi2_position_ = kNaN;
  double spot_sd_ = kNaN, box_half_ = kNaN;
  bool poor_fit_ = false;
  int n_term1_ = 0, n_integrated_ = 0;
  Matrix covariance_;
  bool covariance_ok_ = false;
  // The refined tail's (t, s) covariance C_tau (per crystal, given) and the image parameters'
  // sensitivity to it, S = d(params)/d(t, s) (k_ x 2; empty: no tail uncertainty).
  Eigen::Matrix2d tail_covariance_ = Eigen::Matrix2d::Zero();
  Matrix tail_sensitivity_;
  std::vector<std::array<double, 3>> whitening_;
  std::vector<const ReflectionFit*> term1_rows_;
  ParameterBlocks x_;
  std::unique_ptr<ceres::Problem> problem_;
};

// Starting values: geometry, per-reflection starts, the shape from the strong spots' moments
// and a first pass with the summation amplitudes; G by weighted least squares of J on I_ref.
void ImageRefinement::start() {
  setup_image(set_, image_, options_, work_);
  held_ = starting_parameters(set_, image_, options_, out_);
  update_geometry(work_, held_);
  geometry_at_ = held_;
  initialise_reflections(work_, options_);
  for (ReflectionFit& rf : work_.reflections) {  // warm start of the per-reflection state
    const double* delta = out_.centre_offset + 2 * rf.row;
    const double* plane = out_.background_plane + 3 * rf.row;
    if (std::isfinite(delta[0]) && std::isfinite(delta[1])) {
      rf.delta[0] = delta[0];
      rf.delta[1] = delta[1];
    }
    if (std::isfinite(plane[0]) && rf.n_background_parameters > 0) {
      rf.stats.background[0] = plane[0];
      rf.stats.background[1] = std::isfinite(plane[1]) ? plane[1] * rf.box_half : 0.0;
      rf.stats.background[2] = std::isfinite(plane[2]) ? plane[2] * rf.box_half : 0.0;
    }
  }
  if (!std::isfinite(held_.phi[kShapeR1])) initial_shape(work_, held_.phi);
  set_subpixels(work_, subpixels_for_shape(work_, held_.phi));
  int n_reference = 0;
  for (const ReflectionFit& rf : work_.reflections)
    n_reference += !(rf.flags & (kNoReference | kBadPrediction | kTooFewPixels));
  has_reference_ = n_reference >= options_.min_reflections;
  pass(held_, /*scale_known=*/false);
  if (has_reference_ && !std::isfinite(held_.G)) held_.G = initial_G();
  if (!std::isfinite(held_.G)) held_.G = 1.0;
}

// G0 = sum J K / var J / sum K^2 / var J, K = B_term p pol I_ref (any units of I_ref).
double ImageRefinement::initial_G() const {
  double num = 0.0, den = 0.0;
  for (const ReflectionFit& rf : work_.reflections) {
    if (!rf.integrated() || (rf.flags & kNoReference) || !std::isfinite(rf.stats.J)) continue;
    const double K = intensity_model(1.0, held_.B, rf.pred.d, rf.partiality, rf.pred.polarization,
                                     rf.intensity_ref);
    num += rf.stats.J * K / rf.stats.J_variance;
    den += K * K / rf.stats.J_variance;
  }
  const double G = num / den;
  return std::isfinite(G) && G > 0.0 ? G : kNaN;
}

void ImageRefinement::pass(const ImageParameters& at, bool scale_known) {
  fit_reflections(work_, at, options_, scale_known);
  if (geometry_) linearise_geometry(work_, at);
  update_terms(at);
}

// Term gates and held sigmas at `at`: Term 1's sigma and its outliers (re-decided every pass),
// Term 2 where J > 0, Term 3's whitening.
void ImageRefinement::update_terms(const ImageParameters& at) {
  const double k = at.error_scale, f = at.reference_error;
  int usable = 0;
  whitening_.assign(work_.reflections.size(), {0.0, 0.0, 0.0});
  for (size_t r = 0; r < work_.reflections.size(); ++r) {
    ReflectionFit& rf = work_.reflections[r];
    rf.use_intensity = rf.use_shape = rf.use_position = false;
    rf.intensity_residual = 0.0;
    if (!rf.integrated() || !std::isfinite(rf.stats.J)) {
      rf.flags &= ~kOutlier;
      continue;
    }
    // Term 2 from spots whose centre is known to a fraction of their width: the profile of a
    // spot centred on its own noise looks narrower than it is (METHODS.md §I.8).
    // Nor from boxes where pixels were left out: what is left of a neighbour's spot or a zinger
    // would widen the shape (and fake a tail).
    rf.use_shape = rf.stats.shape_ok && rf.centre_sd_px <= 0.3 * work_.spot_sd_px &&
                   !(rf.flags & kForeignLight);
    // Term 3 from spots whose centre the data fix (to 0.25 px per axis): a weak spot's centre
    // follows the prediction it is fitted about and would feed the geometry back on itself.
    if (geometry_ && std::isfinite(rf.centre_px[0]) && rf.centre_cov[0] + rf.centre_cov[2] < 0.125)
      rf.use_position = position_whitening(rf, k, work_.position_sigma_px, whitening_[r].data());
    if (!has_reference_ || (rf.flags & kNoReference)) {
      rf.flags &= ~kOutlier;
      continue;
    }
    const double j_model = model_intensity(rf, at);
    rf.sigma_intensity = std::sqrt(k * k * model_J_variance(rf.stats, j_model) + f * f * j_model * j_model);
    if (!(rf.sigma_intensity > 0.0) || !std::isfinite(rf.sigma_intensity) || !std::isfinite(j_model))
      continue;
    rf.intensity_residual = (rf.stats.J - j_model) / rf.sigma_intensity;
    // Re-decided every pass, with hysteresis (out above outlier_sigma, back in below 0.8 of
    // it) so that the decisions settle; one that still goes out and in again (a reflection
    // the image's geometry fits when it is in and misses when it is out) stays out.
    const bool was_out = rf.flags & kOutlier;
    const double limit = (was_out ? 0.8 : 1.0) * options_.outlier_sigma;
    const bool out = rf.outlier_switches >= 3 ||
                     (options_.outlier_sigma > 0.0 && std::abs(rf.intensity_residual) > limit);
    rf.outlier_switches += out != was_out;
    rf.flags &= ~kOutlier;
    if (out) {
      rf.flags |= kOutlier;
      continue;
    }
    rf.use_intensity = true;
    ++usable;
  }
  scale_fit_ = has_reference_ && usable >= options_.min_reflections;
}

void ImageRefinement::build_problem(std::vector<ResidualLabel>* labels) {
  auto label = [&](ResidualTerm term, int64_t row, int count) {
    if (labels) labels->insert(labels->end(), count, ResidualLabel{term, row});
  };
  ceres::Problem::Options problem_options;
  problem_options.context = thread_context();
  problem_ = std::make_unique<ceres::Problem>(problem_options);
  ceres::Problem& problem = *problem_;
  problem.AddParameterBlock(&x_.G, 1);
  problem.AddParameterBlock(&x_.B, 1);
  double* shape = factored_ ? x_.dphi : x_.phi;
  problem.AddParameterBlock(shape, n_shape_);
  if (geometry_) {
    problem.AddParameterBlock(x_.omega, 3);
    problem.AddParameterBlock(&x_.shift, 1);
    problem.AddResidualBlock(new ceres::AutoDiffCostFunction<RotationPrior, 3, 3>(
                                 new RotationPrior(options_.sigma_rotation)), nullptr, x_.omega);
    label(kPriorTerm, -1, 3);
    problem.AddResidualBlock(new ceres::AutoDiffCostFunction<ScalarPrior, 1, 1>(
                                 new ScalarPrior(0.0, options_.sigma_shift)), nullptr, &x_.shift);
    label(kPriorTerm, -1, 1);
  }
  const int32_t crystal = set_.crystal_index[image_];
  if (std::isfinite(options_.sigma_G) && !options_.G_prior.empty() && options_.G_prior[crystal] > 0.0) {
    const double centre = options_.G_prior[crystal];
    problem.AddResidualBlock(new ceres::AutoDiffCostFunction<ScalarPrior, 1, 1>(
                                 new ScalarPrior(centre, options_.sigma_G * centre)), nullptr, &x_.G);
    label(kPriorTerm, -1, 1);
  }
  term1_rows_.clear();
  x_.background.assign(work_.reflections.size(), {0.0, 0.0, 0.0});
  for (size_t r = 0; r < work_.reflections.size(); ++r) {
    ReflectionFit& rf = work_.reflections[r];
    if (rf.pixel_end == rf.pixel_begin || (rf.flags & kBadPrediction)) continue;
    if (!factored_) {
      if (rf.flags & kNoReference) continue;
      double* b = x_.background[r].data();
      const int nb = rf.n_background_parameters == 3 ? 3 : 1;
      for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
        ceres::CostFunction* cost;
        if (n_shape_ == 1 && nb == 1)
          cost = new ceres::AutoDiffCostFunction<PixelResidual<1, 1>, 1, 1, 1, 1, 1>(
              new PixelResidual<1, 1>(&work_, &rf, i, held_.phi));
        else if (n_shape_ == 1)
          cost = new ceres::AutoDiffCostFunction<PixelResidual<1, 3>, 1, 1, 1, 1, 3>(
              new PixelResidual<1, 3>(&work_, &rf, i, held_.phi));
        else if (nb == 1)
          cost = new ceres::AutoDiffCostFunction<PixelResidual<3, 1>, 1, 1, 1, 3, 1>(
              new PixelResidual<3, 1>(&work_, &rf, i, held_.phi));
        else
          cost = new ceres::AutoDiffCostFunction<PixelResidual<3, 3>, 1, 1, 1, 3, 3>(
              new PixelResidual<3, 3>(&work_, &rf, i, held_.phi));
        problem.AddResidualBlock(cost, make_loss(options_), &x_.G, &x_.B, x_.phi, b);
        label(kPixelTerm, rf.row, 1);
      }
      if (rf.n_background_parameters == 0) problem.SetParameterBlockConstant(b);
      continue;
    }
    if (geometry_) {
      problem.AddResidualBlock(new ceres::AutoDiffCostFunction<IntensityGeometryResidual, 1, 1, 1, 3>(
                                   new IntensityGeometryResidual(&rf)),
                               nullptr, &x_.G, &x_.B, x_.omega);
    } else {
      problem.AddResidualBlock(new ceres::AutoDiffCostFunction<IntensityResidual, 1, 1, 1>(
                                   new IntensityResidual(&rf)), nullptr, &x_.G, &x_.B);
    }
    label(kIntensityTerm, rf.row, 1);
    term1_rows_.push_back(&rf);
    if (n_shape_ == 1)
      problem.AddResidualBlock(new ceres::AutoDiffCostFunction<ShapeResidual<1>, 1, 1>(
                                   new ShapeResidual<1>(&rf, &held_.error_scale)), nullptr, x_.dphi);
    else
      problem.AddResidualBlock(new ceres::AutoDiffCostFunction<ShapeResidual<3>, 3, 3>(
                                   new ShapeResidual<3>(&rf, &held_.error_scale)), nullptr, x_.dphi);
    label(kShapeTerm, rf.row, n_shape_);
    if (geometry_) {
      problem.AddResidualBlock(new ceres::AutoDiffCostFunction<PositionResidual, 2, 3, 1>(
                                   new PositionResidual(&rf, whitening_[r].data())),
                               nullptr, x_.omega, &x_.shift);
      label(kPositionTerm, rf.row, 2);
    }
  }
}

// One solve from the held parameters (the functors read the pass's statistics). Bounds are set
// only when an unbounded solve leaves them: Ceres 2.1 runs a projected line search in every
// iteration of a bounded problem. Returns false on a solver failure.
bool ImageRefinement::solve(ImageParameters& result) {
  ceres::Problem& problem = *problem_;
  x_.load(held_);
  if (!factored_)
    for (size_t r = 0; r < work_.reflections.size(); ++r) {
      const ReflectionStatistics& st = work_.reflections[r].stats;
      x_.background[r] = {st.background[0], st.background[1], st.background[2]};
    }
  if (scale_fit_) {
    problem.SetParameterBlockVariable(&x_.G);
    problem.SetParameterBlockVariable(&x_.B);
  } else {
    problem.SetParameterBlockConstant(&x_.G);
    problem.SetParameterBlockConstant(&x_.B);
  }
  ceres::Solver::Options solver_options = make_solver_options(options_);
  if (!factored_) {
    solver_options.linear_solver_type = ceres::DENSE_SCHUR;
    auto ordering = std::make_shared<ceres::ParameterBlockOrdering>();
    for (auto& b : x_.background) ordering->AddElementToGroup(b.data(), 0);
    ordering->AddElementToGroup(&x_.G, 1);
    ordering->AddElementToGroup(&x_.B, 1);
    ordering->AddElementToGroup(x_.phi, 1);
    solver_options.linear_solver_ordering = ordering;
  }
  const double* shape = factored_ ? x_.dphi : x_.phi;
  auto inside = [&]() {
    const double r1 = factored_ ? held_.phi[0] + shape[0] : shape[0];
    bool ok = x_.G > 0.0 && x_.B >= options_.B_min && x_.B <= options_.B_max && r1 > 0.0;
    for (int k = 1; k < n_shape_; ++k) ok = ok && std::abs(factored_ ? held_.phi[k] + shape[k] : shape[k]) <= 3.0;
    return ok;
  };
  ceres::Solver::Summary summary;
  ceres::Solve(solver_options, &problem, &summary);
  iterations_ += int(summary.iterations.size()) - 1;
  if (summary.termination_type == ceres::FAILURE) return false;
  if (!inside()) {
    const double G_floor = 1e-9 * std::abs(held_.G);
    G_floor_ = std::max(G_floor_, G_floor);
    if (scale_fit_) {
      problem.SetParameterLowerBound(&x_.G, 0, G_floor);
      problem.SetParameterLowerBound(&x_.B, 0, options_.B_min);
      problem.SetParameterUpperBound(&x_.B, 0, options_.B_max);
    }
    double* s = factored_ ? x_.dphi : x_.phi;
    const double offset0 = factored_ ? held_.phi[0] : 0.0;
    // Per pass R1 may shrink to half or grow to double; a, c stay within |3|.
    problem.SetParameterLowerBound(s, 0, 0.5 * held_.phi[0] - offset0);
    problem.SetParameterUpperBound(s, 0, 2.0 * held_.phi[0] - offset0);
    for (int k = 1; k < n_shape_; ++k) {
      const double offset = factored_ ? held_.phi[k] : 0.0;
      problem.SetParameterLowerBound(s, k, -3.0 - offset);
      problem.SetParameterUpperBound(s, k, 3.0 - offset);
    }
    x_.load(held_);
    ceres::Solve(solver_options, &problem, &summary);
    iterations_ += int(summary.iterations.size()) - 1;
    if (summary.termination_type == ceres::FAILURE) return false;
  }
  cost_ = summary.final_cost;
  result = held_;
  x_.store(result, factored_, n_shape_);
  for (double v : parameter_vector(result, n_shape_, geometry_))
    if (!std::isfinite(v)) return false;
  return true;
}

// Whether the held geometry moved since the pixels' eps_t were computed (by more than moves a
// spot by ~1e-4 px: 1e-7 rad, 1e-5 mm).
bool ImageRefinement::geometry_moved() const {
  double moved = std::abs(held_.detector_shift - geometry_at_.detector_shift) / 1e-5;
  for (int a = 0; a < 3; ++a)
    moved = std::max(moved, std::abs(held_.rotation[a] - geometry_at_.rotation[a]) / 1e-7);
  return moved > 1.0;
}

// Geometry moved: predictions and eps_t again, each spot's centre kept where it was on the
// detector (delta re-expressed about the new prediction).
void ImageRefinement::regeometrize(const ImageParameters& at) {
  geometry_at_ = at;
  std::vector<std::array<double, 2>> centres(work_.reflections.size());
  for (size_t r = 0; r < work_.reflections.size(); ++r) {
    const ReflectionFit& rf = work_.reflections[r];
    const Eigen::Matrix2d jac = rf.jacobian();
    const Eigen::Vector2d px = jac.inverse() * Eigen::Vector2d(rf.delta[0], rf.delta[1]);
    centres[r] = {rf.pred.x + px(0), rf.pred.y + px(1)};
  }
  update_geometry(work_, at);
  for (size_t r = 0; r < work_.reflections.size(); ++r) {
    ReflectionFit& rf = work_.reflections[r];
    const Eigen::Matrix2d jac = rf.jacobian();
    const Eigen::Vector2d delta = jac * Eigen::Vector2d(centres[r][0] - rf.pred.x, centres[r][1] - rf.pred.y);
    if (delta.allFinite()) {
      rf.delta[0] = delta(0);
      rf.delta[1] = delta(1);
    }
  }
}

// Information matrix (J'J) of the image's parameters at the held point (dphi = 0) in
// covariance order, the per-pixel objective's backgrounds eliminated (Schur complement). Also
// the Term 1 rows of the Jacobian (G, B[, omega, shift] columns) and their residuals.
Matrix ImageRefinement::information_at_solution(Matrix* term1_jacobian, std::vector<double>* r1) {
  x_.load(held_);
  if (!factored_)
    for (size_t r = 0; r < work_.reflections.size(); ++r) {
      const ReflectionStatistics& st = work_.reflections[r].stats;
      x_.background[r] = {st.background[0], st.background[1], st.background[2]};
    }
  ceres::Problem& problem = *problem_;
  std::vector<double*> blocks = {&x_.G, &x_.B, factored_ ? x_.dphi : x_.phi};
  std::vector<int> offsets = {0, 1, 2};
  if (geometry_) {
    blocks.push_back(x_.omega);
    blocks.push_back(&x_.shift);
    offsets.push_back(2 + n_shape_);
    offsets.push_back(5 + n_shape_);
  }
  const int n_main = k_;
  std::vector<int> nuisance_offset(work_.reflections.size(), -1);
  int n_columns = n_main;
  if (!factored_) {
    for (size_t r = 0; r < work_.reflections.size(); ++r) {
      double* b = x_.background[r].data();
      if (!problem.HasParameterBlock(b) || problem.IsParameterBlockConstant(b)) continue;
      blocks.push_back(b);
      nuisance_offset[r] = n_columns;
      n_columns += problem.ParameterBlockSize(b);
    }
  }
  // Constant blocks cannot be listed: G, B when the image is not scaled.
  std::vector<double*> listed;
  std::vector<int> listed_offset;
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (problem.IsParameterBlockConstant(blocks[b])) continue;
    listed.push_back(blocks[b]);
    listed_offset.push_back(b < offsets.size() ? offsets[b] : -1);
  }
  ceres::Problem::EvaluateOptions eval;
  eval.parameter_blocks = listed;
  ceres::CRSMatrix jac;
  std::vector<double> residuals;
  double cost;
  Matrix H = Matrix::Zero(n_main, n_main);
  if (!problem.Evaluate(eval, &cost, &residuals, nullptr, &jac)) return H;
  // Map CRS columns (in listed order) to covariance columns / nuisance columns.
  std::vector<int> column_map;
  for (size_t b = 0; b < listed.size(); ++b) {
    const int size = problem.ParameterBlockSize(listed[b]);
    int base = listed_offset[b];
    if (base < 0) {
      for (size_t r = 0; r < work_.reflections.size(); ++r)
        if (x_.background[r].data() == listed[b]) base = nuisance_offset[r];
    }
    for (int i = 0; i < size; ++i) column_map.push_back(base + i);
  }
  Matrix full = Matrix::Zero(n_columns, n_columns);
  if (term1_jacobian) term1_jacobian->setZero(int(term1_rows_.size()), n_main);
  if (r1) r1->assign(term1_rows_.size(), 0.0);
  // Residual order: priors first, then per reflection (Term 1, Term 2[, Term 3]) or pixels.
  int prior_rows = (geometry_ ? 4 : 0);
  const int32_t crystal = set_.crystal_index[image_];
  if (std::isfinite(options_.sigma_G) && !options_.G_prior.empty() && options_.G_prior[crystal] > 0.0)
    prior_rows += 1;
  const int per_reflection = 1 + n_shape_ + (geometry_ ? 2 : 0);
  for (int row = 0; row < jac.num_rows; ++row) {
    for (int a = jac.rows[row]; a < jac.rows[row + 1]; ++a)
      for (int b = jac.rows[row]; b < jac.rows[row + 1]; ++b)
        full(column_map[jac.cols[a]], column_map[jac.cols[b]]) += jac.values[a] * jac.values[b];
    if (factored_ && term1_jacobian && row >= prior_rows && (row - prior_rows) % per_reflection == 0) {
      const int t = (row - prior_rows) / per_reflection;
      (*r1)[t] = residuals[row];
      for (int a = jac.rows[row]; a < jac.rows[row + 1]; ++a)
        (*term1_jacobian)(t, column_map[jac.cols[a]]) = jac.values[a];
    }
  }
  H = full.topLeftCorner(n_main, n_main);
  if (n_columns > n_main) {  // eliminate each reflection's background (they do not interact)
    for (size_t r = 0; r < work_.reflections.size(); ++r) {
      if (nuisance_offset[r] < 0) continue;
      const int o = nuisance_offset[r];
      const int nb = problem.ParameterBlockSize(x_.background[r].data());
      const Matrix Hbb = full.block(o, o, nb, nb);
      const Matrix Hmb = full.block(0, o, n_main, nb);
      Eigen::LDLT<Matrix> ldlt(Hbb);
      H -= Hmb * ldlt.solve(Hmb.transpose());
    }
  }
  return H;
}

void ImageRefinement::compute_covariance(bool final) {
  std::vector<bool> free(k_, true);
  if (!scale_fit_) free[0] = free[1] = false;
  Matrix term1_jacobian;
  std::vector<double> r1;
  const Matrix H = information_at_solution(&term1_jacobian, &r1);
  covariance_ok_ = invert_information(H, free, covariance_);
  if (!covariance_ok_ || !factored_ || !scale_fit_) {
    global_contributions(term1_jacobian, r1);
    return;
  }
  // The scale's J is the fit at the held shape: propagate the shape's uncertainty into G, B
  // (and the geometry) through dJ/dphi: C_tt += D C_ss D', C_ts = D C_ss, with
  // D = -H_tt^-1 J_t' dr1/dphi (METHODS.md §I.11).
  std::vector<int> scale_idx = {0, 1};
  if (geometry_)
    for (int i = 2 + n_shape_; i < k_; ++i) scale_idx.push_back(i);
  const int nt = int(scale_idx.size());
  Matrix Jt(term1_rows_.size(), nt), Js(term1_rows_.size(), n_shape_);
  for (size_t t = 0; t < term1_rows_.size(); ++t) {
    const ReflectionFit& rf = *term1_rows_[t];
    for (int a = 0; a < nt; ++a) Jt(t, a) = term1_jacobian(t, scale_idx[a]);
    for (int s = 0; s < n_shape_; ++s)
      Js(t, s) = rf.use_intensity ? rf.stats.dJ_dphi[s] / rf.sigma_intensity : 0.0;
  }
  Matrix Htt(nt, nt);
  for (int a = 0; a < nt; ++a)
    for (int b = 0; b < nt; ++b) Htt(a, b) = H(scale_idx[a], scale_idx[b]);
  const Matrix D = -Htt.ldlt().solve(Jt.transpose() * Js);
  const Matrix Css = covariance_.block(2, 2, n_shape_, n_shape_);
  const Matrix add = D * Css * D.transpose(), cross = D * Css;
  for (int a = 0; a < nt; ++a) {
    for (int b = 0; b < nt; ++b) covariance_(scale_idx[a], scale_idx[b]) += add(a, b);
    for (int s = 0; s < n_shape_; ++s) {
      covariance_(scale_idx[a], 2 + s) = cross(a, s);
      covariance_(2 + s, scale_idx[a]) = cross(a, s);
    }
  }
  propagate_tail(Htt, Jt, scale_idx);
  global_contributions(term1_jacobian, r1);
  if (final) correct_reference_bias(H, term1_jacobian);
}

// The per-crystal tail (t, s) is held in the image's fit; its uncertainty C_tau (from the
// crystal's summed tail curvature) moves the image's parameters through the shape and the Js:
// dphi/dtau = -H_phiphi^-1 H_phitau (the shape's normal equations, extended by the tail),
// dJ/dtau = dJ/dtau|_phi + dJ/dphi dphi/dtau, dtheta/dtau = -H_tt^-1 J_t' (dJ/dtau / sigma_1);
// C += S C_tau S' with S = (dtheta/dtau, dphi/dtau) (METHODS.md §I.11).
void ImageRefinement::propagate_tail(const Matrix& Htt, const Matrix& Jt,
                                     const std::vector<int>& scale_idx) {
  tail_sensitivity_.resize(0, 0);
  const int32_t crystal = set_.crystal_index[image_];
  if (work_.profile_model != ProfileModel::kTail || options_.tail_covariance.empty()) return;
  const double* c = &options_.tail_covariance[3 * crystal];
  tail_covariance_ << c[0], c[1], c[1], c[2];
  if (tail_covariance_.isZero(0.0)) return;
  const int ns = n_shape_;
  Matrix H;
  Vector g;
  if (!tail_normal_equations(H, g)) return;
  Eigen::LDLT<Matrix> shape(H.topLeftCorner(ns, ns));
  const Matrix dphi_dtau = -shape.solve(H.topRightCorner(ns, 2));
  if (shape.info() != Eigen::Success || !dphi_dtau.allFinite()) return;
  Matrix Jtau = Matrix::Zero(term1_rows_.size(), 2);
  for (size_t t = 0; t < term1_rows_.size(); ++t) {
    const ReflectionFit& rf = *term1_rows_[t];
    if (!rf.use_intensity) continue;
    for (int j = 0; j < 2; ++j) {
      double total = rf.stats.dJ_dtail[j];
      for (int s = 0; s < ns; ++s) total += rf.stats.dJ_dphi[s] * dphi_dtau(s, j);
      Jtau(t, j) = total / rf.sigma_intensity;
    }
  }
  const Matrix D = -Htt.ldlt().solve(Jt.transpose() * Jtau);
  Matrix S = Matrix::Zero(k_, 2);
  for (size_t a = 0; a < scale_idx.size(); ++a) S.row(scale_idx[a]) = D.row(a);
  S.block(2, 0, ns, 2) = dphi_dtau;
  if (!S.allFinite()) return;
  covariance_ += S * tail_covariance_ * S.transpose();
  tail_sensitivity_ = S;
}

// The scale's bias from the reference's own error, removed. With a multiplicative error
// I_ref = I_true (1 + e), E e = 0, E e^2 = f^2, the estimating equation
// sum dJm/dtheta (J - Jm)/s^2 = 0 (Jm = J0 (1 + e), s^2 = a + f^2 Jm^2) has at the true theta the
// expectation sum_h J0 dJ0/dtheta m_h, m_h = E_e[-e (1 + e)/(a + f^2 J0^2 (1 + e)^2)]: to second
// order f^2 (2q - 1)/s^2 with q = f^2 Jm^2/s^2 the reference's share of the variance (a ratio
// estimate, q = 1, is biased by +f^2, a regression on the noisy reference, q = 0, by -f^2).
// m_h by 16-point Gauss-Hermite quadrature over a lognormal e (mean 0, variance f^2: exact for
// the skewed positive error a multiplicative reference error is; the second-order form left
// +2 % of G at f = 0.3). The bias H^-1 sum ... is subtracted from G, B (and the rotation)
// (METHODS.md §I.10).
double reference_error_expectation(double j_model, double a, double f) {
  static const std::vector<std::pair<double, double>> nodes = [] {
    // Gauss-Hermite (physicists') nodes and weights for n = 16, for E over z ~ N(0, 1):
    // E g(z) = sum w_i g(sqrt(2) x_i) / sqrt(pi).
    const double x[8] = {0.2734810461381525, 0.8229514491446559, 1.3802585391988808,
                         1.9517879909162540, 2.5462021578474814, 3.1769991619799560,
                         3.8694479048601227, 4.6887389393058184};
    const double w[8] = {5.079294790166137e-1, 2.806474585285337e-1, 8.381004139898583e-2,
                         1.288031153550997e-2, 9.322840086241805e-4, 2.711860092537882e-5,
                         2.320980844865211e-7, 2.654807474011182e-10};
    std::vector<std::pair<double, double>> out;
    for (int i = 0; i < 8; ++i)
      for (int sign : {-1, 1}) out.emplace_back(sign * std::sqrt(2.0) * x[i], w[i] / std::sqrt(kPi));
    return out;
  }();
  const double sigma = std::sqrt(std::log1p(f * f));
  double sum = 0.0;
  for (const auto& [z, weight] : nodes) {
    const double e = std::exp(sigma * z - 0.5 * sigma * sigma) - 1.0;
    sum += weight * (-e * (1.0 + e)) / (a + f * f * j_model * j_model * (1.0 + e) * (1.0 + e));
  }
  return sum;
}

// Per Term 1 row t: w_t = sigma_1 J_model m_t, so that the expectation of the cost's gradient
// under the reference's error is sum_t (d r1_t / d theta) w_t for any parameter theta (0 where
// there is no multiplicative error to speak of: f = 0, or J_model <= 0).
std::vector<double> ImageRefinement::reference_error_weights() const {
  std::vector<double> w(term1_rows_.size(), 0.0);
  const double f = held_.reference_error, k2 = held_.error_scale * held_.error_scale;
  if (!(f > 0.0) || !options_.reference_bias_correction) return w;
  for (size_t t = 0; t < term1_rows_.size(); ++t) {
    const ReflectionFit& rf = *term1_rows_[t];
    if (!rf.use_intensity) continue;
    const double j_model = model_intensity(rf, held_);
    if (!(j_model > 0.0)) continue;
    w[t] = rf.sigma_intensity * j_model *
           reference_error_expectation(j_model, k2 * model_J_variance(rf.stats, j_model), f);
  }
  return w;
}

void ImageRefinement::correct_reference_bias(const Matrix& H, const Matrix& term1_jacobian) {
  const double f = held_.reference_error;
  if (!(f > 0.0) || !options_.reference_bias_correction || !scale_fit_) return;
  // On a bound the estimate is not the root of the estimating equation: nothing to correct.
  if (held_.B <= options_.B_min + 1e-9 || held_.B >= options_.B_max - 1e-9) return;
  std::vector<int> idx = {0, 1};
  if (geometry_)
    for (int a = 2 + n_shape_; a < 5 + n_shape_; ++a) idx.push_back(a);
  const int n = int(idx.size());
  // E[psi] = -E[J' r]: the estimating equation's expectation at the true parameters.
  const std::vector<double> w = reference_error_weights();
  Vector expectation = Vector::Zero(n);
  for (size_t t = 0; t < term1_rows_.size(); ++t)
    for (int a = 0; a < n; ++a) expectation(a) -= term1_jacobian(t, idx[a]) * w[t];
  Matrix Hs(n, n);
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) Hs(a, b) = H(idx[a], idx[b]);
  const Vector bias = Hs.ldlt().solve(expectation);
  if (!bias.allFinite()) return;
  held_.G = std::max(held_.G - bias(0), 0.5 * held_.G);
  held_.B = std::clamp(held_.B - bias(1), options_.B_min + 1e-6, options_.B_max - 1e-6);
  for (int a = 2; a < n; ++a) held_.rotation[a - 2] -= bias(a);
}

// Per-image contributions to the per-crystal global step: the gradient and curvature of the
// image's cost in log R0 with its scale (G, B[, geometry]) profiled out (Schur complement), and
// in the tail's (t, s) with its shape profiled out; and the background pixels' chi^2.
void ImageRefinement::global_contributions(const Matrix& term1_jacobian,
                                           const std::vector<double>& r1) const {
  const int64_t i = image_;
  out_.R0_gradient[i] = out_.R0_curvature[i] = 0.0;
  for (int j = 0; j < 2; ++j) out_.tail_gradient[2 * i + j] = 0.0;
  for (int j = 0; j < 3; ++j) out_.tail_curvature[3 * i + j] = 0.0;
  double residual_sq = 0.0, dof = 0.0, poisson = 0.0, read = 0.0;
  for (const ReflectionFit& rf : work_.reflections) {
    // The counting scale from clean boxes only (a neighbour's wings are not counting noise)
    // that hold their spot (the background of a box a spot overflows takes up its light).
    if (!rf.integrated() || !std::isfinite(rf.stats.J) || (rf.flags & kForeignLight) ||
        !(rf.stats.profile_fraction >= kCountingProfileFraction))
      continue;
    residual_sq += rf.stats.residual_sq_background;
    dof += rf.stats.dof_background;
    poisson += rf.stats.poisson_background;
    read += rf.stats.read_background;
  }
  out_.background_residual_sq[i] = residual_sq;
  out_.background_dof[i] = dof;
  out_.background_poisson[i] = poisson;
  out_.background_read[i] = read;
  if (!factored_) return;
  // R0: d r1 / d log R0 = -J_model 2 eps^2 R0^2 / R0_eff^4 / sigma_1 (geometry held).
  if (scale_fit_ && held_.R0 > 0.0 && term1_jacobian.rows() == Eigen::Index(term1_rows_.size())) {
    std::vector<int> scale_idx = {0, 1};
    if (geometry_)
      for (int c = 2 + n_shape_; c < k_; ++c) scale_idx.push_back(c);
    const int nt = int(scale_idx.size());
    Matrix Jt(term1_rows_.size(), nt);
    Vector JR(term1_rows_.size()), r(term1_rows_.size());
    for (size_t t = 0; t < term1_rows_.size(); ++t) {
      const ReflectionFit& rf = *term1_rows_[t];
      for (int a = 0; a < nt; ++a) Jt(t, a) = term1_jacobian(t, scale_idx[a]);
      r(t) = r1[t];
      JR(t) = 0.0;
      if (!rf.use_intensity) continue;
      const double width_sq = partiality_width_sq(held_.R0, held_.eta, rf.pred.d, work_.wavelength,
                                                  work_.bandwidth);
      const double eps = rf.pred.excitation_error;
      JR(t) = -model_intensity(rf, held_) * 2.0 * eps * eps * held_.R0 * held_.R0 /
              (width_sq * width_sq) / rf.sigma_intensity;
    }
    Matrix Htt = Jt.transpose() * Jt;
    if (std::isfinite(options_.sigma_G) && !options_.G_prior.empty()) {
      const double centre = options_.G_prior[set_.crystal_index[i]];
      if (centre > 0.0) Htt(0, 0) += 1.0 / std::pow(options_.sigma_G * centre, 2);
    }
    // The reference's own error biases the gradient as it does the scale (§I.10): its
    // expectation, E[J_R' r] - H_Rt H_tt^-1 E[J_t' r] with E[J' r] = sum_t J_t w_t, removed.
    std::vector<double> w = reference_error_weights();
    Vector expected_r = Vector::Zero(Eigen::Index(term1_rows_.size()));
    for (size_t t = 0; t < term1_rows_.size(); ++t) expected_r(t) = w[t];
    const Vector HtR = Jt.transpose() * JR, gt = Jt.transpose() * (r - expected_r);
    Eigen::LDLT<Matrix> ldlt(Htt);
    out_.R0_curvature[i] = JR.squaredNorm() - HtR.dot(ldlt.solve(HtR));
    out_.R0_gradient[i] = JR.dot(r - expected_r) - HtR.dot(ldlt.solve(gt));
  }
  // Tail: the shape's normal equations extended by (t, s), reduced over phi.
  Matrix H;
  Vector g;
  if (!tail_normal_equations(H, g)) return;
  const int ns = n_shape_;
  const Matrix Hss = H.topLeftCorner(ns, ns), Hst = H.topRightCorner(ns, 2);
  Eigen::LDLT<Matrix> ldlt(Hss);
  if (ldlt.info() == Eigen::Success && Hss.allFinite()) {
    const Matrix reduced = H.bottomRightCorner(2, 2) - Hst.transpose() * ldlt.solve(Hst);
    const Vector reduced_g = g.tail(2) - Hst.transpose() * ldlt.solve(g.head(ns));
    out_.tail_gradient[2 * i] = reduced_g(0);
    out_.tail_gradient[2 * i + 1] = reduced_g(1);
    out_.tail_curvature[3 * i] = reduced(0, 0);
    out_.tail_curvature[3 * i + 1] = reduced(0, 1);
    out_.tail_curvature[3 * i + 2] = reduced(1, 1);
  }
}

// The shape cost 1/2 sum |z - J U dphi|^2 / k^2 extended by the tail's (t, s): its Gauss-Newton
// curvature H ((n_shape + 2) square, phi first) and gradient g over the shape reflections.
// False when the profile has no tail.
bool ImageRefinement::tail_normal_equations(Matrix& H, Vector& g) const {
  if (work_.profile_model != ProfileModel::kTail) return false;
  const int ns = n_shape_;
  H = Matrix::Zero(ns + 2, ns + 2);
  g = Vector::Zero(ns + 2);
  const double k2 = held_.error_scale * held_.error_scale;
  for (const ReflectionFit& rf : work_.reflections) {
    if (!rf.use_shape) continue;
    const ReflectionStatistics& st = rf.stats;
    const double J2 = st.J * st.J / k2, J1 = st.J / k2;
    Matrix U = Matrix::Zero(ns, ns);
    Vector z(ns);
    for (int a = 0; a < ns; ++a) {
      z(a) = st.shape_z[a];
      for (int b = 0; b < ns; ++b) U(a, b) = st.shape_U[a * kMaxShape + b];
    }
    H.topLeftCorner(ns, ns) += J2 * U.transpose() * U;
    g.head(ns) -= J1 * U.transpose() * z;
    for (int a = 0; a < ns; ++a)
      for (int b = 0; b < 2; ++b) {
        H(a, ns + b) += J2 * st.shape_tail_cross[2 * a + b];
        H(ns + b, a) += J2 * st.shape_tail_cross[2 * a + b];
      }
    H(ns, ns) += J2 * st.tail_information[0];
    H(ns, ns + 1) += J2 * st.tail_information[1];
    H(ns + 1, ns) += J2 * st.tail_information[1];
    H(ns + 1, ns + 1) += J2 * st.tail_information[2];
    g(ns) -= J1 * st.tail_score[0];
    g(ns + 1) -= J1 * st.tail_score[1];
  }
  return true;
}

// The loop: pass (per-reflection fits at the held parameters), solve, until every parameter
// moves by less than outer_tolerance sigma; steps that reverse the previous one are halved.
void ImageRefinement::run() {
  start();
  int n_integrated = 0;
  for (const ReflectionFit& rf : work_.reflections) n_integrated += rf.integrated() && std::isfinite(rf.stats.J);
  if (n_integrated < options_.min_reflections) {  // nothing to refine an image with
    not_refined_ = true;
    diagnostics();
    status_ = kTooFewReflections;
    return;
  }
  build_problem();
  std::vector<double> previous_step(k_, 0.0);
  int outlier_changes = 0;
  std::vector<bool> previous_use;
  for (int outer = 0;; ++outer) {
    if (outer > 0 && geometry_ && geometry_moved()) regeometrize(held_);
    pass(held_, /*scale_known=*/true);
    n_outer_ = outer + 1;
    std::vector<bool> use;
    for (const ReflectionFit& rf : work_.reflections) use.push_back(rf.use_intensity);
    const bool outliers_changed = outer > 0 && use != previous_use;
    outlier_changes += outliers_changed;
    previous_use = use;
    if (converged_ && (!outliers_changed || outlier_changes > 3)) break;
    converged_ = false;
    if (outer == options_.max_outer) break;
    ImageParameters next;
    if (!solve(next)) {
      solver_failed_ = true;
      break;
    }
    compute_covariance();
    const std::vector<double> before = parameter_vector(held_, n_shape_, geometry_);
    const std::vector<double> after = parameter_vector(next, n_shape_, geometry_);
    bool settled = true;
    double reversal = 0.0;
    std::vector<double> step(k_, 0.0);
    for (int c = 0; c < k_; ++c) {
      if (!scale_fit_ && c < 2) continue;
      const double sigma = covariance_ok_ && std::isfinite(covariance_(c, c))
                               ? std::sqrt(covariance_(c, c))
                               : 1e-3 * std::max(std::abs(before[c]), 1e-6);
      step[c] = (after[c] - before[c]) / sigma;
      reversal += step[c] * previous_step[c];
      settled = settled && std::abs(step[c]) <= options_.outer_tolerance;
    }
    // The spots' centres settle too: at most 1 % still moving by more than their sd.
    settled = settled && work_.centre_moving <= 0.01;
    ImageParameters damped = next;
    // A step that reverses the previous one (a two-state alternation), or one no smaller than
    // two passes before (a longer cycle: the centres and the geometry trading), is halved.
    double largest = 0.0;
    for (double v : step) largest = std::max(largest, std::abs(v));
    const bool stalled = step_history_.size() >= 2 &&
                         largest > 0.7 * step_history_[step_history_.size() - 2];
    step_history_.push_back(largest);
    if (!settled && (reversal < 0.0 || (outer >= 4 && stalled))) {
      damped.G = 0.5 * (held_.G + next.G);
      damped.B = 0.5 * (held_.B + next.B);
      for (int s = 0; s < n_shape_; ++s) damped.phi[s] = 0.5 * (held_.phi[s] + next.phi[s]);
      for (int a = 0; a < 3; ++a) damped.rotation[a] = 0.5 * (held_.rotation[a] + next.rotation[a]);
      damped.detector_shift = 0.5 * (held_.detector_shift + next.detector_shift);
      for (double& v : step) v *= 0.5;
    }
    previous_step = step;
    held_ = damped;
    converged_ = settled;
  }
  if (!solver_failed_) compute_covariance(/*final=*/true);
  diagnostics();
  status_ = decide_status(converged_);
}

// The final model's pooled chi^2 per degree of freedom, of the pixels and of each term, and
// the spot's width in pixels (the status bounds).
void ImageRefinement::diagnostics() {
  const double k2 = held_.error_scale * held_.error_scale;
  double chi2 = 0.0, dof = 0.0, c1 = 0.0, c2 = 0.0, c3 = 0.0, area = 0.0, half = 0.0;
  double clean_chi2 = 0.0, clean_dof = 0.0;
  int n2 = 0, n3 = 0, n_poor = 0;
  n_term1_ = n_integrated_ = 0;
  for (size_t r = 0; r < work_.reflections.size(); ++r) {
    const ReflectionFit& rf = work_.reflections[r];
    if (!rf.integrated() || !std::isfinite(rf.stats.J)) continue;
    const ReflectionStatistics& st = rf.stats;
    chi2 += st.chi2;
    const int reflection_dof = std::max(st.n_used - st.n_parameters, 0);
    dof += reflection_dof;
    const bool poor = reflection_dof > 0 && st.chi2 / (k2 * reflection_dof) > options_.chi2_max;
    n_poor += poor;
    if (!poor && !(rf.flags & kForeignLight)) {
      clean_chi2 += st.chi2;
      clean_dof += reflection_dof;
    }
    area += rf.a_mean;
    half += rf.box_half;
    ++n_integrated_;
    if (rf.use_intensity) {
      c1 += rf.intensity_residual * rf.intensity_residual;
      ++n_term1_;
    }
    if (rf.use_shape) {
      for (int s = 0; s < n_shape_; ++s) c2 += st.shape_z[s] * st.shape_z[s] / k2;
      n2 += n_shape_;
    }
    if (rf.use_position) {
      const double* w = whitening_[r].data();
      const double dx = rf.centre_px[0] - rf.pred.x, dy = rf.centre_px[1] - rf.pred.y;
      c3 += std::pow(w[0] * dx + w[1] * dy, 2) + std::pow(w[2] * dy, 2);
      n3 += 2;
    }
  }
  chi2_pixel_ = dof > 0 ? chi2 / k2 / dof : kNaN;
  // The image fits poorly when its clean boxes do, or when many boxes do (a few boxes with a
  // neighbour's spot or a zinger are flagged on their own, kPoorFitReflection).
  poor_fit_ = !(clean_dof > 0 && clean_chi2 / k2 / clean_dof <= options_.chi2_max) ||
              n_poor > 0.2 * n_integrated_;
  chi2_intensity_ = n_term1_ ? c1 / n_term1_ : kNaN;
  chi2_shape_ = n2 ? c2 / n2 : kNaN;
  chi2_position_ = n3 ? c3 / n3 : kNaN;
  spot_sd_ = n_integrated_ ? held_.phi[kShapeR1] / std::sqrt(2.0 * area / n_integrated_) : kNaN;
  box_half_ = n_integrated_ ? half / n_integrated_ : kNaN;
}

int ImageRefinement::decide_status(bool converged) const {
  if (solver_failed_) return kSolverFailure;
  if (has_reference_ && !scale_fit_) return kTooFewReflections;  // not scaled, whatever else
  if (!converged) return kNotConverged;
  if (scale_fit_) {
    const bool at_bound = held_.B <= options_.B_min + 1e-9 || held_.B >= options_.B_max - 1e-9 ||
                          held_.G <= 1.001 * G_floor_;
    bool shape_bound = false;
    for (int k = 1; k < n_shape_; ++k) shape_bound = shape_bound || std::abs(held_.phi[k]) >= 3.0 - 1e-9;
    if (at_bound || shape_bound) return kAtBound;
  }
  if (!covariance_ok_) return kSingularCovariance;
  if (!(spot_sd_ >= options_.spot_sd_min) || !(spot_sd_ <= box_half_)) return kImplausibleProfile;
  if (poor_fit_) return kPoorFit;
  if (!has_reference_) return kNoReferenceImage;
  return kConverged;
}

double finite_or_nan(double x) { return std::isfinite(x) ? x : kNaN; }

void ImageRefinement::write() const {
  write_image();
  write_reflections();
}

void ImageRefinement::write_image() const {
  const int64_t i = image_;
  const bool refined = !solver_failed_ && !not_refined_;
  const bool scaled = refined && scale_fit_;
  out_.status[i] = status_;
  out_.n_iterations[i] = iterations_;
  out_.n_outer[i] = n_outer_;
  out_.cost[i] = cost_;
  out_.G[i] = scaled ? held_.G : kNaN;
  out_.B[i] = scaled ? held_.B : kNaN;
  out_.R1[i] = refined ? held_.phi[kShapeR1] : kNaN;
  const Sym2<double> sigma = profile_tensor(held_.phi[0], held_.phi[1], held_.phi[2]);
  out_.R1_tensor[3 * i] = refined ? sigma.m11 : kNaN;
  out_.R1_tensor[3 * i + 1] = refined ? sigma.m12 : kNaN;
  out_.R1_tensor[3 * i + 2] = refined ? sigma.m22 : kNaN;
  for (int k = 0; k < kMaxShape; ++k) out_.shape[kMaxShape * i + k] = refined ? held_.phi[k] : kNaN;
  const Matrix& C = covariance_;
  auto sd = [&](int c) { return C.rows() > c ? std::sqrt(C(c, c)) : kNaN; };
  out_.G_sigma[i] = scaled ? sd(0) : kNaN;
  out_.B_sigma[i] = scaled ? sd(1) : kNaN;
  out_.R1_sigma[i] = refined ? sd(2) : kNaN;
  for (int a = 0; a < 3; ++a) {
    out_.rotation[3 * i + a] = geometry_ && refined ? held_.rotation[a] : (geometry_ ? kNaN : 0.0);
    out_.rotation_sigma[3 * i + a] = geometry_ ? sd(2 + n_shape_ + a) : kNaN;
  }
  out_.detector_shift[i] = geometry_ && refined ? held_.detector_shift : (geometry_ ? kNaN : 0.0);
  out_.detector_shift_sigma[i] = geometry_ ? sd(5 + n_shape_) : kNaN;
  for (int a = 0; a < k_; ++a)
    for (int b = 0; b < k_; ++b)
      out_.covariance[(i * k_ + a) * k_ + b] = C.rows() == k_ ? C(a, b) : kNaN;
  out_.position_sigma[i] = work_.position_sigma_px;
  out_.n_reflections[i] = scaled ? n_term1_ : 0;
  out_.n_integrated[i] = n_integrated_;
  out_.chi2_pixel[i] = chi2_pixel_;
  out_.chi2_intensity[i] = scaled ? chi2_intensity_ : kNaN;
  out_.chi2_shape[i] = chi2_shape_;
  out_.chi2_position[i] = chi2_position_;
  out_.spot_sd[i] = spot_sd_;
}

// var log I, I = J / (G B_term p pol), of one reflection from the image's parameters (delta
// method): v' C v with v = d log I / d (G, B, phi, omega, shift) = (-1/G, 1/(4d^2),
// d log J/d phi, -d log(p pol)/d omega, 0), d log p/d omega = -2 eps_r/R0_eff^2 d eps_r/d omega
// (the geometry's share: 0 when it is not refined); with a refined tail, J's own dependence on
// it, a = d log J/d tau|_phi: + 2 v' S C_tau a + a' C_tau a. R0's share is added by the caller.
double ImageRefinement::parameter_relative_variance(const ReflectionFit& rf) const {
  if (!covariance_ok_ || covariance_.rows() != k_) return 0.0;
  Vector v = Vector::Zero(k_);
  v(0) = -1.0 / held_.G;
  v(1) = 1.0 / (4.0 * rf.pred.d * rf.pred.d);
  const double J = rf.stats.J;
  const bool profile_share = factored_ && J > 0.0;
  if (profile_share)
    for (int s = 0; s < n_shape_; ++s) v(2 + s) = rf.stats.dJ_dphi[s] / J;
  if (geometry_) {
    const GeometryLinearisation& l = rf.geometry_linearisation;
    for (int a = 0; a < 3; ++a)
      v(2 + n_shape_ + a) = 2.0 * l.excitation_error / l.width_sq * l.excitation_error_gradient[a] -
                            l.polarization_gradient[a] / l.polarization;
  }
  double relative = v.dot(covariance_ * v);
  if (profile_share && tail_sensitivity_.rows() == k_) {
    const Eigen::Vector2d a(rf.stats.dJ_dtail[0] / J, rf.stats.dJ_dtail[1] / J);
    relative += 2.0 * v.dot(tail_sensitivity_ * (tail_covariance_ * a)) + a.dot(tail_covariance_ * a);
  }
  return std::isfinite(relative) ? std::max(relative, 0.0) : 0.0;
}

void ImageRefinement::write_reflections() const {
  const bool scaled = !solver_failed_ && !not_refined_ && scale_fit_;
  const double k = held_.error_scale;
  const int32_t crystal = set_.crystal_index[image_];
  const double R0_sigma = options_.R0_sigma.empty() ? 0.0 : options_.R0_sigma[crystal];
  for (const ReflectionFit& rf : work_.reflections) {
    const int64_t r = rf.row;
    // An overflowed prediction (flagged kBadPrediction) is written NaN, never +-inf.
    out_.partiality[r] = finite_or_nan(rf.partiality);
    out_.excitation_error[r] = finite_or_nan(rf.pred.excitation_error);
    out_.d[r] = finite_or_nan(rf.pred.d);
    out_.xyzcal[2 * r] = finite_or_nan(rf.pred.x);
    out_.xyzcal[2 * r + 1] = finite_or_nan(rf.pred.y);
    int32_t flags = rf.flags | (scaled ? 0 : kNotRefined);
    const bool integrated = rf.integrated() && std::isfinite(rf.stats.J) && !solver_failed_;
    const ReflectionStatistics& st = rf.stats;
    out_.intensity_prf[r] = integrated ? st.J : kNaN;
    out_.intensity_count_sigma[r] = integrated ? std::sqrt(st.J_variance) : kNaN;
    out_.intensity_prf_sigma[r] = integrated ? k * std::sqrt(st.J_variance) : kNaN;
    out_.xyzobs[2 * r] = integrated ? rf.centre_px[0] : kNaN;
    out_.xyzobs[2 * r + 1] = integrated ? rf.centre_px[1] : kNaN;
    out_.m2_obs[r] = integrated ? st.m2_obs : kNaN;
    const bool fitted_bg = rf.n_background_parameters > 0;
    out_.background[r] = integrated ? (fitted_bg ? st.background[0] : rf.file_background) : kNaN;
    out_.background_plane[3 * r] = integrated && fitted_bg ? st.background[0] : kNaN;
    out_.background_plane[3 * r + 1] = integrated && fitted_bg ? st.background[1] / rf.box_half : kNaN;
    out_.background_plane[3 * r + 2] = integrated && fitted_bg ? st.background[2] / rf.box_half : kNaN;
    out_.centre_offset[2 * r] = integrated ? rf.delta[0] : kNaN;
    out_.centre_offset[2 * r + 1] = integrated ? rf.delta[1] : kNaN;
    out_.profile_fraction[r] = rf.pixel_end > rf.pixel_begin ? st.profile_fraction : kNaN;
    const int dof = st.n_used - st.n_parameters;
    out_.chi2_pixel_reflection[r] = integrated && dof > 0 ? st.chi2 / (k * k * dof) : kNaN;
    if (out_.chi2_pixel_reflection[r] > options_.chi2_max) flags |= kPoorFitReflection;
    const bool reference = !(rf.flags & kNoReference);
    // J_model overflows only where the prediction is absurd (d far below the wavelength's
    // scale: B_term = exp(-B/4d^2)); it is then no prediction, flagged, and written NaN.
    const double model = scaled && reference ? model_intensity(rf, held_) : kNaN;
    if (std::isinf(model)) flags |= kBadPrediction;
    out_.intensity_model[r] = finite_or_nan(model);
    // intensity_scaled = J / (G B_term p pol), with the counting sigma and the parameters'.
    const double c = scaled ? intensity_model(held_.G, held_.B, rf.pred.d, rf.partiality,
                                              rf.pred.polarization, 1.0) : kNaN;
    const bool low_p = !(rf.partiality >= options_.min_partiality);
    if (low_p) flags |= kLowPartiality;
    if (integrated && scaled && !low_p && std::isfinite(c) && c != 0.0) {
      const double I = st.J / c;
      double relative = parameter_relative_variance(rf);
      if (R0_sigma > 0.0 && held_.R0 > 0.0) {  // d log p / d R0 = 2 eps^2 R0 / R0_eff^4
        const double width_sq = partiality_width_sq(held_.R0, held_.eta, rf.pred.d, work_.wavelength,
                                                    work_.bandwidth);
        const double eps = rf.pred.excitation_error;
        relative += std::pow(2.0 * eps * eps * held_.R0 / (width_sq * width_sq) * R0_sigma, 2);
      }
      out_.intensity_scaled[r] = I;
      out_.intensity_scaled_sigma[r] =
          std::sqrt(k * k * st.J_variance / (c * c) + I * I * std::max(relative, 0.0));
    } else {
      out_.intensity_scaled[r] = out_.intensity_scaled_sigma[r] = kNaN;
    }
    out_.flags[r] = flags;
  }
}

}  // namespace

int covariance_size(const RefineOptions& options) {
  return 2 + n_shape_of(options) + (options.refine_geometry ? 4 : 0);
}

std::vector<std::string> covariance_names(const RefineOptions& options) {
  std::vector<std::string> names = {"G", "B", "R1"};
  if (n_shape_of(options) == 3) {
    names.push_back("anisotropy_a");
    names.push_back("anisotropy_c");
  }
  if (options.refine_geometry)
    for (const char* n : {"rotation_x", "rotation_y", "rotation_z", "detector_shift"}) names.push_back(n);
  return names;
}

void validate_options(const RefineOptions& options, const ShoeboxSetView& set) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  if (options.objective != "factored" && options.objective != "pixel")
    fail("objective must be 'factored' or 'pixel', not '" + options.objective + "'");
  if (options.profile != "isotropic" && options.profile != "anisotropic" && options.profile != "tail")
    fail("profile must be 'isotropic', 'anisotropic' or 'tail', not '" + options.profile + "'");
  if (options.background != "flat" && options.background != "plane" && options.background != "auto")
    fail("background must be 'flat', 'plane' or 'auto', not '" + options.background + "'");
  if (options.objective == "pixel" && options.refine_geometry)
    fail("refine_geometry needs the factored objective (Term 3)");
  if (options.loss != "none" && options.loss != "huber" && options.loss != "cauchy")
    fail("loss must be 'none', 'huber' or 'cauchy', not '" + options.loss + "'");
  if (options.loss != "none" && options.objective != "pixel")
    fail("a robust loss applies to the pixel objective only");
  auto positive = [&](double v, const char* name) {
    if (!(v > 0.0) || !std::isfinite(v)) fail(std::string(name) + " must be finite and > 0");
  };
  auto non_negative = [&](double v, const char* name) {
    if (!(v >= 0.0) || !std::isfinite(v)) fail(std::string(name) + " must be finite and >= 0");
  };
  positive(options.loss_scale, "loss_scale");
  positive(options.outer_tolerance, "outer_tolerance");
  positive(options.sigma_rotation, "sigma_rotation");
  positive(options.sigma_shift, "sigma_shift");
  positive(options.variance_floor, "variance_floor");
  positive(options.position_sigma, "position_sigma");
  positive(options.chi2_max, "chi2_max");
  non_negative(options.outlier_sigma, "outlier_sigma");
  non_negative(options.pixel_outlier_sigma, "pixel_outlier_sigma");
  non_negative(options.min_profile_fraction, "min_profile_fraction");
  non_negative(options.min_partiality, "min_partiality");
  non_negative(options.spot_sd_min, "spot_sd_min");
  if (!(options.sigma_G > 0.0)) fail("sigma_G must be > 0 (inf = no prior)");
  if (options.max_outer < 1 || options.max_iterations < 1)
    fail("max_outer and max_iterations must be >= 1");
  if (!(options.B_min < options.B_max) || !std::isfinite(options.B_min) || !std::isfinite(options.B_max))
    fail("B_min must be < B_max, both finite");
  if (options.min_valid_pixels < 1) fail("min_valid_pixels must be >= 1");
  if (options.plane_min_pixels < 3) fail("plane_min_pixels must be >= 3");
  if (options.min_reflections < 1) fail("min_reflections must be >= 1");
  int32_t n_crystals = 0;
  for (int64_t i = 0; i < set.n_images; ++i) n_crystals = std::max(n_crystals, set.crystal_index[i] + 1);
  auto per_crystal = [&](const std::vector<double>& v, const char* name, bool optional, bool strictly) {
    if (v.empty() && optional) return;
    if (int32_t(v.size()) < n_crystals)
      fail(std::string(name) + " has " + std::to_string(v.size()) + " values for " +
           std::to_string(n_crystals) + " crystals");
    for (double x : v)
      if (!std::isfinite(x) || (strictly ? !(x > 0.0) : !(x >= 0.0)))
        fail(std::string(name) + " must be finite and " + (strictly ? "> 0" : ">= 0"));
  };
  per_crystal(options.R0, "R0", false, false);
  per_crystal(options.eta, "eta", true, false);
  per_crystal(options.error_scale, "error_scale", true, true);
  per_crystal(options.read_variance_scale, "read_variance_scale", true, false);
  per_crystal(options.reference_error, "reference_error", true, false);
  per_crystal(options.tail_fraction, "tail_fraction", true, false);
  per_crystal(options.tail_scale, "tail_scale", true, true);
  per_crystal(options.G_prior, "G_prior", true, false);
  per_crystal(options.R0_sigma, "R0_sigma", true, false);
  for (double t : options.tail_fraction)
    if (!(t < 1.0)) fail("tail_fraction must be < 1");
  const std::vector<double>& tc = options.tail_covariance;
  if (!tc.empty() && (tc.size() % 3 != 0 || tc.size() < 3 * size_t(n_crystals)))
    fail("tail_covariance needs 3 entries (tt, ts, ss) per crystal, for " + std::to_string(n_crystals) + " crystals");
  for (size_t c = 0; c < tc.size(); c += 3)
    if (!(std::isfinite(tc[c]) && std::isfinite(tc[c + 1]) && std::isfinite(tc[c + 2]) &&
          tc[c] >= 0.0 && tc[c + 2] >= 0.0 && tc[c + 1] * tc[c + 1] <= tc[c] * tc[c + 2] * (1 + 1e-9)))
      fail("tail_covariance must be a finite positive semi-definite (tt, ts, ss) per crystal");
  for (double s : options.tail_scale)
    if (!(s > 1.0)) fail("tail_scale must be > 1");
}

void refine_image(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                  const ResultsView& out) {
  ImageRefinement refinement(set, image, options, out);
  refinement.run();
  refinement.write();
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
  // At most 256 threads (a thread that cannot be started would end the process).
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>({n_threads, 256, last - first})));
  if (threads == 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(worker);
    for (std::thread& t : pool) t.join();
  }
  if (error) std::rethrow_exception(error);
}

void ImageRefinement::prepare_at(const ImageParameters& held, int passes) {
  setup_image(set_, image_, options_, work_);
  held_ = held;
  update_geometry(work_, held_);
  initialise_reflections(work_, options_);
  set_subpixels(work_, subpixels_for_shape(work_, held_.phi));
  int n_reference = 0;
  for (const ReflectionFit& rf : work_.reflections)
    n_reference += !(rf.flags & (kNoReference | kBadPrediction | kTooFewPixels));
  has_reference_ = n_reference >= options_.min_reflections;
  for (int p = 0; p < std::max(passes, 1); ++p) pass(held_, /*scale_known=*/has_reference_);
  scale_fit_ = true;
}

ImageEvaluation ImageRefinement::evaluate(const ImageParameters& params) {
  ImageEvaluation result;
  result.k = k_;
  build_problem(&result.labels);
  x_.load(held_);
  if (factored_) {
    for (int s = 0; s < n_shape_; ++s) x_.dphi[s] = params.phi[s] - held_.phi[s];
  } else {
    std::copy(params.phi, params.phi + kMaxShape, x_.phi);
    for (size_t r = 0; r < work_.reflections.size(); ++r) {
      const ReflectionStatistics& st = work_.reflections[r].stats;
      x_.background[r] = {st.background[0], st.background[1], st.background[2]};
    }
  }
  x_.G = params.G;
  x_.B = params.B;
  std::copy(params.rotation, params.rotation + 3, x_.omega);
  x_.shift = params.detector_shift;
  std::vector<double*> blocks = {&x_.G, &x_.B, factored_ ? x_.dphi : x_.phi};
  if (geometry_) {
    blocks.push_back(x_.omega);
    blocks.push_back(&x_.shift);
  }
  ceres::Problem::EvaluateOptions eval;
  eval.parameter_blocks = blocks;
  ceres::CRSMatrix jac;
  if (!problem_->Evaluate(eval, &result.cost, &result.residuals, nullptr, &jac))
    throw std::runtime_error("the problem could not be evaluated at these parameters");
  result.jacobian.assign(size_t(jac.num_rows) * k_, 0.0);
  for (int row = 0; row < jac.num_rows; ++row)
    for (int a = jac.rows[row]; a < jac.rows[row + 1]; ++a)
      result.jacobian[size_t(row) * k_ + jac.cols[a]] = jac.values[a];
  for (const ReflectionFit& rf : work_.reflections)
    result.intensity_prf.push_back(rf.integrated() ? rf.stats.J : kNaN);
  return result;
}

ImageEvaluation evaluate_image(const ShoeboxSetView& set, int64_t image,
                               const RefineOptions& options, const ImageParameters& params,
                               const ImageParameters& held, int passes) {
  if (image < 0 || image >= set.n_images) throw std::invalid_argument("image outside the set");
  validate_options(options, set);
  ResultsView none;
  ImageRefinement refinement(set, image, options, none);
  ImageParameters at = held, values = params;
  const int32_t c = set.crystal_index[image];
  at.R0 = values.R0 = options.R0[c];
  at.eta = values.eta = options.eta.empty() ? 0.0 : options.eta[c];
  at.error_scale = values.error_scale = options.error_scale.empty() ? 1.0 : options.error_scale[c];
  at.reference_error = values.reference_error =
      options.reference_error.empty() ? 0.0 : options.reference_error[c];
  refinement.prepare_at(at, passes);
  return refinement.evaluate(values);
}

void model_counts(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                  const ResultsView& results, double* mu, double* variance) {
  ImageRefinement refinement(set, image, options, results);
  ImageParameters at = starting_parameters(set, image, options, results);
  const bool scaled = std::isfinite(results.G[image]) && std::isfinite(results.B[image]);
  if (!scaled) at.G = 1.0;
  if (!std::isfinite(at.phi[kShapeR1])) return;
  refinement.prepare_at(at, 4);  // a few passes: the outlier pixels and centres settle
  const ImageWork& work = refinement.work();
  for (const ReflectionFit& rf : work.reflections) {
    const int32_t* b = rf.bbox;
    const int64_t offset = set.pixel_offset[rf.row];
    const int64_t width = b[1] - b[0];
    const bool integrated = rf.integrated() && std::isfinite(rf.stats.J);
    const double amplitude = scaled && !(rf.flags & kNoReference) ? model_intensity(rf, at) : rf.stats.J;
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
      const int64_t t = offset + int64_t(work.y[i] - 0.5 - b[2]) * width + int64_t(work.x[i] - 0.5 - b[0]);
      if (!integrated) continue;
      const double P = reflection_profile(work, rf, at.phi, i);
      double bg = rf.n_background_parameters > 0 ? rf.stats.background[0] : rf.file_background;
      if (rf.n_background_parameters == 3)
        bg += rf.stats.background[1] * (work.x[i] - rf.box_centre[0]) / rf.box_half +
              rf.stats.background[2] * (work.y[i] - rf.box_centre[1]) / rf.box_half;
      const double neighbour = work.neighbour_counts[i];
      mu[t] = bg + amplitude * P + neighbour;
      variance[t] = std::max(std::max(bg, 0.0) + std::max(amplitude, 0.0) * P +
                                 std::max(neighbour, 0.0) + work.read_noise_sq[i],
                             options.variance_floor);
    }
  }
}

double trivial_solve_seconds(int repeats) {
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
