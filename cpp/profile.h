// The spot's profile on the tangent plane of the Ewald sphere (conventions.md "Model"): an
// area-normalised density in the tangential offset eps (A^-1, (e1, e2) basis), a Gaussian core
// with a 2x2 tensor Sigma and an optional heavy-tailed component of the same shape:
//
//   f(u) = (1 - t) sqrt(det M)/pi exp(-u'Mu) + t (beta-1)/pi sqrt(det M_T) (1 + u'M_T u)^-beta,
//
// u = eps - delta (delta: the spot's centre, a per-reflection quantity), M = Sigma_eff^-1 with
// Sigma_eff = Sigma + 2 S + D D'/(6 n^2), and the tail's M_T = (s^2 Sigma + 2 S)^-1 (the tail is s
// times the spot's own width, widened by the centre's error as the core is; its pixel cell is
// averaged by tail_cell_density) (S: the covariance of the centre estimate's error
// over the spots that the spot's own data do not explain, METHODS.md §I.6; D the
// Jacobian d eps / d (x, y): a uniform sub-cell's own covariance D D'/(12 n^2), doubled as
// Sigma is twice the per-axis covariance; n x n sub-pixel points per pixel; see METHODS.md),
// Sigma = R1^2 exp(H),
// H = [[a, c], [c, -a]], so that det(Sigma)^(1/4) = R1 and Sigma = R1^2 I when a = c = 0.
// Both components integrate to 1 over the plane. The isotropic Gaussian of conventions.md is
// the special case a = c = t = 0.
#pragma once

#include <cmath>

#include <ceres/jet.h>

#include "physics.h"

