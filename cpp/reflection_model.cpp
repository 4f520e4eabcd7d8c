#include "reflection_model.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

#include <Eigen/Dense>

namespace pixelrefine {

double pixel_deviate(double counts, double expected, double variance, double error_scale) {
  const double k2 = error_scale * error_scale;
  const double lambda = variance / k2;
  if (!(lambda > 0.0) || !std::isfinite(lambda)) return kNaN;
  const double r = (counts - expected) / variance;  // (m - lambda) / lambda
  if (!(r > -1.0)) return -std::sqrt(2.0 * lambda);  // m <= 0: the deviance of a zero count
  const double deviance = 2.0 * lambda * ((1.0 + r) * std::log1p(r) - r);
  return std::copysign(std::sqrt(std::max(deviance, 0.0)), r);
}

namespace {

// Every matrix of a local fit is at most 15 x 15 (the Gram layout): bounded, so no heap allocation.
using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, 0, 15, 15>;
using Vector = Eigen::Matrix<double, Eigen::Dynamic, 1, 0, 15, 1>;

// 2x2 helpers on (11, 12, 22) storage.
Eigen::Matrix2d sym(const double s[3]) {
  Eigen::Matrix2d m;
  m << s[0], s[1], s[1], s[2];
  return m;
}
void store_sym(const Eigen::Matrix2d& m, double s[3]) {
  s[0] = m(0, 0);
  s[1] = 0.5 * (m(0, 1) + m(1, 0));
  s[2] = m(1, 1);
}


// Chooses each box's background model (file, flat or plane) and its normalisation.
void choose_background_model(const RefineOptions& options, ReflectionFit& rf) {
  const double x0 = rf.bbox[0], x1 = rf.bbox[1], y0 = rf.bbox[2], y1 = rf.bbox[3];
  rf.box_centre[0] = 0.5 * (x0 + x1);
  rf.box_centre[1] = 0.5 * (y0 + y1);
  rf.box_half = std::max(1.0, 0.5 * std::max(x1 - x0, y1 - y0));
  const int64_t n = rf.pixel_end - rf.pixel_begin;
  if (std::isfinite(rf.file_background)) {
    rf.n_background_parameters = 0;
  } else if (options.background == "plane" ||
             (options.background == "auto" && n >= options.plane_min_pixels)) {
    rf.n_background_parameters = 3;
    rf.flags |= kPlaneBackground;
  } else {
    rf.n_background_parameters = 1;
  }
}

// Background of pixel i under the held coefficients (or the file's value).
double background_at(const ImageWork& w, const ReflectionFit& rf, const double beta[3], int64_t i) {
  if (rf.n_background_parameters == 0) return rf.file_background;
  double b = beta[0];
  if (rf.n_background_parameters == 3)
    b += beta[1] * (w.x[i] - rf.box_centre[0]) / rf.box_half +
         beta[2] * (w.y[i] - rf.box_centre[1]) / rf.box_half;
  return b;
}

// The profile and its derivatives averaged over the pixel's n x n sub-pixel points.
ProfileDerivatives pixel_derivatives(double u1, double u2, const double D[4], int n,
                                     const ProfileTensors& P, bool with_tail,
                                     bool with_curvature = false) {
  double cell[4];
  subpixel_cell(D, n, cell);
  if (n == 1) return profile_with_derivatives(u1, u2, P, with_tail, cell, with_curvature);
  ProfileDerivatives sum{};
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < n; ++i) {
      const double ox = subpixel_offset(i, n), oy = subpixel_offset(j, n);
      const ProfileDerivatives f =
          profile_with_derivatives(u1 + D[0] * ox + D[1] * oy, u2 + D[2] * ox + D[3] * oy, P,
                                   with_tail, cell, with_curvature);
      sum.value += f.value;
      for (int k = 0; k < 3; ++k) sum.d_m[k] += f.d_m[k];
      for (int k = 0; k < 3; ++k) sum.d_m_tail[k] += f.d_m_tail[k];
      sum.d_tail += f.d_tail;
      sum.d_delta[0] += f.d_delta[0];
      sum.d_delta[1] += f.d_delta[1];
      for (int k = 0; k < 3; ++k) sum.d_delta2[k] += f.d_delta2[k];
    }
  }
  const double inverse = 1.0 / (n * n);
  sum.value *= inverse;
  for (int k = 0; k < 3; ++k) sum.d_m[k] *= inverse;
  for (int k = 0; k < 3; ++k) sum.d_m_tail[k] *= inverse;
  sum.d_tail *= inverse;
  sum.d_delta[0] *= inverse;
  sum.d_delta[1] *= inverse;
  for (int k = 0; k < 3; ++k) sum.d_delta2[k] *= inverse;
  return sum;
}

// Layout of the pass's Gram vector z = (P, background basis, P_n, dP/d delta, dP/d phi,
// dP/d (t, s), dP_n/d c_n, counts) for one reflection; P_n and its centre's derivatives only
// where a neighbour's spot is modelled.
struct GramLayout {
  int n_background, n_x, neighbour, delta, shape, tail, neighbour_delta, counts, size, n_shape,
      n_tail;
  GramLayout(int n_background_, int n_shape_, bool with_tail, bool with_neighbour)
      : n_background(n_background_), n_x(1 + n_background + (with_neighbour ? 1 : 0)),
        neighbour(with_neighbour ? 1 + n_background : -1), delta(n_x), shape(n_x + 2),
        tail(n_x + 2 + n_shape_), neighbour_delta(tail + (with_tail ? 2 : 0)),
        counts(neighbour_delta + (with_neighbour ? 2 : 0)), size(counts + 1),
        n_shape(n_shape_), n_tail(with_tail ? 2 : 0) {}
};

// Per-pixel profile and derivative rows of one reflection, kept for the second loop.
struct PixelRows {
  std::vector<double> z;  // [n_pixels, layout.size]
  std::vector<double> weight, background;
  std::vector<double> curvature;  // [n_pixels, 3]: a d^2 P/d delta^2 (11, 12, 22)
};

// sum_p w_p z_p H_p for the design's rows (P, background, neighbour), the shape's and the
// tail's rows (others 0): the cross terms of the centre-profiling adjustment. Zero when
// centres are held.
void centre_curvature_cross(const ReflectionFit& rf, const GramLayout& L, const PixelRows& rows,
                            Matrix& cross) {
  cross.setZero(L.size, 3);
  if (!rf.centre_profiled()) return;
  const int64_t n = rf.pixel_end - rf.pixel_begin;
  for (int64_t j = 0; j < n; ++j) {
    const double w = rows.weight[j];
    if (w == 0.0) continue;
    const double* z = &rows.z[size_t(j) * L.size];
    const double* h = &rows.curvature[size_t(j) * 3];
    for (int ab = 0; ab < 3; ++ab) {
      const double wh = w * h[ab];
      for (int r = 0; r < L.n_x; ++r) cross(r, ab) += wh * z[r];
      for (int k = 0; k < L.n_shape + L.n_tail; ++k) cross(L.shape + k, ab) += wh * z[L.shape + k];
    }
  }
}

// The weighted Gram matrix sum_p w_p z_p z_p' of the rows (w = 0: a pixel left out), with the
// row length Z known at compile time (unrolled; Z = 5..15 covers every layout).
template <int Z>
void accumulate_fixed(const PixelRows& rows, int64_t n, Matrix& gram) {
  double sum[Z][Z] = {};
  for (int64_t j = 0; j < n; ++j) {
    const double w = rows.weight[j];
    if (w == 0.0) continue;
    const double* z = &rows.z[size_t(j) * Z];
    for (int r = 0; r < Z; ++r) {
      const double wz = w * z[r];
      for (int c = r; c < Z; ++c) sum[r][c] += wz * z[c];
    }
  }
  gram.resize(Z, Z);
  for (int r = 0; r < Z; ++r)
    for (int c = r; c < Z; ++c) gram(r, c) = gram(c, r) = sum[r][c];
}

void accumulate_rows(const PixelRows& rows, int64_t n, int size, Matrix& gram) {
  switch (size) {
    case 5: return accumulate_fixed<5>(rows, n, gram);
    case 6: return accumulate_fixed<6>(rows, n, gram);
    case 7: return accumulate_fixed<7>(rows, n, gram);
    case 8: return accumulate_fixed<8>(rows, n, gram);
    case 9: return accumulate_fixed<9>(rows, n, gram);
    case 10: return accumulate_fixed<10>(rows, n, gram);
    case 11: return accumulate_fixed<11>(rows, n, gram);
    case 12: return accumulate_fixed<12>(rows, n, gram);
    case 13: return accumulate_fixed<13>(rows, n, gram);
    case 14: return accumulate_fixed<14>(rows, n, gram);
    case 15: return accumulate_fixed<15>(rows, n, gram);
    default: throw std::logic_error("Gram layout of unexpected size");
  }
}

