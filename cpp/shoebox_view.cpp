#include "shoebox_view.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <map>
#include <sstream>
#include <stdexcept>
#include <utility>

namespace pixelrefine {
namespace {

[[noreturn]] void fail(const std::string& dataset, int64_t row, const std::string& what) {
  std::ostringstream msg;
  msg << dataset << " row " << row << ": " << what;
  throw std::invalid_argument(msg.str());
}

bool finite3(const double* v) {
  return std::isfinite(v[0]) && std::isfinite(v[1]) && std::isfinite(v[2]);
}

double norm(const double* v) { return std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]); }

constexpr double kUnitTolerance = 1e-4;

// A half-open range [begin, end) of /pixels and the reflection row it belongs to.
struct PixelRange {
  int64_t begin, end, row;
};

// The first reflection row (in file order) whose range shares an element with an earlier
// row's, and that earlier row; (-1, -1) when the ranges are disjoint. The ranges kept in
// `taken` are disjoint, so a new range can only meet its two neighbours in start order.
std::pair<int64_t, int64_t> first_overlap(const std::vector<PixelRange>& ranges) {
  std::map<int64_t, PixelRange> taken;  // begin -> range
  for (const PixelRange& range : ranges) {
    auto next = taken.lower_bound(range.begin);
    if (next != taken.end() && next->second.begin < range.end) return {range.row, next->second.row};
    if (next != taken.begin() && std::prev(next)->second.end > range.begin)
      return {range.row, std::prev(next)->second.row};
    taken.emplace_hint(next, range.begin, range);
  }
  return {-1, -1};
}

}  // namespace

void ShoeboxSetView::validate() {
  if (n_panels < 1) fail("/detector/origin", 0, "the detector has no panel");
  if (n_images < 0 || n_reflections < 0 || n_pixels < 0)
    throw std::invalid_argument("negative array length");
  validate_detector();
  validate_images();
  validate_reflections();
  validate_pixels();
}

void ShoeboxSetView::validate_detector() {
  if (!origin || !fast_axis || !slow_axis || !pixel_size || !panel_size || !read_noise)
    throw std::invalid_argument("/detector: a required array is missing");
  panels.assign(n_panels, Panel{});
  for (int64_t k = 0; k < n_panels; ++k) {
    Panel& p = panels[k];
    const double* o = origin + 3 * k;
    const double* f = fast_axis + 3 * k;
    const double* e = slow_axis + 3 * k;
    if (!finite3(o)) fail("/detector/origin", k, "not finite");
    if (!finite3(f) || !(std::abs(norm(f) - 1.0) <= kUnitTolerance))
      fail("/detector/fast_axis", k, "not a unit vector");
    if (!finite3(e) || !(std::abs(norm(e) - 1.0) <= kUnitTolerance))
      fail("/detector/slow_axis", k, "not a unit vector");
    double n[3];
    cross3(f, e, n);
    const double n_norm = norm(n);
    if (!(n_norm >= 0.5)) fail("/detector/slow_axis", k, "(nearly) parallel to the fast axis");
    if (!(pixel_size[k] > 0.0) || !std::isfinite(pixel_size[k]))
      fail("/detector/pixel_size", k, "must be finite and > 0");
    if (panel_size[2 * k] < 1 || panel_size[2 * k + 1] < 1)
      fail("/detector/size", k, "must be >= 1 pixel along both axes");
    if (!(read_noise[k] >= 0.0) || !std::isfinite(read_noise[k]))
      fail("/detector/read_noise", k, "must be finite and >= 0");
    for (int i = 0; i < 3; ++i) {
      p.origin[i] = o[i];
      p.fast[i] = f[i];
      p.slow[i] = e[i];
      p.normal[i] = n[i] / n_norm;
    }
    p.pixel_size = pixel_size[k];
    p.read_noise = read_noise[k];
    p.nx = panel_size[2 * k];
    p.ny = panel_size[2 * k + 1];
  }
}

void ShoeboxSetView::validate_images() {
  if (!wavelength || !bandwidth || !A_matrix || !polarization_fraction || !crystal_index)
    throw std::invalid_argument("/images: a required array is missing");
  for (int64_t i = 0; i < n_images; ++i) {
    if (!(wavelength[i] > 0.0) || !std::isfinite(wavelength[i]))
      fail("/images/wavelength", i, "must be finite and > 0");
    if (!(bandwidth[i] >= 0.0) || !std::isfinite(bandwidth[i]))
      fail("/images/bandwidth", i, "must be finite and >= 0");
    if (!(polarization_fraction[i] >= 0.0 && polarization_fraction[i] <= 1.0))
      fail("/images/polarization_fraction", i, "must lie in [0, 1]");
    const double* A = A_matrix + 9 * i;
    for (int j = 0; j < 9; ++j)
      if (!std::isfinite(A[j])) fail("/images/A_matrix", i, "not finite");
    const double det = A[0] * (A[4] * A[8] - A[5] * A[7]) - A[1] * (A[3] * A[8] - A[5] * A[6]) +
                       A[2] * (A[3] * A[7] - A[4] * A[6]);
    if (!(std::abs(det) > 0.0)) fail("/images/A_matrix", i, "singular");
    // Crystal indices are dense (0..C-1, C <= N): the per-crystal options are sized by them.
    if (crystal_index[i] < 0 || crystal_index[i] >= n_images)
      fail("/images/crystal_id", i, "invalid crystal index " + std::to_string(crystal_index[i]));
  }
}