namespace pixelrefine {

// Exponent of the tail's power law; fixed (not refined), (1 + q/s^2)^-2 decays as r^-4.
constexpr double kTailBeta = 2.0;

// Shape parameters of one image, in the order of the refined vector phi.
enum ShapeIndex : int { kShapeR1 = 0, kShapeA = 1, kShapeC = 2, kShapeTail = 3, kShapeTailScale = 4 };
constexpr int kMaxShape = 5;

// Which shape parameters a profile model refines: isotropic {R1}; anisotropic {R1, a, c};
// tail {R1, a, c, t, s}.
enum class ProfileModel : int { kIsotropic = 0, kAnisotropic = 1, kTail = 2 };
inline int shape_count(ProfileModel model) {
  return model == ProfileModel::kIsotropic ? 1 : model == ProfileModel::kAnisotropic ? 3 : 5;
}

// Symmetric 2x2 matrix (m11, m12, m22).
template <typename T>
struct Sym2 {
  T m11, m12, m22;
  T det() const { return m11 * m22 - m12 * m12; }
  Sym2 inverse() const {
    const T d = det();
    return {m22 / d, -m12 / d, m11 / d};
  }
};

// Sigma = R1^2 exp(H), H = [[a, c], [c, -a]]: exp(H) = cosh(l) I + sinh(l)/l H, l^2 = a^2 + c^2
// (series below l = 1e-4, where the closed form loses precision and its Jet derivative is 0/0).
template <typename T>
Sym2<T> profile_tensor(const T& R1, const T& a, const T& c) {
  using std::cosh;
  using std::sinh;
  using std::sqrt;
  const T l_sq = a * a + c * c;
  T cosh_l, sinhc_l;
  if (l_sq < T(1e-8)) {
    cosh_l = T(1.0) + l_sq * 0.5;
    sinhc_l = T(1.0) + l_sq * (1.0 / 6.0);
  } else {
    const T l = sqrt(l_sq);
    cosh_l = cosh(l);
    sinhc_l = sinh(l) / l;
  }
  const T r_sq = R1 * R1;
  return {r_sq * (cosh_l + sinhc_l * a), r_sq * sinhc_l * c, r_sq * (cosh_l - sinhc_l * a)};
}

// The effective tensor M = (Sigma + 2 S + pixel)^-1 of one reflection, pixel = D D'/(6 n^2).
template <typename T>
Sym2<T> profile_precision(const T* phi, const double S[3], const double pixel[3]) {
  Sym2<T> sigma = profile_tensor(phi[kShapeR1], phi[kShapeA], phi[kShapeC]);
  sigma.m11 += 2.0 * S[0] + pixel[0];
  sigma.m12 += 2.0 * S[1] + pixel[1];
  sigma.m22 += 2.0 * S[2] + pixel[2];
  return sigma.inverse();
}

// The tail's tensor M_T = (s^2 Sigma + 2 S)^-1 of one reflection.
template <typename T>
Sym2<T> tail_precision(const T* phi, const double S[3]) {
  Sym2<T> sigma = profile_tensor(phi[kShapeR1], phi[kShapeA], phi[kShapeC]);
  const T s_sq = phi[kShapeTailScale] * phi[kShapeTailScale];
  sigma.m11 = s_sq * sigma.m11 + 2.0 * S[0];
  sigma.m12 = s_sq * sigma.m12 + 2.0 * S[1];
  sigma.m22 = s_sq * sigma.m22 + 2.0 * S[2];
  return sigma.inverse();
}

// The uniform cell's fourth-order correction to the Gaussian smoothing (METHODS.md §I.4). A
// density averaged over a cell spanned by d1, d2 (eps per cell edge) is prod_k sinh(z_k)/z_k
// applied to it, z_k = (d_k . grad)/2; the Gaussian of the cell's covariance is prod_k
// exp(z_k^2/6); their ratio is prod_k (1 - z_k^4/180 + O(z^6)). On the Gaussian core
// exp(-u'Mu), (d . grad)^4 gives (alpha^4 + 6 alpha^2 gamma + 3 gamma^2) exp(-u'Mu) with
// alpha = -2 d'Mu, gamma = -2 d'Md, so the cell's core is exp(-u'Mu) exp(K),
//
//   K = -(1/2880) sum_k (alpha_k^4 + 6 alpha_k^2 gamma_k + 3 gamma_k^2),
//
// exp(K) rather than 1 + K: the same to this order, and positive where the series fails (far
// out in the core's tail, where the core is < 1e-6 of its peak). cell = (d1x, d2x, d1y, d2y),
// the layout of D, divided by the sub-pixel count.
template <typename T, typename U>
T cell_correction(const U& u1, const U& u2, const Sym2<T>& M, const double cell[4]) {
  T sum(0.0);
  for (int k = 0; k < 2; ++k) {
    const double d1 = cell[k], d2 = cell[2 + k];
    const T alpha = -2.0 * (d1 * (M.m11 * u1 + M.m12 * u2) + d2 * (M.m12 * u1 + M.m22 * u2));
    const T gamma = -2.0 * (M.m11 * (d1 * d1) + M.m12 * (2.0 * d1 * d2) + M.m22 * (d2 * d2));
    const T alpha_sq = alpha * alpha;
    sum += alpha_sq * alpha_sq + 6.0 * alpha_sq * gamma + 3.0 * gamma * gamma;
  }
  return sum * (-1.0 / 2880.0);
}

// The tail averaged over one cell (edges d_k = `cell` columns) to second order: the cell's mean
// of g(q), q = u'M_T u, g = (beta - 1)/pi sqrt(det M_T) (1 + q)^-beta, is
// (1 + sum_k (d_k . grad)^2/24) g = g exp(L) to that order, with (d . grad)^2 g = g (4 c alpha^2
// - 2 b gamma), alpha = d'M_T u, gamma = d'M_T d, b = beta/(1 + q), c = b^2 (beta + 1)/beta
// (g' = -b g, g'' = c g in q):
//
//   L = (1/24) sum_k (4 c alpha_k^2 - 2 b gamma_k).
//
// (The core's Gaussian takes the cell as a covariance, exact to this order by the heat equation;
// a power law's width is not a heat flow.) Templated for autodiff.
template <typename T, typename U>
T tail_cell_density(const U& u1, const U& u2, const Sym2<T>& Mt, const double cell[4]) {
  using std::exp;
  using std::sqrt;
  const T Mu1 = Mt.m11 * u1 + Mt.m12 * u2, Mu2 = Mt.m12 * u1 + Mt.m22 * u2;
  const T base = T(1.0) + (u1 * Mu1 + u2 * Mu2);
  const T b = kTailBeta / base, c = b * b * ((kTailBeta + 1.0) / kTailBeta);
  T L(0.0);
  for (int k = 0; k < 2; ++k) {
    const double d1 = cell[k], d2 = cell[2 + k];
    const T alpha = d1 * Mu1 + d2 * Mu2;
    const T gamma = Mt.m11 * (d1 * d1) + Mt.m12 * (2.0 * d1 * d2) + Mt.m22 * (d2 * d2);
    L += 4.0 * c * alpha * alpha - 2.0 * b * gamma;
  }
  return sqrt(Mt.det()) * ((kTailBeta - 1.0) / kPi) / (base * base) * exp(L * (1.0 / 24.0));
}

// f averaged over one cell (edges `cell`) at offset u = eps - delta of the cell's centre (per
// A^-2): the core with its cell correction, the tail with its own (tail_cell_density).
// Templated for autodiff.
template <typename T, typename U>
T profile_density(const U& u1, const U& u2, const Sym2<T>& M, const Sym2<T>& M_tail,
                  const T& tail, const double cell[4]) {
  using std::exp;
  using std::sqrt;
  const T q = M.m11 * u1 * u1 + 2.0 * M.m12 * u1 * u2 + M.m22 * u2 * u2;
  const T core = sqrt(M.det()) * (1.0 / kPi) * exp(cell_correction(u1, u2, M, cell) - q);
  return (T(1.0) - tail) * core + tail * tail_cell_density(u1, u2, M_tail, cell);
}

// The profile averaged over one pixel: the mean of the cell densities of n x n sub-pixel cells
// centred at o = ((i + 1/2)/n - 1/2) pixels, u + D o (D = d eps / d (x, y), eps linear within a
// pixel); each cell's own width D D'/(6 n^2) is in M (profile_precision's `pixel`), its
// fourth-order correction in profile_density. Templated for autodiff (the per-pixel
// objective); the pass uses the hand-written derivatives below.
inline double subpixel_offset(int i, int n) { return (i + 0.5) / n - 0.5; }

// The sub-pixel cell's edges D / n.
inline void subpixel_cell(const double D[4], int n, double cell[4]) {
  for (int k = 0; k < 4; ++k) cell[k] = D[k] / n;
}

template <typename T, typename U>
T pixel_density(const U& u1, const U& u2, const double D[4], int n, const Sym2<T>& M,
                const Sym2<T>& M_tail, const T& tail) {
  double cell[4];
  subpixel_cell(D, n, cell);
  T sum(0.0);
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < n; ++i) {
      const double ox = subpixel_offset(i, n), oy = subpixel_offset(j, n);
      sum += profile_density(u1 + (D[0] * ox + D[1] * oy), u2 + (D[2] * ox + D[3] * oy), M,
                             M_tail, tail, cell);
    }
  }
  return sum * (1.0 / (n * n));
}