// First loop: the profile, its derivatives and the weights of every used pixel; then the
// weighted Gram matrix of z.
void accumulate_gram(const ImageWork& w, const ReflectionFit& rf, const GramLayout& L,
                     const PrecisionWithDerivatives& pd, const ImageParameters& params,
                     const RefineOptions& options, PixelRows& rows, Matrix& gram, double& p_sum) {
  const int64_t n = rf.pixel_end - rf.pixel_begin;
  rows.z.assign(size_t(n) * L.size, 0.0);
  rows.weight.assign(n, 0.0);
  rows.background.assign(n, 0.0);
  rows.curvature.assign(size_t(n) * 3, 0.0);
  gram.setZero(L.size, L.size);
  p_sum = 0.0;
  const double t = L.n_tail ? params.phi[kShapeTail] : 0.0;
  const ProfileTensors P(pd.M, pd.M_tail, t);
  const bool tail = t > 0.0 || L.n_tail;
  const bool curvature = rf.centre_profiled();  // d2P/d delta2 only for the adjustment
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = rf.pixel_begin + j;
    const ProfileDerivatives f = pixel_derivatives(w.eps1[i] - rf.delta[0], w.eps2[i] - rf.delta[1],
                                                   rf.pixel_jacobian, w.subpixels, P, tail,
                                                   curvature);
    double* z = &rows.z[size_t(j) * L.size];
    const double a = w.area[i];
    z[0] = a * f.value;
    const double bg = background_at(w, rf, rf.stats.background, i);
    rows.background[j] = bg;
    if (rf.n_background_parameters >= 1) z[1] = 1.0;
    if (rf.n_background_parameters == 3) {
      z[2] = (w.x[i] - rf.box_centre[0]) / rf.box_half;
      z[3] = (w.y[i] - rf.box_centre[1]) / rf.box_half;
    }
    z[L.delta] = a * f.d_delta[0];
    z[L.delta + 1] = a * f.d_delta[1];
    for (int ab = 0; ab < 3; ++ab) rows.curvature[size_t(j) * 3 + ab] = a * f.d_delta2[ab];
    for (int k = 0; k < L.n_shape; ++k) z[L.shape + k] = a * pd.chain(f, k);
    if (L.n_tail) {
      z[L.tail] = a * f.d_tail;
      z[L.tail + 1] = a * pd.chain(f, 3);
    }
    if (L.neighbour >= 0) {  // the neighbour's spot: the same shape about its own centre
      const ProfileDerivatives g = pixel_derivatives(
          w.eps1[i] - rf.neighbour_centre[0], w.eps2[i] - rf.neighbour_centre[1],
          rf.pixel_jacobian, w.subpixels, P, tail);
      z[L.neighbour] = a * g.value;
      z[L.neighbour_delta] = a * g.d_delta[0];
      z[L.neighbour_delta + 1] = a * g.d_delta[1];
    }
    // Counts less a known background; the fitted background is in the design.
    z[L.counts] = w.counts[i] - (rf.n_background_parameters == 0 ? bg : 0.0);
    if (!w.used[i]) continue;
    const double neighbour = L.neighbour >= 0 ? rf.neighbour_amplitude * z[L.neighbour] : 0.0;
    const double v = std::max(std::max(bg, 0.0) + rf.amplitude_expected * z[0] + neighbour +
                                  w.read_noise_sq[i],
                              options.variance_floor);
    rows.weight[j] = 1.0 / v;
    p_sum += z[0];
  }
  accumulate_rows(rows, n, L.size, gram);
}

// The profile at a known centre: without the widening 2S by the centre's own uncertainty.
ProfileTensors known_centre_profile(const ImageWork& w, const ReflectionFit& rf,
                                    const ImageParameters& params) {
  const double zero[3] = {0.0, 0.0, 0.0};
  return ProfileTensors(profile_precision(params.phi, zero, rf.pixel_smoothing),
                        tail_precision(params.phi, zero),
                        w.profile_model == ProfileModel::kTail ? params.phi[kShapeTail] : 0.0);
}

// How far from c_pred a spot may lie (pixels): 3 sigma_pos + 1.5 px.
double centre_reach(const ImageWork& w) { return 3.0 * w.position_sigma_px + 1.5; }

// The positional prior's precision Omega in (e1, e2): delta ~ N(0, sigma_pos^2 D D').
Eigen::Matrix2d centre_prior_precision(const ReflectionFit& rf, double position_sigma_px) {
  const Eigen::Matrix2d jac = rf.jacobian();
  return (position_sigma_px * position_sigma_px * jac * jac.transpose()).inverse();
}

// The centre's score and information from the profile at a known centre (without the
// widening 2S by the centre's own uncertainty, which belongs to the profile J is fitted with,
// not to the likelihood of the centre): a second, smaller Gram matrix of (P, background basis,
// dP/d delta, counts) with the pass's weights. Skipped (the main pass's values stand) when 2S
// is negligible against Sigma.
void centre_statistics(const ImageWork& w, ReflectionFit& rf, const ImageParameters& params,
                       const GramLayout& L, const PixelRows& rows, const Sym2<double>& M_wide) {
  ReflectionStatistics& st = rf.stats;
  st.centre_amplitude = st.J;
  const Sym2<double> sigma_wide = M_wide.inverse();
  const double trace_S = 2.0 * (rf.S[0] + rf.S[2]);
  if (!(trace_S > 0.01 * (sigma_wide.m11 + sigma_wide.m22))) return;
  const bool tail = w.profile_model == ProfileModel::kTail;
  const ProfileTensors P = known_centre_profile(w, rf, params);
  // The design is the pass's (P, background basis, P_n), P at the known centre.
  const int nx = L.n_x, size = nx + 3;
  Matrix gram = Matrix::Zero(size, size);
  double z[8];
  for (int64_t j = 0; j < rf.pixel_end - rf.pixel_begin; ++j) {
    const double weight = rows.weight[j];
    if (!(weight > 0.0)) continue;
    const int64_t i = rf.pixel_begin + j;
    const ProfileDerivatives f = pixel_derivatives(w.eps1[i] - rf.delta[0], w.eps2[i] - rf.delta[1],
                                                   rf.pixel_jacobian, w.subpixels, P, tail);
    const double a = w.area[i];
    z[0] = a * f.value;
    if (rf.n_background_parameters >= 1) z[1] = 1.0;
    if (rf.n_background_parameters == 3) {
      z[2] = (w.x[i] - rf.box_centre[0]) / rf.box_half;
      z[3] = (w.y[i] - rf.box_centre[1]) / rf.box_half;
    }
    if (L.neighbour >= 0) z[L.neighbour] = rows.z[size_t(j) * L.size + L.neighbour];
    z[nx] = a * f.d_delta[0];
    z[nx + 1] = a * f.d_delta[1];
    z[nx + 2] = w.counts[i] - (rf.n_background_parameters == 0 ? rows.background[j] : 0.0);
    for (int r = 0; r < size; ++r)
      for (int c = r; c < size; ++c) gram(r, c) += weight * z[r] * z[c];
  }
  gram.triangularView<Eigen::StrictlyLower>() = gram.transpose().triangularView<Eigen::StrictlyLower>();
  const Matrix N = gram.topLeftCorner(nx, nx);
  Eigen::LDLT<Matrix> ldlt(N);
  const Vector beta = ldlt.solve(gram.block(0, nx + 2, nx, 1));
  const Matrix DX = gram.block(nx, 0, 2, nx);
  const Matrix F = gram.block(nx, nx, 2, 2) - DX * ldlt.solve(DX.transpose());
  const Vector T = gram.block(nx, nx + 2, 2, 1) - DX * beta;
  if (!F.allFinite() || !T.allFinite() || !std::isfinite(beta(0))) return;
  st.centre_amplitude = beta(0);
  st.centre_information[0] = F(0, 0);
  st.centre_information[1] = F(0, 1);
  st.centre_information[2] = F(1, 1);
  st.centre_score[0] = T(0);
  st.centre_score[1] = T(1);
}

// The neighbour's amplitude J_n and its variance, and its centre's score and information per
// unit J_n^2 with the design (P, background, P_n) profiled: F = D'WD - D'WX N^-1 X'WD,
// T = D'W (I - X beta), D = dP_n/d c_n.
void neighbour_statistics(const Matrix& gram, const GramLayout& L, const Vector& beta,
                          const Matrix& N_inverse, ReflectionStatistics& st) {
  const int nx = L.n_x, r = L.neighbour_delta;
  st.neighbour_J = beta(L.neighbour);
  st.neighbour_J_variance = N_inverse(L.neighbour, L.neighbour);
  const Matrix DX = gram.block(r, 0, 2, nx);
  const Matrix F = gram.block(r, r, 2, 2) - DX * N_inverse * DX.transpose();
  const Vector T = gram.block(r, L.counts, 2, 1) - DX * beta;
  st.neighbour_information[0] = F(0, 0);
  st.neighbour_information[1] = F(0, 1);
  st.neighbour_information[2] = F(1, 1);
  st.neighbour_score[0] = T(0);
  st.neighbour_score[1] = T(1);
  // J's variance with the neighbour's centre fitted too: the design (X, J_n D).
  const double Jn = st.neighbour_J;
  Matrix N_full(nx + 2, nx + 2);
  N_full.topLeftCorner(nx, nx) = gram.topLeftCorner(nx, nx);
  N_full.block(nx, 0, 2, nx) = Jn * DX;
  N_full.block(0, nx, nx, 2) = Jn * DX.transpose();
  N_full.block(nx, nx, 2, 2) = Jn * Jn * gram.block(r, r, 2, 2);
  Eigen::LDLT<Matrix> ldlt(N_full);
  const Vector e0 = Vector::Unit(nx + 2, 0);
  const double v = ldlt.solve(e0)(0);
  if (ldlt.info() == Eigen::Success && v >= st.J_variance && std::isfinite(v)) st.J_variance = v;
}

