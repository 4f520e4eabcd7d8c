// Non-owning views of a ShoeboxSet's arrays (struct of arrays, shared without copies with
// NumPy) and of the per-image and per-reflection result arrays the core writes into.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "physics.h"

namespace pixelrefine {

struct ShoeboxSetView {
  // /detector, one row per panel
  int64_t n_panels = 0;
  const double* origin = nullptr;      // [P, 3]
  const double* fast_axis = nullptr;   // [P, 3]
  const double* slow_axis = nullptr;   // [P, 3]
  const double* pixel_size = nullptr;  // [P]
  const int32_t* panel_size = nullptr; // [P, 2] (nx, ny)
  const double* read_noise = nullptr;  // [P]
  // /images, one row per still
  int64_t n_images = 0;
  const double* wavelength = nullptr;             // [N]
  const double* bandwidth = nullptr;              // [N]
  const double* A_matrix = nullptr;               // [N, 3, 3]
  const double* polarization_fraction = nullptr;  // [N]
  const int32_t* crystal_index = nullptr;         // [N], 0..C-1
  // /reflections, sorted by image_id
  int64_t n_reflections = 0;
  const int32_t* image_id = nullptr;       // [M]
  const int16_t* panel = nullptr;          // [M]
  const int32_t* miller_index = nullptr;   // [M, 3]
  const double* intensity_ref = nullptr;   // [M]
  const int32_t* bbox = nullptr;           // [M, 4] x0, x1, y0, y1
  const int64_t* pixel_offset = nullptr;   // [M]
  const float* background = nullptr;       // [M], NaN = estimate
  // /pixels
  int64_t n_pixels = 0;
  const float* counts = nullptr;  // [T]
  const uint8_t* mask = nullptr;  // [T]

  // Derived by validate(): panels with their normals, and the reflection rows of each image.
  std::vector<Panel> panels;
  std::vector<int64_t> image_start;  // [N + 1]

  // Checks every value the core relies on and fills the derived members. Throws
  // std::invalid_argument naming the dataset (as in the file format) and the first bad row.
  void validate();

  int64_t first_reflection(int64_t image) const { return image_start[image]; }
  int64_t end_reflection(int64_t image) const { return image_start[image + 1]; }

 private:
  void validate_detector();
  void validate_images();
  void validate_reflections();
  void check_pixels_disjoint() const;
  void validate_pixels() const;
};

// Result arrays, one row per image or per reflection, written in place by the core. The
// starting values of a refinement are read from the same arrays where they are finite (warm
// start: G, B, shape, rotation, detector_shift, centre_offset, background_plane), so that the
// global loop can refine an image again from where it stopped.
struct ResultsView {
  int n_covariance = 3;  // k of covariance [N, k, k]
  // Per image.
  double* G = nullptr;
  double* G_sigma = nullptr;
  double* B = nullptr;
  double* B_sigma = nullptr;
  double* R1 = nullptr;
  double* R1_sigma = nullptr;
  double* R1_tensor = nullptr;       // [N, 3] Sigma11, Sigma12, Sigma22 (A^-2)
  double* shape = nullptr;           // [N, 5] R1, a, c, t, s (warm start)
  double* rotation = nullptr;        // [N, 3]
  double* rotation_sigma = nullptr;  // [N, 3]
  double* detector_shift = nullptr;
  double* detector_shift_sigma = nullptr;
  int32_t* status = nullptr;
  int32_t* n_iterations = nullptr;
  int32_t* n_outer = nullptr;
  double* cost = nullptr;
  int32_t* n_reflections = nullptr;  // in the scale fit (Term 1) at the end
  int32_t* n_integrated = nullptr;
  double* chi2_pixel = nullptr;      // pooled chi^2 per degree of freedom of the pixels
  double* chi2_intensity = nullptr;  // mean (r1)^2
  double* chi2_shape = nullptr;      // mean (r2)^2 per shape residual
  double* chi2_position = nullptr;   // mean (r3)^2 per position residual (NaN: Term 3 off)
  double* position_sigma = nullptr;  // rms offset of spots from their predictions (pixels)
  double* spot_sd = nullptr;         // rms width of the spot's core per axis (pixels)
  double* covariance = nullptr;      // [N, k, k]
  // Per image: contributions to the per-crystal global step (sums over images).
  double* R0_gradient = nullptr;     // d cost / d log R0, reduced (Schur) over the image's scale
  double* R0_curvature = nullptr;
  double* tail_gradient = nullptr;   // [N, 2] d cost / d (t, s), reduced over the image's shape
  double* tail_curvature = nullptr;  // [N, 3] (tt, ts, ss)
  double* background_residual_sq = nullptr; // sum e^2 of background-dominated pixels
  double* background_dof = nullptr;         // their degrees of freedom, sum (1 - h)
  double* background_poisson = nullptr;     // sum (1 - h) of their variance's Poisson part
  double* background_read = nullptr;        // sum (1 - h) of their variance's read-noise part
  // Per reflection.
  double* intensity_prf = nullptr;
  double* intensity_prf_sigma = nullptr;
  double* intensity_scaled = nullptr;
  double* intensity_scaled_sigma = nullptr;
  double* intensity_model = nullptr;
  double* intensity_count_sigma = nullptr;  // sqrt(var J) with k = 1 (the error model's input)
  double* partiality = nullptr;
  double* excitation_error = nullptr;
  double* d = nullptr;
  double* xyzcal = nullptr;  // [M, 2]
  double* xyzobs = nullptr;  // [M, 2]
  double* m2_obs = nullptr;
  double* background = nullptr;
  double* background_plane = nullptr;  // [M, 3] b, db/dx, db/dy (photons, per pixel)
  double* centre_offset = nullptr;     // [M, 2] delta (A^-1, e1/e2 basis)
  double* profile_fraction = nullptr;
  double* chi2_pixel_reflection = nullptr;  // the reflection's pixel chi^2 per degree of freedom
  int32_t* flags = nullptr;
};

}  // namespace pixelrefine
