#include "reflection_model.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace pixelrefine {
namespace {

// Variance of a statistic linear in the counts, T = sum_p k_p (I_p - Bg_obs), when Bg_obs is
// the mean of the reflection's background set: T = sum_p c_p I_p with
// c_p = k_p - [p in set] K / n_bg, K = sum_p k_p, so var T = sum_p v_p c_p^2.
double linear_statistic_variance(const ImageWork& w, const ReflectionFit& rf,
                                 const std::vector<double>& k) {
  double K = 0.0;
  if (rf.n_background > 0) K = std::accumulate(k.begin(), k.end(), 0.0);
  const double correction = rf.n_background > 0 ? K / rf.n_background : 0.0;
  double variance = 0.0;
  for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
    const double c = k[i - rf.pixel_begin] - (w.in_background[i] ? correction : 0.0);
    variance += c * c * w.variance[i];
  }
  return variance;
}

// Chooses the background set of one reflection and sets Bg_obs and the signal s = I - Bg_obs.
void choose_background(ImageWork& work, ReflectionFit& rf, double file_background,
                       const RefineOptions& options) {
  const int64_t n = rf.pixel_end - rf.pixel_begin;
  for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) work.in_background[i] = 0;
  if (!std::isnan(file_background)) {
    rf.background_observed = file_background;
    rf.n_background = 0;
  } else {
    const double x0 = rf.bbox[0], x1 = rf.bbox[1], y0 = rf.bbox[2], y1 = rf.bbox[3];
    int count = 0;
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
      const bool ring = work.x[i] < x0 + 1 || work.x[i] > x1 - 1 || work.y[i] < y0 + 1 ||
                        work.y[i] > y1 - 1;
      work.in_background[i] = ring;
      count += ring;
    }
    if (count < options.min_background_pixels) {
      const double cx = 0.5 * (x0 + x1), cy = 0.5 * (y0 + y1);
      std::vector<int64_t> order(n);
      std::iota(order.begin(), order.end(), rf.pixel_begin);
      const int take = int(std::min<int64_t>(options.min_background_pixels, n));
      auto distance_sq = [&](int64_t i) {
        return (work.x[i] - cx) * (work.x[i] - cx) + (work.y[i] - cy) * (work.y[i] - cy);
      };
      std::partial_sort(order.begin(), order.begin() + take, order.end(),
                        [&](int64_t a, int64_t b) { return distance_sq(a) > distance_sq(b); });
      for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) work.in_background[i] = 0;
      for (int k = 0; k < take; ++k) work.in_background[order[k]] = 1;
      count = take;
      rf.flags |= kFewBackgroundPixels;
    }
    double sum = 0.0;
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i)
      if (work.in_background[i]) sum += work.counts[i];
    rf.n_background = count;
    rf.background_observed = sum / count;
  }
  for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i)
    work.signal[i] = work.counts[i] - rf.background_observed;
}

}  // namespace

void setup_image(const ShoeboxSetView& set, int64_t image, const RefineOptions& options,
                 ImageWork& work) {
  work.wavelength = set.wavelength[image];
  work.bandwidth = set.bandwidth[image];
  work.polarization_fraction = set.polarization_fraction[image];
  work.A = set.A_matrix + 9 * image;
  const int64_t first = set.first_reflection(image), end = set.end_reflection(image);
  work.reflections.assign(end - first, ReflectionFit{});
  int64_t capacity = 0;
  for (int64_t r = first; r < end; ++r) {
    const int32_t* b = set.bbox + 4 * r;
    capacity += int64_t(b[1] - b[0]) * (b[3] - b[2]);
  }
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
    if (std::isnan(rf.intensity_ref)) rf.flags |= kNoReference;
    const int32_t x0 = rf.bbox[0], x1 = rf.bbox[1], y0 = rf.bbox[2], y1 = rf.bbox[3];
    if (x0 == 0 || y0 == 0 || x1 == rf.panel->nx || y1 == rf.panel->ny) rf.flags |= kPanelEdge;
    rf.pixel_begin = int64_t(work.counts.size());
    const int64_t offset = set.pixel_offset[r];
    const double read_noise_sq = rf.panel->read_noise * rf.panel->read_noise;
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
      work.counts.resize(rf.pixel_begin);
      work.x.resize(rf.pixel_begin);
      work.y.resize(rf.pixel_begin);
      work.read_noise_sq.resize(rf.pixel_begin);
      rf.pixel_end = rf.pixel_begin;
    }
  }
  const size_t n = work.counts.size();
  work.eps_sq.assign(n, 0.0);
  work.area.assign(n, 0.0);
  work.signal.assign(n, 0.0);
  work.weight.assign(n, 1.0);
  work.variance.assign(n, 1.0);
  work.profile.assign(n, 0.0);
  work.in_background.assign(n, 0);
  for (ReflectionFit& rf : work.reflections) {
    if (rf.pixel_end > rf.pixel_begin)
      choose_background(work, rf, set.background[rf.row], options);
  }
}

