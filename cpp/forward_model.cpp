#include "forward_model.h"

#include <stdexcept>
#include <string>

#include "physics.h"

namespace pixelrefine {

void predict_reflections(const ShoeboxSetView& set, const ImageModel& model,
                         const PredictionArrays& arrays) {
  for (int64_t r = 0; r < arrays.n; ++r) {
    const int64_t image = arrays.image_id[r];
    const int64_t panel = arrays.panel[r];
    if (image < 0 || image >= set.n_images)
      throw std::invalid_argument("image_id row " + std::to_string(r) + " is not an image");
    if (panel < 0 || panel >= set.n_panels)
      throw std::invalid_argument("panel row " + std::to_string(r) + " is not a panel");
    double omega[3];
    for (int i = 0; i < 3; ++i) omega[i] = model.rotation ? model.rotation[3 * image + i] : 0.0;
    const double shift = model.detector_shift ? model.detector_shift[image] : 0.0;
    const double wavelength = set.wavelength[image];
    const Prediction<double> pred =
        predict(set.A_matrix + 9 * image, arrays.miller_index + 3 * r, wavelength,
                set.polarization_fraction[image], set.panels[panel], omega, shift);
    const double width_sq =
        partiality_width_sq(model.R0[image], model.eta, pred.d, wavelength, set.bandwidth[image]);
    arrays.d[r] = pred.d;
    arrays.excitation_error[r] = pred.excitation_error;
    arrays.partiality[r] = partiality(pred.excitation_error, width_sq);
    arrays.polarization[r] = pred.polarization;
    arrays.xyzcal[2 * r] = pred.x;
    arrays.xyzcal[2 * r + 1] = pred.y;
    arrays.hits_panel[r] = pred.hits_panel;
  }
}

ProfileCheck check_profile(double eps1, double eps2, const double phi[kMaxShape],
                           const double S[3], const double pixel[3], const double delta[2],
                           const double cell[4], bool tail) {
  ProfileCheck out;
  // By hand: d f / d (M, M_T) chained with d (M, M_T) / d (R1, a, c, s), as the pass does.
  const PrecisionWithDerivatives pd = precision_derivatives(phi, S, pixel);
  const ProfileTensors P(pd.M, pd.M_tail, tail ? phi[kShapeTail] : 0.0);
  const ProfileDerivatives f = profile_with_derivatives(eps1 - delta[0], eps2 - delta[1], P, tail,
                                                        cell, /*with_curvature=*/true);
  out.value = f.value;
  for (int k = 0; k < 3; ++k) out.by_hand[k] = pd.chain(f, k);
  out.by_hand[3] = tail ? f.d_tail : 0.0;
  out.by_hand[4] = tail ? pd.chain(f, 3) : 0.0;
  out.by_hand[5] = f.d_delta[0];
  out.by_hand[6] = f.d_delta[1];
  for (int k = 0; k < 3; ++k) out.curvature[k] = f.d_delta2[k];
  // Autodiff of the templated density in all seven.
  using Jet7 = ceres::Jet<double, 7>;
  Jet7 p7[kMaxShape];
  for (int k = 0; k < kMaxShape; ++k) p7[k] = Jet7(phi[k], k);
  const Jet7 d1(delta[0], 5), d2(delta[1], 6);
  const Sym2<Jet7> M7 = profile_precision(p7, S, pixel), M7_tail = tail_precision(p7, S);
  const Jet7 value = profile_density(Jet7(eps1) - d1, Jet7(eps2) - d2, M7, M7_tail,
                                     tail ? p7[kShapeTail] : Jet7(0.0), cell);
  for (int k = 0; k < 7; ++k) out.autodiff[k] = value.v[k];
  return out;
}

}  // namespace pixelrefine