// The shape score's expectation with the centre fitted to the spot's own counts (the
// Neyman-Scott bias: the spot looks narrower about a centre fitted to it), to first order in
// the centre's error of covariance C: E[(J/k^2) T_k] = -1/2 tr(C K_k) for every profile
// parameter (shape and tail), K_k = sum_p W_p (d mu_p/d phi_k)(d^2 mu_p/d delta^2) with
// d mu/d phi projected off the (P, background) design (METHODS.md §I.8). In the pass's units
// (mu = J P, W = w/k^2): T_k += (J/2) tr(C K~_k), K~_k = sum_p w_p z_p,k H_p; k^2 cancels.
void adjust_for_centre_profiling(const Matrix& gram, const GramLayout& L,
                                 const Matrix& curvature_cross, const Matrix& N_inverse,
                                 const double C[3], double J, Vector& T_s) {
  if (C[0] == 0.0 && C[2] == 0.0) return;
  const int nx = L.n_x;
  const Matrix projected_x = N_inverse * curvature_cross.topRows(nx);  // N^-1 sum w x H
  for (int k = 0; k < L.n_shape + L.n_tail; ++k) {  // the tail's (t, s) follow the shape's rows
    const int r = L.shape + k;
    double trace = 0.0;
    for (int ab = 0; ab < 3; ++ab) {
      const double K = curvature_cross(r, ab) - (gram.block(r, 0, 1, nx) * projected_x.col(ab))(0);
      trace += (ab == 1 ? 2.0 : 1.0) * C[ab] * K;
    }
    if (std::isfinite(trace)) T_s(k) += 0.5 * J * trace;
  }
}

// The reflection's local fit from its Gram matrix: J and the background by weighted least
// squares, chi^2, the profiled scores and Fisher matrices of the centre and the shape.
void solve_local_fit(const Matrix& gram, const GramLayout& L, const Matrix& curvature_cross,
                     const double centre_posterior[3], ReflectionStatistics& st,
                     Matrix& N_inverse_out) {
  const int nx = L.n_x, I = L.counts;
  const Matrix N = gram.topLeftCorner(nx, nx);
  const Vector rhs = gram.block(0, I, nx, 1);
  Eigen::LDLT<Matrix> ldlt(N);
  const Vector beta = ldlt.solve(rhs);
  const Matrix N_inverse = ldlt.solve(Matrix::Identity(nx, nx));
  N_inverse_out = N_inverse;
  st.J = beta(0);
  st.J_variance = N_inverse(0, 0);
  for (int k = 1; k <= L.n_background; ++k) st.background[k - 1] = beta(k);
  st.chi2 = std::max(gram(I, I) - beta.dot(rhs), 0.0);
  if (L.neighbour >= 0) neighbour_statistics(gram, L, beta, N_inverse, st);
  // Derivative rows D = (centre, shape, tail), projected off the (P, background) design.
  const int nd = 2 + L.n_shape + L.n_tail;
  const Matrix DX = gram.block(nx, 0, nd, nx);
  const Matrix F = gram.block(nx, nx, nd, nd) - DX * N_inverse * DX.transpose();
  const Vector T = gram.block(nx, I, nd, 1) - DX * beta;
  st.centre_information[0] = F(0, 0);
  st.centre_information[1] = F(0, 1);
  st.centre_information[2] = F(1, 1);
  st.centre_score[0] = T(0);
  st.centre_score[1] = T(1);
  // dJ/dphi_k = (N^-1)_00 T_k - J (N^-1 X'W D_k)_0, with T_k the raw score (see METHODS.md);
  // the same for the tail's (t, s).
  auto dJ_d = [&](int row) { return N_inverse(0, 0) * T(row) - st.J * N_inverse.row(0).dot(DX.row(row)); };
  for (int k = 0; k < L.n_shape; ++k) st.dJ_dphi[k] = dJ_d(2 + k);
  for (int k = 0; k < L.n_tail; ++k) st.dJ_dtail[k] = dJ_d(2 + L.n_shape + k);
  // Shape and tail with the centre profiled out: Schur complements on the centre block.
  const Eigen::Matrix2d F_cc = F.topLeftCorner(2, 2);
  Eigen::LDLT<Eigen::Matrix2d> centre(F_cc);
  const int ns = L.n_shape + L.n_tail;
  const Matrix F_sc = F.block(2, 0, ns, 2);
  const Matrix F_s = F.block(2, 2, ns, ns) - F_sc * centre.solve(F_sc.transpose());
  Vector T_s = T.segment(2, ns) - F_sc * centre.solve(T.head(2));
  if (st.J > 0.0)
    adjust_for_centre_profiling(gram, L, curvature_cross, N_inverse, centre_posterior, st.J, T_s);
  st.shape_ok = false;
  if (L.n_tail) {
    st.tail_information[0] = F_s(L.n_shape, L.n_shape);
    st.tail_information[1] = F_s(L.n_shape, L.n_shape + 1);
    st.tail_information[2] = F_s(L.n_shape + 1, L.n_shape + 1);
    st.tail_score[0] = T_s(L.n_shape);
    st.tail_score[1] = T_s(L.n_shape + 1);
    for (int k = 0; k < L.n_shape; ++k) {
      st.shape_tail_cross[2 * k] = F_s(k, L.n_shape);
      st.shape_tail_cross[2 * k + 1] = F_s(k, L.n_shape + 1);
    }
  }
  const Matrix F_phi = F_s.topLeftCorner(L.n_shape, L.n_shape);
  Eigen::LLT<Matrix> llt(F_phi);
  if (llt.info() != Eigen::Success || !(st.J > 0.0) || !std::isfinite(st.J)) return;
  const Matrix Lower = llt.matrixL();
  const Vector z = Lower.triangularView<Eigen::Lower>().solve(T_s.head(L.n_shape));
  for (int r = 0; r < L.n_shape; ++r) {
    st.shape_z[r] = z(r);
    for (int c = 0; c < L.n_shape; ++c) st.shape_U[r * kMaxShape + c] = Lower(c, r);
  }
  st.shape_ok = z.allFinite();
}

// Second loop: the fitted model of every pixel, the pixel outliers for the next pass, and the
// chi^2 of the background-dominated pixels (the error model's counting scale).
// The spot's region (pixels): its centre and the radius within which no pixel may be left out,
// 3 sd of the widest axis of the effective core (which includes the centre's uncertainty 2S)
// plus one pixel; and a modelled neighbour's region, of the same radius about its centre.
// A spot whose centre is not known yet covers the box.
struct SpotRegion {
  double x, y, radius_sq, sd;  // sd: the core's along its widest axis (pixels)
  bool neighbour = false;
  double neighbour_x = 0.0, neighbour_y = 0.0;
  bool contains(double px, double py) const {
    const double dx = px - x, dy = py - y;
    if (dx * dx + dy * dy <= radius_sq) return true;
    const double nx = px - neighbour_x, ny = py - neighbour_y;
    return neighbour && nx * nx + ny * ny <= radius_sq;
  }
};
SpotRegion spot_region(const ReflectionFit& rf, const Sym2<double>& M) {
  const Eigen::Matrix2d D = rf.jacobian();
  const Eigen::Matrix2d D_inverse = D.inverse();
  const Sym2<double> sigma = M.inverse();
  const Eigen::Matrix2d cov = 0.5 * D_inverse * sym(&sigma.m11) * D_inverse.transpose();
  const double widest = Eigen::SelfAdjointEigenSolver<Eigen::Matrix2d>(cov).eigenvalues()(1);
  const Eigen::Vector2d centre = D_inverse * Eigen::Vector2d(rf.delta[0], rf.delta[1]);
  const double radius = 3.0 * std::sqrt(std::max(widest, 0.0)) + 1.0;
  SpotRegion region{rf.pred.x + centre(0), rf.pred.y + centre(1), radius * radius,
                    std::sqrt(std::max(widest, 0.0))};
  if (rf.neighbour) {
    const Eigen::Vector2d c =
        D_inverse * Eigen::Vector2d(rf.neighbour_centre[0], rf.neighbour_centre[1]);
    region.neighbour = true;
    region.neighbour_x = rf.pred.x + c(0);
    region.neighbour_y = rf.pred.y + c(1);
  }
  return region;
}

// The box's valid pixels on its grid: index (in [pixel_begin, pixel_end)) of pixel (i, j), or -1.
struct BoxGrid {
  int width = 0, height = 0;
  std::vector<int64_t> index;
  void build(const ImageWork& w, const ReflectionFit& rf) {
    width = rf.bbox[1] - rf.bbox[0];
    height = rf.bbox[3] - rf.bbox[2];
    index.assign(size_t(width) * height, -1);
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i)
      index[size_t(int(w.y[i] - 0.5) - rf.bbox[2]) * width + (int(w.x[i] - 0.5) - rf.bbox[0])] = i;
  }
  // Calls f(k) for every valid 4-neighbour k of pixel i.
  template <typename F>
  void for_each_neighbour(const ImageWork& w, const ReflectionFit& rf, int64_t i, F&& f) const {
    const int x = int(w.x[i] - 0.5) - rf.bbox[0], y = int(w.y[i] - 0.5) - rf.bbox[2];
    const int dx[4] = {1, -1, 0, 0}, dy[4] = {0, 0, 1, -1};
    for (int k = 0; k < 4; ++k) {
      const int u = x + dx[k], v = y + dy[k];
      if (u < 0 || v < 0 || u >= width || v >= height) continue;
      const int64_t n = index[size_t(v) * width + u];
      if (n >= 0) f(n);
    }
  }
  // Largest value of `z` over the valid 4-neighbours of pixel i (-inf without any).
  double neighbour_max(const ImageWork& w, const ReflectionFit& rf, const std::vector<double>& z,
                       int64_t i) const {
    const int x = int(w.x[i] - 0.5) - rf.bbox[0], y = int(w.y[i] - 0.5) - rf.bbox[2];
    double best = -kInf;
    const int dx[4] = {1, -1, 0, 0}, dy[4] = {0, 0, 1, -1};
    for (int k = 0; k < 4; ++k) {
      const int u = x + dx[k], v = y + dy[k];
      if (u < 0 || v < 0 || u >= width || v >= height) continue;
      const int64_t n = index[size_t(v) * width + u];
      if (n >= 0) best = std::max(best, z[n - rf.pixel_begin]);
    }
    return best;
  }
};