void update_geometry(ImageWork& work, const ImageParameters& params, double eta) {
  for (ReflectionFit& rf : work.reflections) {
    invalidate_profile_sums(rf);
    rf.pred = predict(work.A, rf.hkl, work.wavelength, work.polarization_fraction, *rf.panel,
                      params.rotation, params.detector_shift);
    if (!rf.pred.hits_panel) rf.flags |= kBadPrediction;
    rf.partiality = partiality(rf.pred.excitation_error,
                               partiality_width_sq(params.R0, eta, rf.pred.d, work.wavelength,
                                                   work.bandwidth));
    double area_sum = 0.0;
    rf.u_sum = 0.0;
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
      double eps_t[2];
      tangential_offset(*rf.panel, rf.pred, work.wavelength, params.detector_shift, work.x[i],
                        work.y[i], eps_t, &work.area[i]);
      work.eps_sq[i] = eps_t[0] * eps_t[0] + eps_t[1] * eps_t[1];
      area_sum += work.area[i];
      rf.u_sum += 0.5 * work.eps_sq[i];
    }
    const int64_t n = rf.pixel_end - rf.pixel_begin;
    rf.a_mean = n > 0 ? area_sum / n : kNaN;
  }
}

void update_background_profile(ImageWork& work, double R1) {
  for (ReflectionFit& rf : work.reflections) {
    rf.background_profile_r1 = R1;
    rf.background_profile_live = 0.0;
    rf.background_profile_slope = 0.0;
    if (rf.n_background == 0) continue;
    double value = 0.0, slope = 0.0;
    const double W = profile_width_sq(R1, rf.a_mean);
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
      if (!work.in_background[i]) continue;
      // P = a exp(-e/W) / (pi W), W = R1^2 + a/6: dP/dR1 = P (e/W^2 - 1/W) 2 R1.
      const double P = profile_density(work.eps_sq[i], work.area[i], 1.0 / W);
      value += P;
      slope += P * (work.eps_sq[i] / (W * W) - 1.0 / W) * 2.0 * R1;
    }
    rf.background_profile_live = value / rf.n_background;
    rf.background_profile_slope = slope / rf.n_background;
  }
}

double model_background(const ReflectionFit& rf, double amplitude) {
  return rf.background_observed - amplitude * rf.background_profile_held;
}

