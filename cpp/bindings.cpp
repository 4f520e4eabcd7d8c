// pybind11 bindings: arrays cross without copies (noconvert: the dtype must already be the
// canonical one, which the Python layer guarantees), the GIL is released while solving, and
// C++ exceptions arrive as Python exceptions (std::invalid_argument -> ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <glog/logging.h>

#include <atomic>
#include <cmath>
#include <sstream>
#include <thread>
#include <string>
#include <vector>

#include "forward_model.h"
#include "refine_image.h"
#include "shoebox_view.h"

namespace py = pybind11;
using namespace pixelrefine;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

// Checks a C-contiguous array's shape; -1 matches any length. Returns its data pointer.
template <typename T>
const T* checked(const Array<T>& a, const char* name, std::vector<py::ssize_t> shape) {
  bool ok = a.ndim() == py::ssize_t(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) {
    std::ostringstream msg;
    msg << name << ": expected shape (";
    for (size_t i = 0; i < shape.size(); ++i) msg << (i ? ", " : "") << (shape[i] < 0 ? std::string("n") : std::to_string(shape[i]));
    msg << "), got (";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) msg << (i ? ", " : "") << a.shape(i);
    msg << ")";
    throw std::invalid_argument(msg.str());
  }
  return a.data();
}

template <typename T>
T* checked_mutable(Array<T>& a, const char* name, std::vector<py::ssize_t> shape) {
  checked<T>(a, name, shape);
  return a.mutable_data();
}

// A validated view that keeps the NumPy arrays it points into alive.
class CoreShoeboxSet {
 public:
  CoreShoeboxSet(Array<double> origin, Array<double> fast_axis, Array<double> slow_axis,
                 Array<double> pixel_size, Array<int32_t> size, Array<double> read_noise,
                 Array<double> wavelength, Array<double> bandwidth, Array<double> A_matrix,
                 Array<double> polarization_fraction, Array<int32_t> crystal_index,
                 Array<int32_t> image_id, Array<int16_t> panel, Array<int32_t> miller_index,
                 Array<double> intensity_ref, Array<int32_t> bbox, Array<int64_t> pixel_offset,
                 Array<float> background, Array<float> counts, Array<uint8_t> mask)
      : keep_{origin, fast_axis, slow_axis, pixel_size, size, read_noise, wavelength,
              bandwidth, A_matrix, polarization_fraction, crystal_index, image_id, panel,
              miller_index, intensity_ref, bbox, pixel_offset, background, counts, mask} {
    const py::ssize_t P = pixel_size.shape(0), N = wavelength.shape(0), M = image_id.shape(0),
                      T = counts.shape(0);
    view_.n_panels = P;
    view_.origin = checked(origin, "/detector/origin", {P, 3});
    view_.fast_axis = checked(fast_axis, "/detector/fast_axis", {P, 3});
    view_.slow_axis = checked(slow_axis, "/detector/slow_axis", {P, 3});
    view_.pixel_size = checked(pixel_size, "/detector/pixel_size", {P});
    view_.panel_size = checked(size, "/detector/size", {P, 2});
    view_.read_noise = checked(read_noise, "/detector/read_noise", {P});
    view_.n_images = N;
    view_.wavelength = checked(wavelength, "/images/wavelength", {N});
    view_.bandwidth = checked(bandwidth, "/images/bandwidth", {N});
    view_.A_matrix = checked(A_matrix, "/images/A_matrix", {N, 3, 3});
    view_.polarization_fraction = checked(polarization_fraction, "/images/polarization_fraction", {N});
    view_.crystal_index = checked(crystal_index, "/images/crystal_id", {N});
    view_.n_reflections = M;
    view_.image_id = checked(image_id, "/reflections/image_id", {M});
    view_.panel = checked(panel, "/reflections/panel", {M});
    view_.miller_index = checked(miller_index, "/reflections/miller_index", {M, 3});
    view_.intensity_ref = checked(intensity_ref, "/reflections/intensity_ref", {M});
    view_.bbox = checked(bbox, "/reflections/bbox", {M, 4});
    view_.pixel_offset = checked(pixel_offset, "/reflections/pixel_offset", {M});
    view_.background = checked(background, "/reflections/background", {M});
    view_.n_pixels = T;
    view_.counts = checked(counts, "/pixels/counts", {T});
    view_.mask = checked(mask, "/pixels/mask", {T});
    view_.validate();
  }
  const ShoeboxSetView& view() const { return view_; }