// The counts of a group of pixels above the model (the model's negative expectation, a
// plane tilted by the neighbour's light, taken as 0) and their variance.
struct GroupExcess {
  double sum = 0.0, variance = 0.0, eps[2] = {0.0, 0.0};
};
GroupExcess group_excess(const ImageWork& w, const ReflectionFit& rf,
                         const std::vector<int64_t>& members) {
  GroupExcess g;
  for (int64_t j : members) {
    const int64_t i = rf.pixel_begin + j;
    const double expected = std::max(w.expected[i], 0.0);
    const double excess = std::max(w.counts[i] - expected, 0.0);
    g.sum += excess;
    g.variance += std::max(expected, 1.0) + w.read_noise_sq[i];
    g.eps[0] += excess * w.eps1[i];
    g.eps[1] += excess * w.eps2[i];
  }
  return g;
}

// A neighbour's spot found as a group of pixels far above the model outside the spot's
// region: modelled from the next pass on, centred at the group's centroid of the counts above
// the model, its amplitude their sum.
void start_neighbour(ReflectionFit& rf, const GroupExcess& g) {
  rf.neighbour = true;
  ++rf.neighbour_tries;
  rf.neighbour_centre[0] = g.eps[0] / g.sum;
  rf.neighbour_centre[1] = g.eps[1] / g.sum;
  rf.neighbour_amplitude = g.sum;
}

// Pixels far above the model that the model cannot be: outside the spot's region any pixel
// whose deviate d (Poisson's tails, `pixel_deviate`) is more than `threshold` (a neighbour's
// spot, a zinger), with the group of pixels above z = 2.5 it belongs to (the neighbour's wings);
// inside the region an isolated spike (d above `threshold` and more than threshold/2 above every
// 4-neighbour's: a zinger; a spot the model misplaces or mis-sizes is never isolated). A pixel
// stays out while d is above threshold/2 (hysteresis, so that the decisions settle). Returns
// whether any pixel is out.
bool mark_outlier_pixels(ImageWork& w, ReflectionFit& rf, const std::vector<double>& z,
                         const std::vector<double>& d, const SpotRegion& region, double threshold,
                         bool model_neighbours) {
  thread_local BoxGrid grid;
  grid.build(w, rf);
  const int64_t n = rf.pixel_end - rf.pixel_begin;
  thread_local std::vector<uint8_t> out;
  out.assign(n, 0);
  bool any = false;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = rf.pixel_begin + j;
    const bool inside = region.contains(w.x[i], w.y[i]);
    const bool was_out = !w.used[i];
    const bool far_above = d[j] > threshold || (was_out && d[j] > 0.5 * threshold);
    out[j] = inside ? far_above && d[j] > 0.5 * threshold + grid.neighbour_max(w, rf, d, i)
                    : far_above;
  }
  // A foreign spot too faint for any one pixel: a 4-connected group of pixels more than 2.5
  // sd above, outside the spot's region, whose summed chi^2 exceeds threshold^2, or that
  // touches a pixel already out.
  thread_local std::vector<int> component;
  component.assign(n, -1);
  thread_local std::vector<int64_t> members, best_members;
  best_members.clear();
  GroupExcess best;
  for (int64_t start = 0; start < n; ++start) {
    if (component[start] >= 0 || z[start] <= 2.5) continue;
    const int64_t i0 = rf.pixel_begin + start;
    if (region.contains(w.x[i0], w.y[i0])) continue;
    members.assign(1, start);
    component[start] = int(start);
    double chi2 = 0.0;
    bool touches = false;
    for (size_t m = 0; m < members.size(); ++m) {
      const int64_t j = members[m];
      chi2 += z[j] * z[j];
      touches = touches || out[j];
      grid.for_each_neighbour(w, rf, rf.pixel_begin + j, [&](int64_t k) {
        const int64_t jk = k - rf.pixel_begin;
        if (component[jk] >= 0 || z[jk] <= 2.5 || region.contains(w.x[k], w.y[k])) return;
        component[jk] = int(start);
        members.push_back(jk);
      });
    }
    if (touches || (members.size() >= 2 && chi2 > threshold * threshold)) {
      for (int64_t j : members) out[j] = 1;
      // A neighbour's spot: three pixels or more whose counts above the model are more
      // than 5 sd in sum; the strongest such group.
      const GroupExcess g = model_neighbours && members.size() >= 3 ? group_excess(w, rf, members)
                                                                     : GroupExcess{};
      if (g.sum > 5.0 * std::sqrt(g.variance) && g.sum > best.sum) {
        best = g;
        best_members = members;
      }
    }
  }
  // The neighbour found is modelled from the next pass on, its pixels back in.
  if (!rf.neighbour && rf.neighbour_tries < kNeighbourTries && !best_members.empty()) {
    start_neighbour(rf, best);
    for (int64_t j : best_members) out[j] = 0;
  }
  for (int64_t j = 0; j < n; ++j) {
    w.used[rf.pixel_begin + j] = !out[j];
    any = any || out[j];
  }
  return any;
}

// A pixel of the counting scale's sums: the spot's and a neighbour's light in the weights (the
// pass's held amplitudes, not this pass's fit, which the pixel's own count moves) below a tenth
// of the held background.
bool is_background_dominated(const ReflectionFit& rf, const PixelRows& rows, const GramLayout& L,
                             int64_t j, double variance_floor) {
  const double* z = &rows.z[size_t(j) * L.size];
  const double neighbour =
      L.neighbour >= 0 ? std::max(rf.neighbour_amplitude * z[L.neighbour], 0.0) : 0.0;
  const double spots = std::max(rf.amplitude_expected, 0.0) * z[0] + neighbour;
  return spots < 0.1 * std::max(rows.background[j], variance_floor);
}

void model_pixels(ImageWork& w, ReflectionFit& rf, const GramLayout& L, const PixelRows& rows,
                  const RefineOptions& options, double error_scale, const SpotRegion& region,
                  const Matrix& N_inverse) {
  const int64_t n = rf.pixel_end - rf.pixel_begin;
  ReflectionStatistics& st = rf.stats;
  double beta[3] = {st.background[0], st.background[1], st.background[2]};
  st.residual_sq_background = st.dof_background = st.poisson_background = st.read_background = 0.0;
  double m2_num = 0.0, m2_den = 0.0;
  // d var J / d J_m (st.J_variance_slope). With J held at J_m the background is
  // beta~ = beta^ + c (J_m - J^), c = (N^-1)_{beta,J} / (N^-1)_{JJ}, uncorrelated with J^; the
  // weights w_p = 1/v_p at beta~ give var J = e0' N^-1 e0 + sum_p w_p^2 dbg_p (x_p' u)^2 to first
  // order (u = N^-1 e0, dbg_p = (J_m - J^) c' x_p,beta), so the slope is
  // sum_p w_p^2 (c' x_p,beta) (x_p' u)^2 over the pixels whose variance follows the background.
  const int nx = L.n_x;
  const bool slope_defined = nx >= 2 && N_inverse(0, 0) > 0.0;
  const Vector u = N_inverse.col(0);
  const Vector c = slope_defined ? Vector(u.tail(nx - 1) / u(0)) : Vector::Zero(nx - 1);
  double slope = 0.0;
  thread_local std::vector<double> z, d;
  z.assign(n, 0.0);
  d.assign(n, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = rf.pixel_begin + j;
    const double P = rows.z[size_t(j) * L.size];
    const double bg = background_at(w, rf, beta, i);
    const double neighbour =
        L.neighbour >= 0 ? st.neighbour_J * rows.z[size_t(j) * L.size + L.neighbour] : 0.0;
    const double mu = bg + st.J * P + neighbour;
    w.weight[i] = rows.weight[j];
    w.neighbour_counts[i] = neighbour;
    if (rows.weight[j] > 0.0) {
      const double u1 = w.eps1[i] - rf.delta[0], u2 = w.eps2[i] - rf.delta[1];
      m2_num += (w.counts[i] - bg - neighbour) * 0.5 * (u1 * u1 + u2 * u2);
      m2_den += w.counts[i] - bg - neighbour;
    }
    if (slope_defined && rows.weight[j] > 0.0 && rows.background[j] > 0.0) {
      const Eigen::Map<const Vector> x(&rows.z[size_t(j) * L.size], nx);
      const double xu = x.dot(u);
      slope += rows.weight[j] * rows.weight[j] * c.dot(x.tail(nx - 1)) * xu * xu;
    }
    const double spots = std::max(st.J, 0.0) * P + std::max(neighbour, 0.0);
    const double v = std::max(std::max(bg, 0.0) + spots + w.read_noise_sq[i], options.variance_floor);
    w.expected[i] = mu;
    w.variance[i] = v;
    z[j] = (w.counts[i] - mu) / (error_scale * std::sqrt(v));
    d[j] = pixel_deviate(w.counts[i], mu, v, error_scale);
    if (rows.weight[j] > 0.0 && std::abs(d[j]) <= kCountingClip &&
        is_background_dominated(rf, rows, L, j, options.variance_floor)) {
      // Its degrees of freedom: 1 - leverage, h_p = w_p x_p' N^-1 x_p (J and the background).
      const Eigen::Map<const Vector> x(&rows.z[size_t(j) * L.size], L.n_x);
      const double leverage = rows.weight[j] * x.dot(N_inverse * x);
      const double dof = std::max(1.0 - leverage, 0.0);
      const double e = w.counts[i] - mu, v_held = 1.0 / rows.weight[j];
      st.residual_sq_background += e * e;
      st.dof_background += dof;
      st.poisson_background += dof * (v_held - w.read_noise_sq[i]);
      st.read_background += dof * w.read_noise_sq[i];
    }
  }
  st.J_variance_slope = std::isfinite(slope) ? slope : 0.0;
  const bool any = options.pixel_outlier_sigma > 0.0 &&
                   mark_outlier_pixels(w, rf, z, d, region, options.pixel_outlier_sigma,
                                       options.model_neighbours);
  if (any) rf.flags |= kPixelOutliers; else rf.flags &= ~kPixelOutliers;
  st.m2_obs = m2_den != 0.0 ? m2_num / m2_den : kNaN;
}