// Sub-pixel points per axis for a spot of per-axis sd `sd_px` pixels. With the cell
// correction the largest error of a pixel's profile, relative to the spot's peak, is below 7e-4
// (one point down to 0.65 px; four down to 0.35 px, 2e-4; nine down to 0.25 px), against 3.7e-3
// for one point at 0.7 px without it, which biased R1 by +0.1 % (METHODS.md §I.4).
inline int subpixels_for(double sd_px) {
  if (!(sd_px > 0.0)) return 2;
  return sd_px >= 0.65 ? 1 : sd_px >= 0.35 ? 2 : sd_px >= 0.25 ? 3 : 4;
}

// f and its partial derivatives in the core's M and the tail's M_T (each (m11, m12, m22)), t and
// the centre (delta1, delta2), by hand (the pixel loop's hot path; checked against Jet autodiff
// of profile_density in the tests). Those in (R1, a, c, s) follow by d M/d phi, d M_T/d phi.
struct ProfileDerivatives {
  double value;
  double d_m[3];       // d f / d (m11, m12, m22) of M
  double d_m_tail[3];  // d f / d (m11, m12, m22) of M_T
  double d_tail;
  double d_delta[2];   // d f / d delta = - d f / d u
  double d_delta2[3];  // d^2 f / d delta^2 (11, 12, 22), for the centre-profiling adjustment
};

