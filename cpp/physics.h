// The physics of one still image: prediction, partiality, scale chain and the tangential
// profile. Every formula of conventions.md lives here once, as a small template usable with
// double and with ceres::Jet (autodiff). Symbols follow conventions.md; METHODS.md maps each
// symbol to the names used here.
#pragma once

#include <cmath>

#include <ceres/jet.h>
#include <ceres/rotation.h>

namespace pixelrefine {

constexpr double kPi = 3.14159265358979323846;

template <typename T>
inline T dot3(const T a[3], const T b[3]) {
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}

template <typename T>
inline void cross3(const T a[3], const T b[3], T out[3]) {
  out[0] = a[1] * b[2] - a[2] * b[1];
  out[1] = a[2] * b[0] - a[0] * b[2];
  out[2] = a[0] * b[1] - a[1] * b[0];
}

template <typename T>
inline T norm3(const T a[3]) {
  using std::sqrt;
  return sqrt(dot3(a, a));
}

// One flat detector panel (conventions.md "Detector"); all lengths in mm.
struct Panel {
  double origin[3];
  double fast[3];
  double slow[3];
  double normal[3];  // unit(fast x slow)
  double pixel_size;
  double read_noise;  // rms, photons
  int nx, ny;
};

// Lab position r = o + shift*z + x*p*f + y*p*e of continuous pixel coordinates (x, y).
template <typename T>
inline void pixel_to_lab(const Panel& panel, const T& detector_shift, const T& x, const T& y,
                         T r[3]) {
  const double p = panel.pixel_size;
  for (int i = 0; i < 3; ++i) {
    r[i] = T(panel.origin[i]) + x * (p * panel.fast[i]) + y * (p * panel.slow[i]);
  }
  r[2] += detector_shift;
}

// q_h = R(omega) * A * h. A is row-major 3x3 (A[3*i + j]); omega a Rodrigues vector (rad).
template <typename T>
inline void reciprocal_lattice_vector(const double A[9], const int32_t hkl[3], const T omega[3],
                                      T q[3]) {
  T q0[3];
  for (int i = 0; i < 3; ++i) {
    q0[i] = T(A[3 * i] * hkl[0] + A[3 * i + 1] * hkl[1] + A[3 * i + 2] * hkl[2]);
  }
  ceres::AngleAxisRotatePoint(omega, q0, q);
}

// Everything predicted for one reflection from the geometry alone.
template <typename T>
struct Prediction {
  T s_hat[3];          // unit predicted direction (s0 + q)/|s0 + q|
  T e1[3], e2[3];      // tangential basis: e1 = unit(z x s_hat), e2 = s_hat x e1
  T excitation_error;  // eps_r = |s0 + q| - 1/lambda (A^-1)
  T d;                 // resolution 1/|q| (A)
  T x, y;              // c_pred, continuous pixel coordinates on the reflection's panel
  T polarization;      // pol = 1 - f*sx^2 - (1 - f)*sy^2
  bool hits_panel;     // the ray along s_hat meets the panel's plane in front of the crystal
};

template <typename T>
inline Prediction<T> predict(const double A[9], const int32_t hkl[3], double wavelength,
                             double polarization_fraction, const Panel& panel, const T omega[3],
                             const T& detector_shift) {
  using std::sqrt;
  Prediction<T> out;
  T q[3];
  reciprocal_lattice_vector(A, hkl, omega, q);
  out.d = T(1.0) / norm3(q);
  const double inv_lambda = 1.0 / wavelength;
  T s[3] = {q[0], q[1], q[2] + T(inv_lambda)};  // s0 + q, s0 = (0, 0, 1/lambda)
  const T s_norm = norm3(s);
  out.excitation_error = s_norm - T(inv_lambda);
  for (int i = 0; i < 3; ++i) out.s_hat[i] = s[i] / s_norm;

  // Tangential basis at the prediction.
  const T rho = sqrt(out.s_hat[0] * out.s_hat[0] + out.s_hat[1] * out.s_hat[1]);
  out.e1[0] = -out.s_hat[1] / rho;
  out.e1[1] = out.s_hat[0] / rho;
  out.e1[2] = T(0.0);
  cross3(out.s_hat, out.e1, out.e2);

  out.polarization = T(1.0) - T(polarization_fraction) * out.s_hat[0] * out.s_hat[0] -
                     T(1.0 - polarization_fraction) * out.s_hat[1] * out.s_hat[1];

  // Ray from the crystal along s_hat meets the panel plane (r - o').n = 0.
  T origin[3] = {T(panel.origin[0]), T(panel.origin[1]), T(panel.origin[2]) + detector_shift};
  T normal[3] = {T(panel.normal[0]), T(panel.normal[1]), T(panel.normal[2])};
  const T denom = dot3(out.s_hat, normal);
  const T t = dot3(origin, normal) / denom;
  using std::isfinite;
  using ceres::isfinite;
  out.hits_panel = isfinite(t) && t > T(0.0);
  // Solve r - o' = (x p) f + (y p) e for (x, y) with the Gram matrix of (f, e), which is
  // exact for unit axes that are not quite orthogonal.
  T delta[3];
  for (int i = 0; i < 3; ++i) delta[i] = t * out.s_hat[i] - origin[i];
  const double c = panel.fast[0] * panel.slow[0] + panel.fast[1] * panel.slow[1] +
                   panel.fast[2] * panel.slow[2];
  const T df = delta[0] * panel.fast[0] + delta[1] * panel.fast[1] + delta[2] * panel.fast[2];
  const T de = delta[0] * panel.slow[0] + delta[1] * panel.slow[1] + delta[2] * panel.slow[2];
  const double det = (1.0 - c * c) * panel.pixel_size;
  out.x = (df - c * de) / det;
  out.y = (de - c * df) / det;
  return out;
}

// Whether every number of a prediction is finite (an extreme geometry can overflow it).
inline bool prediction_finite(const Prediction<double>& p) {
  bool ok = std::isfinite(p.excitation_error) && std::isfinite(p.d) && std::isfinite(p.x) &&
            std::isfinite(p.y) && std::isfinite(p.polarization);
  for (int i = 0; i < 3; ++i)
    ok = ok && std::isfinite(p.s_hat[i]) && std::isfinite(p.e1[i]) && std::isfinite(p.e2[i]);
  return ok;
}

// R0_eff^2 = R0^2 + R_mos^2 + R_bw^2, with R_mos^2 = 2 (eta cos(theta)/d)^2 and
// R_bw^2 = (b lambda)^2 / (2 d^4); sin(theta) = lambda / (2 d).
template <typename T>
inline T partiality_width_sq(const T& R0, const T& eta, const T& d, double wavelength,
                             double bandwidth) {
  const T sin_theta = T(wavelength) / (T(2.0) * d);
  // cos^2(theta) >= 0: beyond d = lambda/2 nothing diffracts (flagged by the callers).
  T cos_theta_sq = T(1.0) - sin_theta * sin_theta;
  if (cos_theta_sq < T(0.0)) cos_theta_sq = T(0.0);
  const T r_mos_sq = T(2.0) * eta * eta * cos_theta_sq / (d * d);
  const double b_lambda = bandwidth * wavelength;
  const T r_bw_sq = T(b_lambda * b_lambda) / (T(2.0) * d * d * d * d);
  return R0 * R0 + r_mos_sq + r_bw_sq;
}

// p = exp(-eps_r^2 / R0_eff^2).
template <typename T>
inline T partiality(const T& excitation_error, const T& width_sq) {
  using std::exp;
  return exp(-excitation_error * excitation_error / width_sq);
}

// B_term = exp(-B / (4 d^2)).
template <typename T, typename D>
inline T debye_waller_term(const T& B, const D& d) {
  using std::exp;
  return exp(-B / (T(4.0) * d * d));
}

// J_model = G * B_term * p * pol * I_ref.
template <typename T, typename D, typename P>
inline T intensity_model(const T& G, const T& B, const D& d, const P& partiality_value,
                         const P& polarization, double intensity_ref) {
  return G * debye_waller_term(B, d) * partiality_value * polarization * T(intensity_ref);
}

// Tangential offset of a pixel centre and the pixel's area on the Ewald sphere.
// eps_t = ((s(r) - s_hat/lambda).e1, (s(r) - s_hat/lambda).e2), s(r) = r_hat / lambda;
// a = p^2 |n.r_hat| / (|r|^2 lambda^2).
template <typename T>
inline void tangential_offset(const Panel& panel, const Prediction<T>& pred, double wavelength,
                              const T& detector_shift, const T& x, const T& y, T eps_t[2],
                              T* area) {
  using std::abs;
  T r[3];
  pixel_to_lab(panel, detector_shift, x, y, r);
  const T r_norm = norm3(r);
  const double inv_lambda = 1.0 / wavelength;
  T ds[3];
  for (int i = 0; i < 3; ++i) ds[i] = (r[i] / r_norm - pred.s_hat[i]) * inv_lambda;
  eps_t[0] = dot3(ds, pred.e1);
  eps_t[1] = dot3(ds, pred.e2);
  const T cos_incidence =
      (r[0] * panel.normal[0] + r[1] * panel.normal[1] + r[2] * panel.normal[2]) / r_norm;
  *area = T(panel.pixel_size * panel.pixel_size) * abs(cos_incidence) /
          (r_norm * r_norm * T(wavelength * wavelength));
}

}  // namespace pixelrefine
