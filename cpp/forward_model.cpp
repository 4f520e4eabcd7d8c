#include "forward_model.h"

#include <stdexcept>
#include <string>

#include "physics.h"

namespace pixelrefine {
namespace {

void image_geometry(const ImageModel& model, int64_t image, double omega[3], double* shift) {
  for (int i = 0; i < 3; ++i) omega[i] = model.rotation ? model.rotation[3 * image + i] : 0.0;
  *shift = model.detector_shift ? model.detector_shift[image] : 0.0;
}

}  // namespace

void predict_reflections(const ShoeboxSetView& set, const ImageModel& model,
                         const PredictionArrays& arrays) {
  for (int64_t r = 0; r < arrays.n; ++r) {
    const int64_t image = arrays.image_id[r];
    const int64_t panel = arrays.panel[r];
    if (image < 0 || image >= set.n_images)
      throw std::invalid_argument("image_id row " + std::to_string(r) + " is not an image");
    if (panel < 0 || panel >= set.n_panels)
      throw std::invalid_argument("panel row " + std::to_string(r) + " is not a panel");
    double omega[3], shift;
    image_geometry(model, image, omega, &shift);
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

void shoebox_profiles(const ShoeboxSetView& set, const ImageModel& model, int subsample,
                      double* out) {
  if (subsample < 1) throw std::invalid_argument("subsample must be >= 1");
  const double step = 1.0 / subsample;
  const double weight = step * step;
  for (int64_t r = 0; r < set.n_reflections; ++r) {
    const int64_t image = set.image_id[r];
    const Panel& panel = set.panels[set.panel[r]];
    double omega[3], shift;
    image_geometry(model, image, omega, &shift);
    const double wavelength = set.wavelength[image];
    const double inverse_width_sq = 1.0 / (model.R1[image] * model.R1[image]);
    const Prediction<double> pred =
        predict(set.A_matrix + 9 * image, set.miller_index + 3 * r, wavelength,
                set.polarization_fraction[image], panel, omega, shift);
    const int32_t* b = set.bbox + 4 * r;
    int64_t t = set.pixel_offset[r];
    for (int32_t j = b[2]; j < b[3]; ++j) {
      for (int32_t i = b[0]; i < b[1]; ++i, ++t) {
        double sum = 0.0;
        for (int sj = 0; sj < subsample; ++sj) {
          for (int si = 0; si < subsample; ++si) {
            double eps_t[2], area;
            tangential_offset(panel, pred, wavelength, shift, i + (si + 0.5) * step,
                              j + (sj + 0.5) * step, eps_t, &area);
            // The true (unsmoothed) profile at the sub-pixel point, times the pixel's area.
            sum += area * tangential_density(eps_t[0] * eps_t[0] + eps_t[1] * eps_t[1],
                                             inverse_width_sq);
          }
        }
        out[t] = sum * weight;
      }
    }
  }
}

}  // namespace pixelrefine