 private:
  std::vector<py::object> keep_;
  ShoeboxSetView view_;
};

ResultsView results_view(py::dict results, int64_t n_images, int64_t n_reflections, int k) {
  auto get_d = [&](const char* key, std::vector<py::ssize_t> shape) {
    if (!results.contains(key)) throw std::invalid_argument(std::string("results: missing ") + key);
    Array<double> a = py::reinterpret_borrow<py::object>(results[key]).cast<Array<double>>();
    if (!py::reinterpret_borrow<py::object>(results[key]).is(a))
      throw std::invalid_argument(std::string("results: ") + key + " must be C-contiguous float64");
    return checked_mutable(a, key, shape);
  };
  auto get_i = [&](const char* key, std::vector<py::ssize_t> shape) {
    if (!results.contains(key)) throw std::invalid_argument(std::string("results: missing ") + key);
    Array<int32_t> a = py::reinterpret_borrow<py::object>(results[key]).cast<Array<int32_t>>();
    if (!py::reinterpret_borrow<py::object>(results[key]).is(a))
      throw std::invalid_argument(std::string("results: ") + key + " must be C-contiguous int32");
    return checked_mutable(a, key, shape);
  };
  const py::ssize_t N = n_images, M = n_reflections;
  ResultsView out;
  out.G = get_d("G", {N});
  out.G_sigma = get_d("G_sigma", {N});
  out.B = get_d("B", {N});
  out.B_sigma = get_d("B_sigma", {N});
  out.R1 = get_d("R1", {N});
  out.R1_sigma = get_d("R1_sigma", {N});
  out.rotation = get_d("rotation", {N, 3});
  out.rotation_sigma = get_d("rotation_sigma", {N, 3});
  out.detector_shift = get_d("detector_shift", {N});
  out.detector_shift_sigma = get_d("detector_shift_sigma", {N});
  out.status = get_i("status", {N});
  out.n_iterations = get_i("n_iterations", {N});
  out.cost = get_d("cost", {N});
  out.n_reflections = get_i("n_reflections", {N});
  out.covariance = get_d("covariance", {N, k, k});
  out.intensity_prf = get_d("intensity_prf", {M});
  out.intensity_prf_sigma = get_d("intensity_prf_sigma", {M});
  out.intensity_scaled = get_d("intensity_scaled", {M});
  out.intensity_scaled_sigma = get_d("intensity_scaled_sigma", {M});
  out.partiality = get_d("partiality", {M});
  out.excitation_error = get_d("excitation_error", {M});
  out.d = get_d("d", {M});
  out.xyzcal = get_d("xyzcal", {M, 2});
  out.xyzobs = get_d("xyzobs", {M, 2});
  out.m2_obs = get_d("m2_obs", {M});
  out.background = get_d("background", {M});
  out.flags = get_i("flags", {M});
  return out;
}