// The two tensors of one reflection's profile with their determinants, and t.
struct ProfileTensors {
  Sym2<double> M, M_tail;
  double det, root_det, det_tail, root_det_tail, tail;
  ProfileTensors(const Sym2<double>& core, const Sym2<double>& tail_tensor, double t)
      : M(core), M_tail(tail_tensor), det(core.det()), root_det(std::sqrt(det)),
        det_tail(tail_tensor.det()), root_det_tail(std::sqrt(det_tail)), tail(t) {}
};

// d^2 f / d u^2 (11, 12, 22) of a Gaussian core f = sqrt(det M)/pi exp(K - u'Mu) from its
// derivatives in M, by the heat equation: with Sigma = M^-1/2, d f/d Sigma = 1/2 d^2 f/du^2, so
// H = -4 M G M, G the symmetric gradient in M ((g11, g12; g12, g22), g12 = d_m[1]/2). It holds
// for the pixel average (averaging commutes with both sides) and to the cell correction's order
// for K.
inline void heat_equation_curvature(const double d_m[3], const Sym2<double>& M, double h[3]) {
  const double g11 = d_m[0], g12 = 0.5 * d_m[1], g22 = d_m[2];
  const double a11 = M.m11 * g11 + M.m12 * g12, a12 = M.m11 * g12 + M.m12 * g22;  // (M G) row 1
  const double a21 = M.m12 * g11 + M.m22 * g12, a22 = M.m12 * g12 + M.m22 * g22;  // (M G) row 2
  h[0] = -4.0 * (a11 * M.m11 + a12 * M.m12);
  h[1] = -4.0 * (a11 * M.m12 + a12 * M.m22);
  h[2] = -4.0 * (a21 * M.m12 + a22 * M.m22);
}