void clear_neighbour_counts(ImageWork& w, const ReflectionFit& rf) {
  std::fill(w.neighbour_counts.begin() + rf.pixel_begin, w.neighbour_counts.begin() + rf.pixel_end,
            0.0);
}

void drop_neighbour(ImageWork& w, ReflectionFit& rf) {
  rf.neighbour = false;
  rf.neighbour_amplitude = 0.0;
  rf.stats.neighbour_J = rf.stats.neighbour_J_variance = kNaN;
  clear_neighbour_counts(w, rf);
}

// The pass for one reflection at the held parameters.
void fit_reflection(ImageWork& w, ReflectionFit& rf, const ImageParameters& params,
                    const RefineOptions& options) {
  thread_local PixelRows rows;
  thread_local Matrix gram;
  const bool with_tail = w.profile_model == ProfileModel::kTail;
  const PrecisionWithDerivatives pd = precision_derivatives(params.phi, rf.S, rf.pixel_smoothing);
  SpotRegion region = spot_region(rf, pd.M);
  // Two profiles closer than 2.5 sd (their correlation above 0.2) are not told apart.
  if (region.neighbour &&
      std::hypot(region.neighbour_x - region.x, region.neighbour_y - region.y) < 2.5 * region.sd) {
    drop_neighbour(w, rf);
    region.neighbour = false;
  }
  const GramLayout L(rf.n_background_parameters, w.n_shape, with_tail, rf.neighbour);
  if (rf.neighbour) rf.flags |= kNeighbourModelled; else rf.flags &= ~kNeighbourModelled;
  double p_sum = 0.0;
  accumulate_gram(w, rf, L, pd, params, options, rows, gram, p_sum);
  ReflectionStatistics& st = rf.stats;
  const int n_used = int(std::count(w.used.begin() + rf.pixel_begin, w.used.begin() + rf.pixel_end, 1));
  st.n_used = n_used;
  st.n_parameters = L.n_x + 2 + (L.neighbour >= 0 ? 2 : 0);
  st.profile_fraction = p_sum;
  if (!(p_sum >= options.min_profile_fraction) || n_used < std::max(options.min_valid_pixels, L.n_x + 1)) {
    rf.flags |= kProfileOutsideBox;
    st.J = st.J_variance = kNaN;
    st.shape_ok = false;
    std::fill(w.used.begin() + rf.pixel_begin, w.used.begin() + rf.pixel_end, 1);
    clear_neighbour_counts(w, rf);
    return;
  }
  rf.flags &= ~kProfileOutsideBox;
  thread_local Matrix N_inverse;
  thread_local Matrix curvature_cross;
  centre_curvature_cross(rf, L, rows, curvature_cross);
  solve_local_fit(gram, L, curvature_cross, rf.centre_posterior, st, N_inverse);
  if (!std::isfinite(st.J) || !(st.J_variance > 0.0)) {
    rf.flags |= kProfileOutsideBox;
    st.J = st.J_variance = kNaN;
    st.shape_ok = false;
    return;
  }
  if (st.shape_ok) rf.flags &= ~kNoShape; else rf.flags |= kNoShape;
  centre_statistics(w, rf, params, L, rows, pd.M);
  model_pixels(w, rf, L, rows, options, params.error_scale, region, N_inverse);
}

// The image's rms offset of spots from their predictions (pixels, per axis), by the method of
// moments over the spots whose centres are well measured: E|d|^2 = 2 sigma^2 + tr C.
double positional_scatter(const ImageWork& w, double fallback) {
  // Robust to the few spots captured by a neighbour: the median of |d|^2 - tr C, which for
  // 2-D Gaussian offsets of sd sigma per axis is 2 ln 2 sigma^2.
  std::vector<double> excess;
  for (const ReflectionFit& rf : w.reflections) {
    if (!rf.integrated() || !std::isfinite(rf.centre_cov[0])) continue;
    const double trace = rf.centre_cov[0] + rf.centre_cov[2];
    if (!(trace < 0.125)) continue;  // centre known to better than 0.25 px per axis
    const double dx = rf.centre_px[0] - rf.pred.x, dy = rf.centre_px[1] - rf.pred.y;
    excess.push_back(dx * dx + dy * dy - trace);
  }
  if (excess.size() < 5) return fallback;
  std::nth_element(excess.begin(), excess.begin() + excess.size() / 2, excess.end());
  const double median = excess[excess.size() / 2];
  return std::max(std::sqrt(std::max(median / (2.0 * std::log(2.0)), 0.0)), 0.005);
}

// After a pass: the centre's ML estimate (Term 3) and its MAP update with the positional prior
// (the held centre and its covariance S for the next pass).
// Returns whether the centre is still moving: a step of more than one posterior sd (Mahalanobis
// norm) and more than kCentreSettledPx. The floor matters where the prior pins the centres
// (sigma_pos at its 0.005 px floor): there a 1e-4 px step is many sd, and it changes nothing.
constexpr double kCentreSettledPx = 0.01;
bool update_centre(ReflectionFit& rf, double position_sigma_px, double error_scale, bool move) {
  const ReflectionStatistics& st = rf.stats;
  rf.centre_px[0] = rf.centre_px[1] = kNaN;
  rf.centre_cov[0] = rf.centre_cov[1] = rf.centre_cov[2] = kNaN;
  const Eigen::Matrix2d jac = rf.jacobian();
  const Eigen::Matrix2d jac_inverse = jac.inverse();
  const Eigen::Matrix2d omega = centre_prior_precision(rf, position_sigma_px);
  const Eigen::Vector2d delta(rf.delta[0], rf.delta[1]);
  Eigen::Matrix2d information = Eigen::Matrix2d::Zero();
  Eigen::Vector2d score = Eigen::Vector2d::Zero();
  if (st.shape_ok && st.centre_amplitude > 0.0) {
    const double J = st.centre_amplitude, k2 = error_scale * error_scale;
    information = J * J / k2 * sym(st.centre_information);
    score = J / k2 * Eigen::Vector2d(st.centre_score[0], st.centre_score[1]);
    Eigen::LDLT<Eigen::Matrix2d> ml(information);
    if (ml.info() == Eigen::Success && information.determinant() > 0.0) {
      const Eigen::Vector2d ml_delta = delta + ml.solve(score);
      const Eigen::Vector2d px = jac_inverse * ml_delta;
      const Eigen::Matrix2d cov = jac_inverse * information.inverse() * jac_inverse.transpose();
      rf.centre_px[0] = rf.pred.x + px(0);
      rf.centre_px[1] = rf.pred.y + px(1);
      store_sym(cov, rf.centre_cov);
    }
  }
  std::fill(rf.centre_posterior, rf.centre_posterior + 3, 0.0);
  if (!move) {  // centres held at the prediction: the ML estimate only (Term 3)
    rf.centre_sd_px = 0.0;
    return false;
  }
  const Eigen::Matrix2d posterior = (information + omega).inverse();
  if (posterior.allFinite()) store_sym(posterior, rf.centre_posterior);
  const Eigen::Matrix2d posterior_px = jac_inverse * posterior * jac_inverse.transpose();
  rf.centre_sd_px = std::sqrt(std::max(
      Eigen::SelfAdjointEigenSolver<Eigen::Matrix2d>(posterior_px).eigenvalues()(1), 0.0));
  Eigen::Vector2d step = posterior * (score - omega * delta);
  // At most two pixels per pass (a Newton step far from the optimum of a peaked likelihood).
  const double step_px = (jac_inverse * step).norm();
  if (step_px > 2.0) step *= 2.0 / step_px;
  const Eigen::Vector2d updated = delta + step;
  rf.delta[0] = updated(0);
  rf.delta[1] = updated(1);
  // The profile is widened by the part of the centre's error that is not fitted to the spot's
  // own noise: with prior precision Omega and posterior covariance C, the shrinkage error
  // C Omega delta_true, of covariance C Omega C over the spots (C for a spot the data do not
  // locate, 0 for one they locate exactly; METHODS.md §I.6).
  store_sym(posterior * omega * posterior, rf.S);
  const Eigen::Matrix2d precision = information + omega;
  const double size = std::sqrt(std::max(step.dot(precision * step), 0.0));
  return size > 1.0 && (jac_inverse * step).norm() > kCentreSettledPx;
}

// After a pass: a modelled neighbour's centre moved by a Gauss-Newton step (c_n += F^-1 T / J_n,
// at most one pixel), its amplitude held for the weights; dropped when its amplitude is not
// 3 sd above 0 (what is left of it is then left out as outlier pixels, as before).
void update_neighbour(ImageWork& w, ReflectionFit& rf) {
  const ReflectionStatistics& st = rf.stats;
  if (!rf.neighbour || !std::isfinite(st.neighbour_J)) return;  // found in this pass: not fitted yet
  if (!(st.neighbour_J > 3.0 * std::sqrt(st.neighbour_J_variance))) {
    drop_neighbour(w, rf);
    return;
  }
  rf.neighbour_amplitude = st.neighbour_J;
  const Eigen::Matrix2d F = sym(st.neighbour_information);
  if (!(F.determinant() > 0.0 && F(0, 0) > 0.0)) return;
  const Eigen::Vector2d score(st.neighbour_score[0], st.neighbour_score[1]);
  Eigen::Vector2d step = F.ldlt().solve(score) / st.neighbour_J;
  const Eigen::Matrix2d jac = rf.jacobian();
  const Eigen::Matrix2d jac_inverse = jac.inverse();
  const double step_px = (jac_inverse * step).norm();
  if (!std::isfinite(step_px)) return;
  if (step_px > 1.0) step /= step_px;
  rf.neighbour_centre[0] += step(0);
  rf.neighbour_centre[1] += step(1);
  // The spot is the one nearer its prediction: a centre captured by a brighter neighbour is
  // handed back.
  const double spot_px = (jac_inverse * Eigen::Vector2d(rf.delta[0], rf.delta[1])).norm();
  const double neighbour_px =
      (jac_inverse * Eigen::Vector2d(rf.neighbour_centre[0], rf.neighbour_centre[1])).norm();
  if (neighbour_px < spot_px) {
    std::swap(rf.delta[0], rf.neighbour_centre[0]);
    std::swap(rf.delta[1], rf.neighbour_centre[1]);
    rf.neighbour_amplitude = std::max(st.J, 0.0);
  }
}