void update_weights(ImageWork& work, const ImageParameters& params, const RefineOptions& options,
                    bool scale_known) {
  thread_local std::vector<double> k;
  for (ReflectionFit& rf : work.reflections) {
    const int64_t n = rf.pixel_end - rf.pixel_begin;
    rf.use_intensity = false;
    rf.use_shape = false;
    rf.intensity_residual = 0.0;
    if (n == 0 || (rf.flags & kBadPrediction)) continue;
    invalidate_profile_sums(rf);  // the weights change: the functors' cached sums are stale
    const bool has_reference = scale_known && !(rf.flags & kNoReference);
    const double j_model =
        has_reference ? intensity_model(params.G, params.B, rf.pred.d, rf.partiality,
                                        rf.pred.polarization, rf.intensity_ref)
                      : kNaN;
    if (std::isnan(rf.J)) {
      double S = 0.0;  // first call: the summation estimate
      for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) S += work.signal[i];
      rf.J = S;
    }
    const double amplitude = has_reference ? j_model : std::max(rf.J, 0.0);
    rf.amplitude_expected = amplitude;

    // The profile once per pixel, and Pbar over the background set.
    double ring = 0.0;
    const double inverse_width_sq = 1.0 / profile_width_sq(params.R1, rf.a_mean);
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
      work.profile[i] = profile_density(work.eps_sq[i], work.area[i], inverse_width_sq);
      if (work.in_background[i]) ring += work.profile[i];
    }
    const double pbar = rf.n_background > 0 ? ring / rf.n_background : 0.0;
    rf.background_profile_held = pbar;

    // Model variance v = max(Bg, 0) + A P + sigma_read^2 (floored). The flat background is the
    // data's, Bg = Bg_obs - J Pbar with J the previous profile fit (the reference sets the
    // expected signal A P, not the background; an A far above the data must not push Bg < 0).
    // Then the sums for J; the model-expected and observed moments of I - Bg_obs.
    const double background = std::max(model_background(rf, std::max(rf.J, 0.0)), 0.0);
    double excess_sum = 0.0, v_sum = 0.0, m2_model = 0.0, x_model = 0.0, y_model = 0.0;
    double S = 0.0, m2_num = 0.0, x_num = 0.0, y_num = 0.0, wPs = 0.0, wPP = 0.0, wP = 0.0;
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i) {
      const double P = work.profile[i];
      const double v =
          std::max(background + amplitude * P + work.read_noise_sq[i], options.variance_floor);
      const double w = 1.0 / v;
      work.weight[i] = w;
      work.variance[i] = v;
      v_sum += v;
      wPs += w * P * work.signal[i];
      wPP += w * P * P;
      wP += w * P;
      const double excess = P - pbar;  // E[I - Bg_obs] / A
      excess_sum += excess;
      m2_model += excess * 0.5 * work.eps_sq[i];
      x_model += excess * work.x[i];
      y_model += excess * work.y[i];
      S += work.signal[i];
      m2_num += work.signal[i] * 0.5 * work.eps_sq[i];
      x_num += work.signal[i] * work.x[i];
      y_num += work.signal[i] * work.y[i];
    }
    m2_model /= excess_sum;
    x_model /= excess_sum;
    y_model /= excess_sum;
    rf.x_offset = x_model - rf.pred.x;
    rf.y_offset = y_model - rf.pred.y;

    // J = sum_p k_p s_p, k_p = w_p P_p / (sum w P^2 - Pbar sum w P), and its variance.
    const double denominator = wPP - pbar * wP;
    k.resize(n);
    for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i)
      k[i - rf.pixel_begin] = work.weight[i] * work.profile[i] / denominator;
    rf.J = wPs / denominator;
    rf.J_variance = linear_statistic_variance(work, rf, k);
    const double ref_var =
        has_reference ? std::pow(options.reference_sigma_rel * j_model, 2) : 0.0;
    rf.sigma_intensity = std::sqrt(rf.J_variance + ref_var);
    rf.use_intensity = has_reference && !(rf.flags & kOutlier) &&
                       std::isfinite(rf.sigma_intensity) && rf.sigma_intensity > 0.0;
    if (rf.use_intensity) rf.intensity_residual = (rf.J - j_model) / rf.sigma_intensity;

    // Observed first and second moments of I - Bg_obs (data only).
    rf.m2_obs = S != 0.0 ? m2_num / S : kNaN;
    rf.x_obs = S != 0.0 ? x_num / S : kNaN;
    rf.y_obs = S != 0.0 ? y_num / S : kNaN;

    // Their sigmas by the delta method about the model-expected moments.
    const double S_model = amplitude * excess_sum;
    const double snr = S_model / std::sqrt(v_sum);
    rf.use_shape = snr >= options.min_snr_shape && S > 0.0;
    if (rf.use_shape) {
      rf.flags &= ~kWeakShape;
      for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i)
        k[i - rf.pixel_begin] = (0.5 * work.eps_sq[i] - m2_model) / S_model;
      rf.sigma_m2 = std::sqrt(linear_statistic_variance(work, rf, k));
      if (options.refine_geometry) {  // Term 3 only
        for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i)
          k[i - rf.pixel_begin] = (work.x[i] - x_model) / S_model;
        rf.sigma_x = std::sqrt(linear_statistic_variance(work, rf, k));
        for (int64_t i = rf.pixel_begin; i < rf.pixel_end; ++i)
          k[i - rf.pixel_begin] = (work.y[i] - y_model) / S_model;
        rf.sigma_y = std::sqrt(linear_statistic_variance(work, rf, k));
      }
    } else {
      rf.flags |= kWeakShape;
      rf.sigma_m2 = rf.sigma_x = rf.sigma_y = kNaN;
    }
  }
}

}  // namespace pixelrefine
