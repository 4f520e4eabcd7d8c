// The forward model evaluated outside a refinement: predictions for arbitrary Miller indices
// (tests and reports) and the profile with its derivatives at given offsets (tests of the
// hand-written derivatives against autodiff).
#pragma once

#include <cstdint>

#include "profile.h"
#include "shoebox_view.h"

namespace pixelrefine {

struct PredictionArrays {
  int64_t n = 0;
  const int32_t* image_id = nullptr;      // [M]
  const int16_t* panel = nullptr;         // [M]
  const int32_t* miller_index = nullptr;  // [M, 3]
  double* d = nullptr;                    // outputs, [M]
  double* excitation_error = nullptr;
  double* partiality = nullptr;
  double* polarization = nullptr;
  double* xyzcal = nullptr;  // [M, 2]
  uint8_t* hits_panel = nullptr;
};

// Per-image geometry and widths: R0 per image, rotation [N, 3] and shift [N] (may be null).
struct ImageModel {
  const double* R0 = nullptr;
  const double* rotation = nullptr;
  const double* detector_shift = nullptr;
  double eta = 0.0;
};

// Predicts reflections (detector and images of `set` must be validated).
void predict_reflections(const ShoeboxSetView& set, const ImageModel& model,
                         const PredictionArrays& arrays);

// The profile f(eps - delta) of profile.h averaged over one cell of edges `cell` (the layout of
// D), with its derivatives in
// (R1, a, c, t, s, delta1, delta2): by hand (profile_with_derivatives chained through dM/dphi,
// as the refinement computes them) and by Jet autodiff of profile_density.
struct ProfileCheck {
  double value = 0.0;
  double by_hand[7] = {};
  double autodiff[7] = {};
  double curvature[3] = {};  // d^2 f / d delta^2 (11, 12, 22), as the pass computes it
};
ProfileCheck check_profile(double eps1, double eps2, const double phi[kMaxShape],
                           const double S[3], const double pixel[3], const double delta[2],
                           const double cell[4], bool tail);

}  // namespace pixelrefine