// Isolated spikes in the raw counts (zingers), left out of the first pass: more than 10 sd
// above the border median while every valid 4-neighbour's excess is below 5 % of theirs (a
// spot of 0.5 px sd centred on a pixel puts 12 % of that pixel's counts in each neighbour).
void mark_raw_spikes(ImageWork& w, const ReflectionFit& rf, double background) {
  thread_local BoxGrid grid;
  grid.build(w, rf);
  const int64_t n = rf.pixel_end - rf.pixel_begin;
  thread_local std::vector<double> excess;
  excess.assign(n, 0.0);
  for (int64_t j = 0; j < n; ++j) excess[j] = w.counts[rf.pixel_begin + j] - background;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = rf.pixel_begin + j;
    const double sd = std::sqrt(std::max(background, 1.0) + w.read_noise_sq[i]);
    if (excess[j] > 10.0 * sd && grid.neighbour_max(w, rf, excess, i) < 0.05 * excess[j])
      w.used[i] = 0;
  }
}

// Where a clearly visible spot is: the centroid of the counts more than 2 sd above the box's
// border median, when their sum is more than 5 sd and it lies within 3 sigma_pos + 1.5 px of
// c_pred (a Newton step from the prediction does not reach a spot that lies several of its
// widths away, and a fit of J there finds ~0). Returns false when the box shows no such spot.
bool locate_spot(const ImageWork& w, ReflectionFit& rf) {
  const double reach = centre_reach(w);
  std::vector<double> border;
  const double x0 = rf.bbox[0], x1 = rf.bbox[1], y0 = rf.bbox[2], y1 = rf.bbox[3];
  for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i)
    if (w.x[i] < x0 + 1 || w.x[i] > x1 - 1 || w.y[i] < y0 + 1 || w.y[i] > y1 - 1)
      border.push_back(w.counts[i]);
  if (border.size() < 3) return false;
  std::nth_element(border.begin(), border.begin() + border.size() / 2, border.end());
  const double bg = std::isfinite(rf.file_background) ? rf.file_background : border[border.size() / 2];
  // The 4-connected groups of pixels more than 2 sd above; of those more than 5 sd in sum,
  // the one whose centroid lies nearest c_pred (a brighter neighbour's spot is not this one).
  const int64_t n = rf.pixel_end - rf.pixel_begin;
  thread_local BoxGrid grid;
  grid.build(w, rf);
  thread_local std::vector<double> excess;
  thread_local std::vector<int> group;
  thread_local std::vector<int64_t> members;
  excess.assign(n, 0.0);
  group.assign(n, -1);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = rf.pixel_begin + j;
    const double sd = std::sqrt(std::max(bg, 1.0) + w.read_noise_sq[i]);
    const double e = w.counts[i] - bg;
    excess[j] = w.used[i] && e > 2.0 * sd ? e : 0.0;
  }
  double best_distance = kInf;
  Eigen::Vector2d best(kNaN, kNaN);
  for (int64_t start = 0; start < n; ++start) {
    if (group[start] >= 0 || excess[start] <= 0.0) continue;
    members.assign(1, start);
    group[start] = int(start);
    double sum = 0.0, variance = 0.0, sx = 0.0, sy = 0.0;
    for (size_t m = 0; m < members.size(); ++m) {
      const int64_t j = members[m], i = rf.pixel_begin + j;
      sum += excess[j];
      variance += std::max(bg, 1.0) + w.read_noise_sq[i] + excess[j];
      sx += excess[j] * w.x[i];
      sy += excess[j] * w.y[i];
      grid.for_each_neighbour(w, rf, i, [&](int64_t k) {
        const int64_t jk = k - rf.pixel_begin;
        if (group[jk] >= 0 || excess[jk] <= 0.0) return;
        group[jk] = int(start);
        members.push_back(jk);
      });
    }
    if (!(sum > 5.0 * std::sqrt(variance))) continue;
    const Eigen::Vector2d offset(sx / sum - rf.pred.x, sy / sum - rf.pred.y);
    if (offset.norm() < best_distance) {
      best_distance = offset.norm();
      best = offset;
    }
  }
  if (!best.allFinite() || best_distance > reach) return false;
  const Eigen::Matrix2d jac = rf.jacobian();
  const Eigen::Vector2d delta = jac * best;
  rf.delta[0] = delta(0);
  rf.delta[1] = delta(1);
  return true;
}

// A weak spot the passes left where its counts are not (J within 2 sd of 0, no group clear
// enough for locate_spot): the centre of the largest matched-filter gain, penalised by the
// positional prior, over the box's pixel centres within reach of c_pred,
//   gain(c) = (sum_p w_p P_p(c) (I_p - b))^2 / sum_p w_p P_p(c)^2,  w_p = 1/(b + sigma_read^2),
// the profile at a known centre and the current background b; moved there when the gain is a
// 4-sd detection (16) and gain - delta' Omega delta beats the current centre's. METHODS.md §I.6.
// The scan over pixel centres takes the profile from a table over integer pixel offsets
// (eps_p - eps_c = D (x_p - x_c), D at c_pred: one profile evaluation per offset, not per
// pixel and candidate); the best candidate and the current centre are then evaluated exactly.
// Tried at most kMaxCentreSearches times per reflection (the first passes' background and
// sigma_pos are not yet the final ones).
constexpr int kMaxCentreSearches = 3;

// The matched-filter sums (sum w P (I - b), sum w P^2) over the pixels within `window` of
// pixel centre (cx, cy), the profile from `profile(i)`.
template <typename Profile>
std::pair<double, double> matched_filter(const ImageWork& w, const ReflectionFit& rf, double b,
                                         double cx, double cy, double window, Profile profile) {
  double spe = 0.0, spp = 0.0;
  for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
    if (!w.used[i] || std::abs(w.x[i] - cx) > window || std::abs(w.y[i] - cy) > window) continue;
    const double weight = 1.0 / std::max(b + w.read_noise_sq[i], 1.0);
    const double p = w.area[i] * profile(i);
    spe += weight * p * (w.counts[i] - b);
    spp += weight * p * p;
  }
  return {spe, spp};
}

bool search_centre(const ImageWork& w, ReflectionFit& rf, const ImageParameters& params) {
  if (rf.centre_searches >= kMaxCentreSearches) return false;
  ++rf.centre_searches;
  const double b = rf.n_background_parameters > 0 ? rf.stats.background[0] : rf.file_background;
  if (!std::isfinite(b) || !(w.position_sigma_px > 0.0)) return false;
  const ProfileTensors P = known_centre_profile(w, rf, params);
  const double* D = rf.pixel_jacobian;
  const Eigen::Matrix2d omega = centre_prior_precision(rf, w.position_sigma_px);
  const double reach = centre_reach(w);
  const double window = 4.0 * (std::isfinite(w.spot_sd_px) ? w.spot_sd_px : 1.0) + 2.0;
  auto penalised = [&](double d1, double d2, std::pair<double, double> sums, double& gain) {
    gain = sums.first > 0.0 && sums.second > 0.0 ? sums.first * sums.first / sums.second : 0.0;
    const Eigen::Vector2d d(d1, d2);
    return gain - d.dot(omega * d);
  };
  auto exact = [&](double d1, double d2, double cx, double cy, double& gain) {
    return penalised(d1, d2, matched_filter(w, rf, b, cx, cy, window, [&](int64_t i) {
      return pixel_density(w.eps1[i] - d1, w.eps2[i] - d2, D, w.subpixels, P.M, P.M_tail, P.tail);
    }), gain);
  };
  // The profile at integer offsets (dx, dy), |dx|, |dy| <= half.
  const int half = int(std::floor(window));
  const int side = 2 * half + 1;
  thread_local std::vector<double> table;
  table.assign(size_t(side) * side, 0.0);
  for (int dy = -half; dy <= half; ++dy)
    for (int dx = -half; dx <= half; ++dx)
      table[size_t(dy + half) * side + (dx + half)] =
          pixel_density(D[0] * dx + D[1] * dy, D[2] * dx + D[3] * dy, D, w.subpixels, P.M, P.M_tail, P.tail);
  const Eigen::Vector2d at = rf.jacobian().inverse() * Eigen::Vector2d(rf.delta[0], rf.delta[1]);
  double gain = 0.0;
  const double current = exact(rf.delta[0], rf.delta[1], rf.pred.x + at(0), rf.pred.y + at(1), gain);
  double best = -std::numeric_limits<double>::infinity();
  int64_t best_pixel = -1;
  for (int64_t k = rf.pixel_begin; k < rf.pixel_end; ++k) {
    if (!w.used[k] || std::hypot(w.x[k] - rf.pred.x, w.y[k] - rf.pred.y) > reach) continue;
    const auto sums = matched_filter(w, rf, b, w.x[k], w.y[k], window, [&](int64_t i) {
      const long dx = std::lround(w.x[i] - w.x[k]), dy = std::lround(w.y[i] - w.y[k]);
      if (std::abs(dx) > half || std::abs(dy) > half) return 0.0;  // pixel centres off the lattice
      return table[size_t(dy + half) * side + size_t(dx + half)];
    });
    const double value = penalised(w.eps1[k], w.eps2[k], sums, gain);
    if (value > best) {
      best = value;
      best_pixel = k;
    }
  }
  if (best_pixel < 0) return false;
  const double found = exact(w.eps1[best_pixel], w.eps2[best_pixel], w.x[best_pixel], w.y[best_pixel], gain);
  if (!(found > current) || !(gain >= 16.0)) return false;
  rf.delta[0] = w.eps1[best_pixel];
  rf.delta[1] = w.eps2[best_pixel];
  return true;
}

}  // namespace

