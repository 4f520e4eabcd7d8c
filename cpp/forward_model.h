// The forward model evaluated outside a refinement: predictions for arbitrary Miller indices
// (used by the simulator to choose reflections) and pixel-integrated profiles of shoeboxes
// (used by the simulator to draw counts and by `report` to compare model and data).
#pragma once

#include <cstdint>

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
  const double* R1 = nullptr;
  const double* rotation = nullptr;
  const double* detector_shift = nullptr;
  double eta = 0.0;
};

// Predicts reflections (detector and images of `set` must be validated).
void predict_reflections(const ShoeboxSetView& set, const ImageModel& model,
                         const PredictionArrays& arrays);

// Area-normalised profile integrated over every pixel of every shoebox (masked ones too) by
// subsample x subsample sampling of each pixel: out[t] = (1/k^2) sum_sub a g / (pi R1^2), g
// the true profile at the sub-pixel point (no pixel smoothing: the sampling does that).
void shoebox_profiles(const ShoeboxSetView& set, const ImageModel& model, int subsample,
                      double* out);

}  // namespace pixelrefine