void ShoeboxSetView::validate_reflections() {
  if (!image_id || !panel || !miller_index || !intensity_ref || !bbox || !pixel_offset ||
      !background)
    throw std::invalid_argument("/reflections: a required array is missing");
  image_start.assign(n_images + 1, 0);
  int64_t previous_image = 0;
  for (int64_t r = 0; r < n_reflections; ++r) {
    const int64_t img = image_id[r];
    if (img < 0 || img >= n_images)
      fail("/reflections/image_id", r, "not a row of /images (" + std::to_string(img) + ")");
    if (img < previous_image) fail("/reflections/image_id", r, "reflections not sorted by image_id");
    previous_image = img;
    image_start[img + 1] += 1;
    if (panel[r] < 0 || panel[r] >= n_panels)
      fail("/reflections/panel", r, "not a row of /detector (" + std::to_string(panel[r]) + ")");
    const int32_t* h = miller_index + 3 * r;
    if (h[0] == 0 && h[1] == 0 && h[2] == 0) fail("/reflections/miller_index", r, "(0, 0, 0)");
    if (std::isinf(intensity_ref[r]))
      fail("/reflections/intensity_ref", r, "must be finite, or NaN (no reference)");
    if (std::isinf(background[r])) fail("/reflections/background", r, "must be finite or NaN");
    // Compared before any difference is formed: every int32 difference below is in range.
    const int32_t* b = bbox + 4 * r;
    const Panel& p = panels[panel[r]];
    if (!(b[0] < b[1] && b[2] < b[3]))
      fail("/reflections/bbox", r, "empty box (need x0 < x1 and y0 < y1)");
    if (b[0] < 0 || b[1] > p.nx || b[2] < 0 || b[3] > p.ny)
      fail("/reflections/bbox", r, "outside its panel");
    const int64_t area = int64_t(b[1] - b[0]) * int64_t(b[3] - b[2]);  // < 2^62
    const int64_t off = pixel_offset[r];
    if (off < 0 || off > n_pixels || area > n_pixels - off)  // no signed overflow in off + area
      fail("/reflections/pixel_offset", r, "shoebox runs outside /pixels");
  }
  for (int64_t i = 0; i < n_images; ++i) image_start[i + 1] += image_start[i];
  check_pixels_disjoint();
}

// Each reflection's (y1 - y0)(x1 - x0) values at pixel_offset are its own (shoebox-hdf5.md):
// two boxes that share an element of /pixels cannot both hold their own pixels there. Sorting
// finds whether any two ranges meet (O(M log M)); only then is the first such row looked for.
void ShoeboxSetView::check_pixels_disjoint() const {
  std::vector<PixelRange> ranges(n_reflections);
  for (int64_t r = 0; r < n_reflections; ++r) {
    const int32_t* b = bbox + 4 * r;
    ranges[r] = {pixel_offset[r], pixel_offset[r] + int64_t(b[1] - b[0]) * int64_t(b[3] - b[2]), r};
  }
  std::vector<PixelRange> sorted = ranges;
  std::sort(sorted.begin(), sorted.end(),
            [](const PixelRange& a, const PixelRange& b) { return a.begin < b.begin; });
  bool disjoint = true;
  for (size_t k = 1; k < sorted.size() && disjoint; ++k) disjoint = sorted[k].begin >= sorted[k - 1].end;
  if (disjoint) return;
  const auto [row, other] = first_overlap(ranges);
  fail("/reflections/pixel_offset", row,
       "shoebox overlaps row " + std::to_string(other) +
           "'s pixels (each reflection's pixels must be its own)");
}

// Every element of /pixels, in a box or not: mask 0 or 1, counts finite where mask = 1.
void ShoeboxSetView::validate_pixels() const {
  if (n_pixels > 0 && (!counts || !mask))
    throw std::invalid_argument("/pixels: a required array is missing");
  for (int64_t t = 0; t < n_pixels; ++t) {
    if (mask[t] > 1)
      fail("/pixels/mask", t, "value " + std::to_string(int(mask[t])) + " is not 0 or 1");
    if (mask[t] && !std::isfinite(counts[t]))
      fail("/pixels/counts", t, "valid pixel (mask = 1) is not finite");
  }
}

}  // namespace pixelrefine