inline ProfileDerivatives profile_with_derivatives(double u1, double u2, const ProfileTensors& P,
                                                   bool with_tail, const double cell[4],
                                                   bool with_curvature = false) {
  ProfileDerivatives out;
  const Sym2<double>& M = P.M;
  const double det = P.det, tail = P.tail;
  const double Mu1 = M.m11 * u1 + M.m12 * u2, Mu2 = M.m12 * u1 + M.m22 * u2;
  const double q = u1 * Mu1 + u2 * Mu2;
  // d log sqrt(det M) / d (m11, m12, m22) and d q / d (m11, m12, m22).
  const double dlogdet[3] = {0.5 * M.m22 / det, -M.m12 / det, 0.5 * M.m11 / det};
  const double dq[3] = {u1 * u1, 2.0 * u1 * u2, u2 * u2};
  // The cell correction K (cell_correction) and its derivatives in M and delta.
  double K = 0.0, dK_m[3] = {0.0, 0.0, 0.0}, dK_delta[2] = {0.0, 0.0};
  for (int k = 0; k < 2; ++k) {
    const double d1 = cell[k], d2 = cell[2 + k];
    const double alpha = -2.0 * (d1 * Mu1 + d2 * Mu2);
    const double gamma = -2.0 * (M.m11 * d1 * d1 + 2.0 * M.m12 * d1 * d2 + M.m22 * d2 * d2);
    const double alpha_sq = alpha * alpha;
    K += alpha_sq * alpha_sq + 6.0 * alpha_sq * gamma + 3.0 * gamma * gamma;
    const double d_alpha = 4.0 * alpha_sq * alpha + 12.0 * alpha * gamma;
    const double d_gamma = 6.0 * alpha_sq + 6.0 * gamma;
    // d alpha / d (m11, m12, m22) and d gamma / d (...); d alpha / d delta = 2 M d.
    const double da[3] = {-2.0 * d1 * u1, -2.0 * (d1 * u2 + d2 * u1), -2.0 * d2 * u2};
    const double dg[3] = {-2.0 * d1 * d1, -4.0 * d1 * d2, -2.0 * d2 * d2};
    for (int i = 0; i < 3; ++i) dK_m[i] += d_alpha * da[i] + d_gamma * dg[i];
    dK_delta[0] += d_alpha * 2.0 * (M.m11 * d1 + M.m12 * d2);
    dK_delta[1] += d_alpha * 2.0 * (M.m12 * d1 + M.m22 * d2);
  }
  constexpr double kCell = -1.0 / 2880.0;
  K *= kCell;
  const double core = P.root_det * (1.0 / kPi) * std::exp(K - q);
  const double w_core = (1.0 - tail) * core;
  // The tail g exp(L) in q_T = u'M_T u (tail_cell_density) and its derivatives.
  const Sym2<double>& Mt = P.M_tail;
  const double Mtu1 = Mt.m11 * u1 + Mt.m12 * u2, Mtu2 = Mt.m12 * u1 + Mt.m22 * u2;
  double w_tail = 0.0, b = 0.0, tail_density = 0.0;
  double dlog_dq = 0.0, dL_m[3] = {0.0, 0.0, 0.0}, dL_u[2] = {0.0, 0.0};
  if (with_tail) {
    const double base = 1.0 + u1 * Mtu1 + u2 * Mtu2;
    b = kTailBeta / base;
    const double c = b * b * (kTailBeta + 1.0) / kTailBeta;
    const double db = -b * b / kTailBeta, dc = -2.0 * b * c / kTailBeta;  // d/d q_T
    double L = 0.0, dL_dq = 0.0;
    for (int k = 0; k < 2; ++k) {
      const double d1 = cell[k], d2 = cell[2 + k];
      const double alpha = d1 * Mtu1 + d2 * Mtu2;
      const double gamma = Mt.m11 * d1 * d1 + 2.0 * Mt.m12 * d1 * d2 + Mt.m22 * d2 * d2;
      L += 4.0 * c * alpha * alpha - 2.0 * b * gamma;
      dL_dq += 4.0 * dc * alpha * alpha - 2.0 * db * gamma;
      // d alpha / d (m11, m12, m22), d gamma / d (...); d alpha / d u = M_T d.
      const double da[3] = {d1 * u1, d1 * u2 + d2 * u1, d2 * u2};
      const double dg[3] = {d1 * d1, 2.0 * d1 * d2, d2 * d2};
      for (int i = 0; i < 3; ++i) dL_m[i] += (8.0 * c * alpha * da[i] - 2.0 * b * dg[i]) / 24.0;
      dL_u[0] += 8.0 * c * alpha * (Mt.m11 * d1 + Mt.m12 * d2) / 24.0;
      dL_u[1] += 8.0 * c * alpha * (Mt.m12 * d1 + Mt.m22 * d2) / 24.0;
    }
    tail_density = P.root_det_tail * ((kTailBeta - 1.0) / kPi) / (base * base) * std::exp(L / 24.0);
    w_tail = tail * tail_density;
    dlog_dq = -b + dL_dq / 24.0;  // d log(tail) / d q_T, L's q-dependence included
  }
  out.value = w_core + w_tail;
  out.d_tail = tail_density - core;
  const double dlogdet_tail[3] = {0.5 * Mt.m22 / P.det_tail, -Mt.m12 / P.det_tail,
                                  0.5 * Mt.m11 / P.det_tail};
  for (int i = 0; i < 3; ++i) {
    out.d_m[i] = w_core * (dlogdet[i] - dq[i] + kCell * dK_m[i]);
    out.d_m_tail[i] = w_tail * (dlogdet_tail[i] + dlog_dq * dq[i] + dL_m[i]);
  }
  // d q / d delta = -2 M u, d q_T / d delta = -2 M_T u, d L / d delta = -d L / d u.
  out.d_delta[0] = 2.0 * (w_core * Mu1 - w_tail * dlog_dq * Mtu1) - w_tail * dL_u[0] +
                   w_core * kCell * dK_delta[0];
  out.d_delta[1] = 2.0 * (w_core * Mu2 - w_tail * dlog_dq * Mtu2) - w_tail * dL_u[1] +
                   w_core * kCell * dK_delta[1];
  // d^2 f / d delta^2 (only where asked: the centre-profiling adjustment): the core's by the
  // heat equation; the tail's, g(q_T) with g' = -b g, g'' = b^2 (beta + 1)/beta g, is
  // g'' 4 M_T u (M_T u)' + g' 2 M_T (exp(L)'s own curvature, of the cell's order, left out).
  out.d_delta2[0] = out.d_delta2[1] = out.d_delta2[2] = 0.0;
  if (!with_curvature) return out;
  heat_equation_curvature(out.d_m, M, out.d_delta2);
  if (with_tail) {
    const double first = w_tail * b;
    const double second = 4.0 * first * b * (kTailBeta + 1.0) / kTailBeta;
    out.d_delta2[0] += second * Mtu1 * Mtu1 - 2.0 * first * Mt.m11;
    out.d_delta2[1] += second * Mtu1 * Mtu2 - 2.0 * first * Mt.m12;
    out.d_delta2[2] += second * Mtu2 * Mtu2 - 2.0 * first * Mt.m22;
  }
  return out;
}