void setup_image(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                 ImageWork& work) {
  work.wavelength = set.wavelength[image];
  work.bandwidth = set.bandwidth[image];
  work.polarization_fraction = set.polarization_fraction[image];
  work.A = set.A_matrix + 9 * image;
  work.profile_model = options.profile == "isotropic" ? ProfileModel::kIsotropic
               : options.profile == "tail"    ? ProfileModel::kTail
                                              : ProfileModel::kAnisotropic;
  work.n_shape = work.profile_model == ProfileModel::kIsotropic ? 1 : 3;
  work.position_sigma_px = options.position_sigma;
  const int64_t first = set.first_reflection(image), end = set.end_reflection(image);
  work.reflections.assign(end - first, ReflectionFit{});
  int64_t capacity = 0;
  for (int64_t r = first; r < end; ++r) {
    const int32_t* b = set.bbox + 4 * r;
    capacity += int64_t(b[1] - b[0]) * (b[3] - b[2]);
  }
  // The gain error model scales the read noise's variance with k^2 (METHODS.md §I.10).
  const double read_scale = options.read_variance_scale.empty()
                                ? 1.0 : options.read_variance_scale[set.crystal_index[image]];
  for (std::vector<double>* v : {&work.counts, &work.x, &work.y, &work.read_noise_sq}) {
    v->clear();
    v->reserve(capacity);
  }
  for (int64_t r = first; r < end; ++r) {
    ReflectionFit& rf = work.reflections[r - first];
    rf.row = r;
    rf.panel = &set.panels[set.panel[r]];
    rf.hkl = set.miller_index + 3 * r;
    rf.bbox = set.bbox + 4 * r;
    rf.intensity_ref = set.intensity_ref[r];
    rf.file_background = set.background[r];
    if (std::isnan(rf.intensity_ref)) rf.flags |= kNoReference;
    const int32_t x0 = rf.bbox[0], x1 = rf.bbox[1], y0 = rf.bbox[2], y1 = rf.bbox[3];
    if (x0 == 0 || y0 == 0 || x1 == rf.panel->nx || y1 == rf.panel->ny) rf.flags |= kPanelEdge;
    rf.pixel_begin = int64_t(work.counts.size());
    const int64_t offset = set.pixel_offset[r];
    const double read_noise_sq = rf.panel->read_noise * rf.panel->read_noise * read_scale;
    for (int32_t j = y0; j < y1; ++j) {
      for (int32_t i = x0; i < x1; ++i) {
        const int64_t t = offset + int64_t(j - y0) * (x1 - x0) + (i - x0);
        if (!set.mask[t]) continue;
        work.counts.push_back(set.counts[t]);
        work.x.push_back(i + 0.5);
        work.y.push_back(j + 0.5);
        work.read_noise_sq.push_back(read_noise_sq);
      }
    }
    rf.pixel_end = int64_t(work.counts.size());
    if (rf.pixel_end - rf.pixel_begin < options.min_valid_pixels) {
      rf.flags |= kTooFewPixels;
      for (std::vector<double>* v : {&work.counts, &work.x, &work.y, &work.read_noise_sq})
        v->resize(rf.pixel_begin);
      rf.pixel_end = rf.pixel_begin;
    }
    choose_background_model(options, rf);
  }
  const size_t n = work.counts.size();
  for (std::vector<double>* v : {&work.eps1, &work.eps2, &work.area, &work.expected, &work.variance,
                                 &work.weight, &work.neighbour_counts})
    v->assign(n, 0.0);
  work.used.assign(n, 1);
}

void update_geometry(ImageWork& work, const ImageParameters& params) {
  for (ReflectionFit& rf : work.reflections) {
    rf.pred = predict(work.A, rf.hkl, work.wavelength, work.polarization_fraction, *rf.panel,
                      params.rotation, params.detector_shift);
    // Bragg's law needs d >= lambda/2 (sin(theta) <= 1); beyond it nothing is predicted.
    // A geometry so extreme that the prediction overflows predicts nothing either.
    if (!rf.pred.hits_panel || !(rf.pred.d >= 0.5 * work.wavelength) || !prediction_finite(rf.pred))
      rf.flags |= kBadPrediction;
    else rf.flags &= ~kBadPrediction;
    rf.partiality = partiality(rf.pred.excitation_error,
                               partiality_width_sq(params.R0, params.eta, rf.pred.d,
                                                   work.wavelength, work.bandwidth));
    double area_sum = 0.0;
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
      double eps_t[2];
      tangential_offset(*rf.panel, rf.pred, work.wavelength, params.detector_shift, work.x[i],
                        work.y[i], eps_t, &work.area[i]);
      work.eps1[i] = eps_t[0];
      work.eps2[i] = eps_t[1];
      area_sum += work.area[i];
    }
    const int64_t n = rf.pixel_end - rf.pixel_begin;
    rf.a_mean = n > 0 ? area_sum / n : kNaN;
    // d eps / d (x, y) at c_pred by central differences (eps is smooth on the pixel scale).
    const double h = 0.01;
    double ex[2][2], ey[2][2], area;
    for (int sgn = 0; sgn < 2; ++sgn) {
      const double d = sgn ? h : -h;
      tangential_offset(*rf.panel, rf.pred, work.wavelength, params.detector_shift, rf.pred.x + d,
                        rf.pred.y, ex[sgn], &area);
      tangential_offset(*rf.panel, rf.pred, work.wavelength, params.detector_shift, rf.pred.x,
                        rf.pred.y + d, ey[sgn], &area);
    }
    for (int c = 0; c < 2; ++c) {
      rf.pixel_jacobian[2 * c] = (ex[1][c] - ex[0][c]) / (2 * h);
      rf.pixel_jacobian[2 * c + 1] = (ey[1][c] - ey[0][c]) / (2 * h);
    }
  }
  set_subpixels(work, work.subpixels);
}

void set_subpixels(ImageWork& work, int n) {
  work.subpixels = n;
  for (ReflectionFit& rf : work.reflections) {
    const double* D = rf.pixel_jacobian;
    const double scale = 1.0 / (6.0 * n * n);
    rf.pixel_smoothing[0] = (D[0] * D[0] + D[1] * D[1]) * scale;
    rf.pixel_smoothing[1] = (D[0] * D[2] + D[1] * D[3]) * scale;
    rf.pixel_smoothing[2] = (D[2] * D[2] + D[3] * D[3]) * scale;
  }
}

int subpixels_for_shape(const ImageWork& work, const double phi[kMaxShape]) {
  return subpixels_for(narrow_sd_px(work, phi));
}

double narrow_sd_px(const ImageWork& work, const double phi[kMaxShape]) {
  const Sym2<double> sigma = profile_tensor(phi[kShapeR1], phi[kShapeA], phi[kShapeC]);
  for (const ReflectionFit& rf : work.reflections) {
    if (rf.pixel_end == rf.pixel_begin || (rf.flags & kBadPrediction)) continue;
    // Per-axis covariance in pixels: D^-1 (Sigma/2) D^-T; its smaller eigenvalue.
    const Eigen::Matrix2d D = rf.jacobian();
    const Eigen::Matrix2d inverse = D.inverse();
    const Eigen::Matrix2d cov = 0.5 * inverse * sym(&sigma.m11) * inverse.transpose();
    const double smallest = Eigen::SelfAdjointEigenSolver<Eigen::Matrix2d>(cov).eigenvalues()(0);
    return std::sqrt(std::max(smallest, 0.0));
  }
  return kNaN;
}

void initialise_reflections(ImageWork& work, const RefineOptions& options) {
  std::vector<double> border;
  for (ReflectionFit& rf : work.reflections) {
    rf.stats = ReflectionStatistics{};
    rf.delta[0] = rf.delta[1] = 0.0;
    rf.neighbour = false;
    rf.neighbour_tries = 0;
    rf.neighbour_amplitude = 0.0;
    if (rf.pixel_end == rf.pixel_begin || !std::isfinite(rf.a_mean)) continue;
    const Eigen::Matrix2d jac = rf.jacobian();
    store_sym(work.position_sigma_px * work.position_sigma_px * jac * jac.transpose(), rf.S);
    // Background: median of the valid pixels on the box's border.
    border.clear();
    const double x0 = rf.bbox[0], x1 = rf.bbox[1], y0 = rf.bbox[2], y1 = rf.bbox[3];
    double sum = 0.0;
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
      sum += work.counts[i];
      if (work.x[i] < x0 + 1 || work.x[i] > x1 - 1 || work.y[i] < y0 + 1 || work.y[i] > y1 - 1)
        border.push_back(work.counts[i]);
    }
    double bg = rf.file_background;
    if (rf.n_background_parameters > 0) {
      if (border.empty()) border.assign(work.counts.begin() + rf.pixel_begin, work.counts.begin() + rf.pixel_end);
      std::nth_element(border.begin(), border.begin() + border.size() / 2, border.end());
      bg = border[border.size() / 2];
    }
    rf.stats.background[0] = rf.n_background_parameters > 0 ? bg : kNaN;
    if (options.pixel_outlier_sigma > 0.0) mark_raw_spikes(work, rf, bg);
    if (options.fit_centres) locate_spot(work, rf);
    else rf.S[0] = rf.S[1] = rf.S[2] = 0.0;
    rf.amplitude_expected = std::max(sum - bg * double(rf.pixel_end - rf.pixel_begin), 0.0);
  }
  (void)options;
}