ImageModel image_model(const ShoeboxSetView& set, const Array<double>& R0, const Array<double>& R1,
                       const py::object& rotation, const py::object& detector_shift, double eta) {
  const py::ssize_t N = set.n_images;
  ImageModel model;
  model.R0 = checked(R0, "R0", {N});
  model.R1 = checked(R1, "R1", {N});
  if (!rotation.is_none()) model.rotation = checked(rotation.cast<Array<double>>(), "rotation", {N, 3});
  if (!detector_shift.is_none())
    model.detector_shift = checked(detector_shift.cast<Array<double>>(), "detector_shift", {N});
  model.eta = eta;
  return model;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pixelrefine C++ core: factored per-reflection likelihood refinement with Ceres";
  // Ceres logs through glog; per-image problems report through status codes instead, so
  // only errors reach stderr (a non-finite residual is a warning Ceres recovers from).
  FLAGS_minloglevel = google::GLOG_ERROR;

  py::class_<CoreShoeboxSet>(m, "CoreShoeboxSet",
                             "Validated zero-copy view of a ShoeboxSet's arrays (canonical dtypes).")
      .def(py::init<Array<double>, Array<double>, Array<double>, Array<double>, Array<int32_t>,
                    Array<double>, Array<double>, Array<double>, Array<double>, Array<double>,
                    Array<int32_t>, Array<int32_t>, Array<int16_t>, Array<int32_t>, Array<double>,
                    Array<int32_t>, Array<int64_t>, Array<float>, Array<float>, Array<uint8_t>>(),
           py::arg("origin").noconvert(), py::arg("fast_axis").noconvert(),
           py::arg("slow_axis").noconvert(), py::arg("pixel_size").noconvert(),
           py::arg("size").noconvert(), py::arg("read_noise").noconvert(),
           py::arg("wavelength").noconvert(), py::arg("bandwidth").noconvert(),
           py::arg("A_matrix").noconvert(), py::arg("polarization_fraction").noconvert(),
           py::arg("crystal_index").noconvert(), py::arg("image_id").noconvert(),
           py::arg("panel").noconvert(), py::arg("miller_index").noconvert(),
           py::arg("intensity_ref").noconvert(), py::arg("bbox").noconvert(),
           py::arg("pixel_offset").noconvert(), py::arg("background").noconvert(),
           py::arg("counts").noconvert(), py::arg("mask").noconvert())
      .def_property_readonly("n_images", [](const CoreShoeboxSet& s) { return s.view().n_images; })
      .def_property_readonly("n_reflections",
                             [](const CoreShoeboxSet& s) { return s.view().n_reflections; })
      .def("image_start", [](const CoreShoeboxSet& s) {
        const auto& v = s.view().image_start;
        return Array<int64_t>(py::ssize_t(v.size()), v.data());
      });

  py::class_<RefineOptions>(m, "RefineOptions", "Options of a refinement (see METHODS.md).")
      .def(py::init<>())
      .def_readwrite("objective", &RefineOptions::objective)
      .def_readwrite("R0", &RefineOptions::R0)
      .def_readwrite("eta", &RefineOptions::eta)
      .def_readwrite("sigma_G", &RefineOptions::sigma_G)
      .def_readwrite("reference_sigma_rel", &RefineOptions::reference_sigma_rel)
      .def_readwrite("refine_geometry", &RefineOptions::refine_geometry)
      .def_readwrite("sigma_rotation", &RefineOptions::sigma_rotation)
      .def_readwrite("sigma_shift", &RefineOptions::sigma_shift)
      .def_readwrite("max_outer", &RefineOptions::max_outer)
      .def_readwrite("max_iterations", &RefineOptions::max_iterations)
      .def_readwrite("outer_tolerance", &RefineOptions::outer_tolerance)
      .def_readwrite("G_init", &RefineOptions::G_init)
      .def_readwrite("B_init", &RefineOptions::B_init)
      .def_readwrite("R1_init", &RefineOptions::R1_init)
      .def_readwrite("B_min", &RefineOptions::B_min)
      .def_readwrite("B_max", &RefineOptions::B_max)
      .def_readwrite("min_background_pixels", &RefineOptions::min_background_pixels)
      .def_readwrite("min_valid_pixels", &RefineOptions::min_valid_pixels)
      .def_readwrite("min_reflections", &RefineOptions::min_reflections)
      .def_readwrite("min_snr_shape", &RefineOptions::min_snr_shape)
      .def_readwrite("outlier_sigma", &RefineOptions::outlier_sigma)
      .def_readwrite("variance_floor", &RefineOptions::variance_floor)
      .def_readwrite("loss", &RefineOptions::loss)
      .def_readwrite("loss_scale", &RefineOptions::loss_scale);

  m.def(
      "refine_images",
      [](const CoreShoeboxSet& set, const RefineOptions& options, int64_t first, int64_t last,
         int n_threads, py::dict results) {
        const ResultsView out = results_view(results, set.view().n_images,
                                             set.view().n_reflections, covariance_size(options));
        py::gil_scoped_release release;
        refine_images(set.view(), options, first, last, n_threads, out);
      },
      py::arg("shoeboxes"), py::arg("options"), py::arg("first"), py::arg("last"),
      py::arg("n_threads"), py::arg("results"),
      "Refine images [first, last) on n_threads threads, writing rows of `results` in place.");

  m.def(
      "evaluate_image",
      [](const CoreShoeboxSet& set, const RefineOptions& options, int64_t image,
         std::vector<double> values, std::vector<double> weights_at) {
        // values, weights_at: G, B, R1, omega_x, omega_y, omega_z, detector_shift
        auto parameters = [](const std::vector<double>& v, const char* name) {
          if (v.size() != 7) throw std::invalid_argument(std::string(name) + " must have 7 values");
          ImageParameters p;
          p.G = v[0];
          p.B = v[1];
          p.R1 = v[2];
          std::copy(v.begin() + 3, v.begin() + 6, p.rotation);
          p.detector_shift = v[6];
          return p;
        };
        const ImageParameters params = parameters(values, "values");
        const ImageParameters held = parameters(weights_at.empty() ? values : weights_at, "weights_at");
        ImageEvaluation e;
        {
          py::gil_scoped_release release;
          e = evaluate_image(set.view(), image, options, params, held);
        }
        const py::ssize_t n = py::ssize_t(e.residuals.size());
        Array<int32_t> term(n), row(n);
        for (py::ssize_t i = 0; i < n; ++i) {
          term.mutable_data()[i] = e.labels[i].term;
          row.mutable_data()[i] = int32_t(e.labels[i].row);
        }
        py::dict out;
        out["residuals"] = Array<double>(n, e.residuals.data());
        out["jacobian"] = Array<double>({n, py::ssize_t(e.k)}, e.jacobian.data());
        out["term"] = term;
        out["cost"] = e.cost;
        out["row"] = row;
        out["intensity_prf"] =
            Array<double>(py::ssize_t(e.intensity_prf.size()), e.intensity_prf.data());
        return out;
      },
      py::arg("shoeboxes"), py::arg("options"), py::arg("image"), py::arg("values"),
      py::arg("weights_at") = std::vector<double>{},
      "Residuals, autodiff Jacobian (columns G, B, R1[, omega, shift]), their terms and rows, "
      "and J per reflection of one image at values = (G, B, R1, omega[3], shift), with weights "
      "evaluated at weights_at (default: values).");

  m.def(
      "model_counts",
      [](const CoreShoeboxSet& set, const RefineOptions& options, Array<double> G, Array<double> B,
         Array<double> R1, Array<double> rotation, Array<double> detector_shift, int n_threads) {
        const ShoeboxSetView& v = set.view();
        const py::ssize_t N = v.n_images;
        const double* g = checked(G, "G", {N});
        const double* b = checked(B, "B", {N});
        const double* r1 = checked(R1, "R1", {N});
        const double* omega = checked(rotation, "rotation", {N, 3});
        const double* shift = checked(detector_shift, "detector_shift", {N});
        validate_options(options, v);
        Array<double> mu(v.n_pixels), var(v.n_pixels);
        std::fill(mu.mutable_data(), mu.mutable_data() + v.n_pixels, kNaN);
        std::fill(var.mutable_data(), var.mutable_data() + v.n_pixels, kNaN);
        double* mu_out = mu.mutable_data();
        double* var_out = var.mutable_data();
        {
          py::gil_scoped_release release;
          std::atomic<int64_t> next(0);
          auto worker = [&]() {
            for (int64_t i = next++; i < N; i = next++) {
              ImageParameters p;
              const bool scaled = std::isfinite(g[i]) && std::isfinite(b[i]);
              p.G = scaled ? g[i] : 1.0;
              p.B = scaled ? b[i] : 0.0;
              p.R1 = r1[i];
              for (int k = 0; k < 3; ++k) p.rotation[k] = std::isfinite(omega[3 * i + k]) ? omega[3 * i + k] : 0.0;
              p.detector_shift = std::isfinite(shift[i]) ? shift[i] : 0.0;
              if (!(std::isfinite(p.R1) && p.R1 > 0.0)) continue;
              model_counts(v, i, options, p, scaled, mu_out, var_out);
            }
          };
          std::vector<std::thread> pool;
          for (int t = 1; t < std::max(1, n_threads); ++t) pool.emplace_back(worker);
          worker();
          for (std::thread& t : pool) t.join();
        }
        return py::make_tuple(mu, var);
      },
      py::arg("shoeboxes"), py::arg("options"), py::arg("G").noconvert(), py::arg("B").noconvert(),
      py::arg("R1").noconvert(), py::arg("rotation").noconvert(),
      py::arg("detector_shift").noconvert(), py::arg("n_threads") = 1,
      "Expected counts mu_p and model variance v_p of every shoebox pixel at per-image "
      "parameters (NaN G or B: not scaled, the fitted J is the amplitude).");

  m.def("trivial_solve_seconds", &trivial_solve_seconds, py::arg("repeats") = 1000,
        py::call_guard<py::gil_scoped_release>(),
        "Seconds per Ceres Solve of a one-parameter problem (the per-solve overhead).");

  m.def(
      "predict",
      [](const CoreShoeboxSet& set, Array<int32_t> image_id, Array<int16_t> panel,
         Array<int32_t> miller_index, Array<double> R0, double eta, py::object rotation,
         py::object detector_shift, py::object G, py::object B) {
        const py::ssize_t M = image_id.shape(0);
        PredictionArrays arrays;
        arrays.n = M;
        arrays.image_id = checked(image_id, "image_id", {M});
        arrays.panel = checked(panel, "panel", {M});
        arrays.miller_index = checked(miller_index, "miller_index", {M, 3});
        Array<double> R1(set.view().n_images);
        std::fill(R1.mutable_data(), R1.mutable_data() + R1.size(), 1.0);
        const ImageModel model = image_model(set.view(), R0, R1, rotation, detector_shift, eta);
        Array<double> d(M), eps(M), p(M), pol(M), xyz({M, py::ssize_t(2)});
        Array<uint8_t> hits(M);
        arrays.d = d.mutable_data();
        arrays.excitation_error = eps.mutable_data();
        arrays.partiality = p.mutable_data();
        arrays.polarization = pol.mutable_data();
        arrays.xyzcal = xyz.mutable_data();
        arrays.hits_panel = hits.mutable_data();
        {
          py::gil_scoped_release release;
          predict_reflections(set.view(), model, arrays);
        }
        py::dict out;
        out["d"] = d;
        out["excitation_error"] = eps;
        out["partiality"] = p;
        out["polarization"] = pol;
        out["xyzcal"] = xyz;
        out["hits_panel"] = hits;
        if (!G.is_none() && !B.is_none()) {
          // scale = G B_term p pol = J_model / I_ref
          const double* g = checked(G.cast<Array<double>>(), "G", {set.view().n_images});
          const double* b = checked(B.cast<Array<double>>(), "B", {set.view().n_images});
          Array<double> scale(M);
          for (py::ssize_t r = 0; r < M; ++r) {
            const int64_t i = arrays.image_id[r];
            scale.mutable_data()[r] = intensity_model(g[i], b[i], arrays.d[r], arrays.partiality[r],
                                                      arrays.polarization[r], 1.0);
          }
          out["scale"] = scale;
        }
        return out;
      },
      py::arg("shoeboxes"), py::arg("image_id").noconvert(), py::arg("panel").noconvert(),
      py::arg("miller_index").noconvert(), py::arg("R0").noconvert(), py::arg("eta") = 0.0,
      py::arg("rotation") = py::none(), py::arg("detector_shift") = py::none(),
      py::arg("G") = py::none(), py::arg("B") = py::none(),
      "Predict reflections of the set's images (only its detector and images are used); with "
      "per-image G and B also scale = G B_term p pol.");

  m.def(
      "shoebox_profiles",
      [](const CoreShoeboxSet& set, Array<double> R1, py::object rotation,
         py::object detector_shift, int subsample) {
        Array<double> R0(set.view().n_images);  // the profile does not depend on R0
        std::fill(R0.mutable_data(), R0.mutable_data() + R0.size(), 0.0);
        const ImageModel model = image_model(set.view(), R0, R1, rotation, detector_shift, 0.0);
        Array<double> out(set.view().n_pixels);
        {
          py::gil_scoped_release release;
          shoebox_profiles(set.view(), model, subsample, out.mutable_data());
        }
        return out;
      },
      py::arg("shoeboxes"), py::arg("R1").noconvert(), py::arg("rotation") = py::none(), py::arg("detector_shift") = py::none(),
      py::arg("subsample") = 1,
      "Area-normalised profile of every shoebox pixel, integrated over the pixel by "
      "subsample x subsample sampling.");
}