// The core's M and the tail's M_T of one reflection and their derivatives in (R1, a, c, s), by
// forward-mode autodiff of profile_precision and tail_precision (d M / d s = 0).
struct PrecisionWithDerivatives {
  Sym2<double> M, M_tail;
  double dM[3][4] = {};       // [component m11, m12, m22][R1, a, c, s]
  double dM_tail[3][4] = {};

  // d f / d phi_k from f's derivatives in the two tensors (k: R1, a, c, s).
  double chain(const ProfileDerivatives& f, int k) const {
    double sum = 0.0;
    for (int c = 0; c < 3; ++c) sum += f.d_m[c] * dM[c][k] + f.d_m_tail[c] * dM_tail[c][k];
    return sum;
  }
};

// A tensor's value and its 4 Jet derivatives.
inline void store_tensor(const Sym2<ceres::Jet<double, 4>>& J, Sym2<double>& value,
                         double d[3][4]) {
  value = {J.m11.a, J.m12.a, J.m22.a};
  for (int k = 0; k < 4; ++k) {
    d[0][k] = J.m11.v[k];
    d[1][k] = J.m12.v[k];
    d[2][k] = J.m22.v[k];
  }
}

inline PrecisionWithDerivatives precision_derivatives(const double phi[kMaxShape],
                                                      const double S[3], const double pixel[3]) {
  using Jet4 = ceres::Jet<double, 4>;
  Jet4 p[kMaxShape];
  for (int k = 0; k < kMaxShape; ++k) p[k] = Jet4(phi[k]);
  for (int k = 0; k < 3; ++k) p[k].v[k] = 1.0;
  p[kShapeTailScale].v[3] = 1.0;
  PrecisionWithDerivatives out;
  store_tensor(profile_precision(p, S, pixel), out.M, out.dM);
  store_tensor(tail_precision(p, S), out.M_tail, out.dM_tail);
  return out;
}

}  // namespace pixelrefine