// Background-subtracted second moments (m11, m12, m22, A^-2) of one clearly visible spot, in
// a window about its centroid, first 2.5 px about the brightest pixel, then three times 3 sd
// (so that a neighbour's spot further away does not count). False for a spot not clearly
// visible.
namespace {
bool spot_moments(const ImageWork& w, const ReflectionFit& rf, double bg, double m[3]) {
  double e1 = 0.0, e2 = 0.0, S = 0.0, noise = 0.0;
  for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
    if (!w.used[i]) continue;
    const double s = w.counts[i] - bg;
    S += s;
    noise += std::max(w.counts[i], 1.0) + w.read_noise_sq[i];
    e1 += s * w.eps1[i];
    e2 += s * w.eps2[i];
  }
  if (!(S > 5.0 * std::sqrt(noise))) return false;
  // Start at the brightest pixel, in a window of 2.5 px.
  int64_t peak = -1;
  for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i)
    if (w.used[i] && (peak < 0 || w.counts[i] > w.counts[peak])) peak = i;
  e1 = w.eps1[peak];
  e2 = w.eps2[peak];
  double radius_sq = 6.25 * rf.a_mean;
  for (int round = 0; round < 4; ++round) {
    double a = 0.0, b = 0.0, c = 0.0, sum = 0.0, c1 = 0.0, c2 = 0.0;
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
      const double u1 = w.eps1[i] - e1, u2 = w.eps2[i] - e2;
      if (!w.used[i] || u1 * u1 + u2 * u2 > radius_sq) continue;
      const double s = w.counts[i] - bg;
      sum += s;
      a += s * u1 * u1;
      b += s * u1 * u2;
      c += s * u2 * u2;
      c1 += s * w.eps1[i];
      c2 += s * w.eps2[i];
    }
    if (!(sum > 0.0) || !(a > 0.0) || !(c > 0.0)) return false;
    m[0] = a / sum;
    m[1] = b / sum;
    m[2] = c / sum;
    e1 = c1 / sum;
    e2 = c2 / sum;
    radius_sq = 9.0 * (m[0] + m[2]);  // 3 sd of the two axes together
  }
  return true;
}
}  // namespace

void initial_shape(const ImageWork& work, double phi[kMaxShape]) {
  std::vector<double> m11, m12, m22;
  double area_fallback = kNaN;
  for (const ReflectionFit& rf : work.reflections) {
    if (rf.pixel_end == rf.pixel_begin || (rf.flags & kBadPrediction)) continue;
    if (std::isnan(area_fallback)) area_fallback = rf.a_mean;
    const double bg = std::isfinite(rf.stats.background[0]) ? rf.stats.background[0] : rf.file_background;
    double m[3];
    if (!spot_moments(work, rf, bg, m)) continue;
    // Second moment = (Sigma + D D'/6)/2 (a whole pixel's width): Sigma = 2 m - D D'/6. The
    // window truncates the Gaussian at 3 sd, which lowers its variance by 3 %: a start only.
    const double* D = rf.pixel_jacobian;
    m11.push_back(2.0 * m[0] - (D[0] * D[0] + D[1] * D[1]) / 6.0);
    m12.push_back(2.0 * m[1] - (D[0] * D[2] + D[1] * D[3]) / 6.0);
    m22.push_back(2.0 * m[2] - (D[2] * D[2] + D[3] * D[3]) / 6.0);
  }
  auto median = [](std::vector<double>& v) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  phi[kShapeA] = phi[kShapeC] = 0.0;
  const double fallback = std::sqrt(2.0 * area_fallback);  // a spot of 1 px sd per axis
  if (m11.size() < 3) {
    phi[kShapeR1] = fallback;
    return;
  }
  double s11 = median(m11), s12 = median(m12), s22 = median(m22);
  const double floor = 0.02 * area_fallback;  // a spot of at least 0.1 px
  s11 = std::max(s11, floor);
  s22 = std::max(s22, floor);
  s12 = std::clamp(s12, -0.9 * std::sqrt(s11 * s22), 0.9 * std::sqrt(s11 * s22));
  const double det = s11 * s22 - s12 * s12;
  const double R1 = std::pow(det, 0.25);
  phi[kShapeR1] = std::isfinite(R1) && R1 > 0 ? R1 : fallback;
  if (work.profile_model == ProfileModel::kIsotropic || !(R1 > 0)) return;
  // Sigma / R1^2 = exp(H) = cosh(l) I + sinh(l)/l H with cosh(l) = trace/2.
  const double n11 = s11 / (R1 * R1), n12 = s12 / (R1 * R1), n22 = s22 / (R1 * R1);
  const double l = std::acosh(std::max(1.0, 0.5 * (n11 + n22)));
  const double scale = l > 1e-8 ? l / std::sinh(l) : 1.0;
  phi[kShapeA] = 0.5 * (n11 - n22) * scale;
  phi[kShapeC] = n12 * scale;
}

void linearise_geometry(ImageWork& work, const ImageParameters& params) {
  using Jet4 = ceres::Jet<double, 4>;
  Jet4 omega[3];
  for (int a = 0; a < 3; ++a) omega[a] = Jet4(params.rotation[a], a);
  const Jet4 shift(params.detector_shift, 3);
  for (ReflectionFit& rf : work.reflections) {
    if (rf.pixel_end == rf.pixel_begin || (rf.flags & kBadPrediction)) continue;
    const Prediction<Jet4> pred = predict(work.A, rf.hkl, work.wavelength,
                                          work.polarization_fraction, *rf.panel, omega, shift);
    GeometryLinearisation& l = rf.geometry_linearisation;
    std::copy(params.rotation, params.rotation + 3, l.omega);
    l.shift = params.detector_shift;
    l.excitation_error = pred.excitation_error.a;
    l.polarization = pred.polarization.a;
    for (int a = 0; a < 3; ++a) {
      l.excitation_error_gradient[a] = pred.excitation_error.v[a];
      l.polarization_gradient[a] = pred.polarization.v[a];
    }
    l.x = pred.x.a;
    l.y = pred.y.a;
    for (int a = 0; a < 4; ++a) {
      l.x_gradient[a] = pred.x.v[a];
      l.y_gradient[a] = pred.y.v[a];
    }
    l.width_sq = partiality_width_sq(params.R0, params.eta, rf.pred.d, work.wavelength,
                                     work.bandwidth);
  }
}

double model_intensity(const ReflectionFit& rf, const ImageParameters& params) {
  return intensity_model(params.G, params.B, rf.pred.d, rf.partiality, rf.pred.polarization,
                         rf.intensity_ref);
}

double model_J_variance(const ReflectionStatistics& st, double j_model) {
  if (!std::isfinite(j_model)) return st.J_variance;
  // First order in J_m - J, which is a few sd at most for the spots the model describes; an
  // outlier's variance is not drawn further (nor its residual compressed).
  const double limit = 3.0 * std::sqrt(st.J_variance);
  const double shift = std::min(std::max(j_model - st.J, -limit), limit);
  const double v = st.J_variance + st.J_variance_slope * shift;
  return std::min(std::max(v, 0.5 * st.J_variance), 2.0 * st.J_variance);
}

void fit_reflections(ImageWork& work, const ImageParameters& params, const RefineOptions& options,
                     bool scale_known) {
  for (ReflectionFit& rf : work.reflections) {
    if (rf.pixel_end == rf.pixel_begin || (rf.flags & kBadPrediction)) {
      rf.stats.J = rf.stats.J_variance = kNaN;
      rf.stats.shape_ok = false;
      continue;
    }
    fit_reflection(work, rf, params, options);
  }
  work.position_sigma_px = positional_scatter(work, work.position_sigma_px);
  work.spot_sd_px = narrow_sd_px(work, params.phi);
  int moving = 0, located = 0;
  for (ReflectionFit& rf : work.reflections) {
    if (!rf.integrated()) continue;
    // A spot the fit misses (J within 2 sd of 0) though the box clearly shows one: start its
    // centre again from where the counts are.
    const ReflectionStatistics& st = rf.stats;
    if (options.fit_centres && !rf.relocated && !(st.J > 2.0 * std::sqrt(st.J_variance)) &&
        (locate_spot(work, rf) || search_centre(work, rf, params))) {
      rf.relocated = true;
      ++moving;
      ++located;
      continue;
    }
    moving += update_centre(rf, work.position_sigma_px, params.error_scale, options.fit_centres);
    update_neighbour(work, rf);
    ++located;
    // The weights' amplitude: the reference's expectation J_model, unless the reflection has
    // none, J_model <= 0, or its reference is an outlier; then the data's J.
    const bool reference = scale_known && !(rf.flags & (kNoReference | kOutlier));
    const double j_model = reference ? model_intensity(rf, params) : kNaN;
    rf.amplitude_expected = j_model > 0.0 ? j_model : std::max(rf.stats.J, 0.0);
  }
  work.centre_moving = located ? double(moving) / located : 0.0;
}

double reflection_profile(const ImageWork& work, const ReflectionFit& rf, const double* phi,
                          int64_t pixel) {
  const Sym2<double> M = profile_precision(phi, rf.S, rf.pixel_smoothing);
  const Sym2<double> M_tail = tail_precision(phi, rf.S);
  const double tail = work.profile_model == ProfileModel::kTail ? phi[kShapeTail] : 0.0;
  return work.area[pixel] * pixel_density(work.eps1[pixel] - rf.delta[0],
                                          work.eps2[pixel] - rf.delta[1], rf.pixel_jacobian,
                                          work.subpixels, M, M_tail, tail);
}

}  // namespace pixelrefine
