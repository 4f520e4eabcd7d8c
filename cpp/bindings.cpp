// pybind11 bindings: arrays cross without copies (noconvert: the dtype must already be the
// canonical one, which the Python layer guarantees), the GIL is released while solving, and
// every C++ exception arrives as a Python exception of a documented type:
//   ValueError   a value, shape or length the core refuses (std::invalid_argument, named);
//   TypeError    an argument of the wrong type, dtype or memory layout (not C-contiguous);
//   MemoryError  an allocation that failed (std::bad_alloc);
//   RuntimeError "internal error in the pixelrefine core: ..." for anything else (a bug).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <glog/logging.h>

#include <algorithm>
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

constexpr int kMaxPasses = 1000;  // evaluate_image: passes before the evaluation
constexpr int64_t kMaxThreads = 256;

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

// Length of an array's first axis (ValueError for a 0-d array, which has none).
py::ssize_t rows(const py::array& a, const char* name) {
  if (a.ndim() < 1)
    throw std::invalid_argument(std::string(name) + ": expected an array with rows, got a scalar");
  return a.shape(0);
}

const char* dtype_name(float) { return "float32"; }
const char* dtype_name(double) { return "float64"; }
const char* dtype_name(int16_t) { return "int16"; }
const char* dtype_name(int32_t) { return "int32"; }
const char* dtype_name(int64_t) { return "int64"; }
const char* dtype_name(uint8_t) { return "uint8"; }

// `obj` itself as a C-contiguous array of T (no conversion, no copy), or TypeError.
template <typename T>
Array<T> exact_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<Array<T>>(obj))
    throw py::type_error(std::string(name) + " must be a C-contiguous " + dtype_name(T{}) +
                         " NumPy array");
  return py::reinterpret_borrow<Array<T>>(obj);
}

// A validated view that keeps the NumPy arrays it points into alive. The arrays that index
// others (panel size, crystal index, image_id, panel, bbox, pixel_offset) are copied, so that
// a caller who edits its arrays after validation cannot send the core out of bounds (the
// float arrays are shared: an edit there changes values, never addresses).
class CoreShoeboxSet {
 public:
  CoreShoeboxSet(Array<double> origin, Array<double> fast_axis, Array<double> slow_axis,
                 Array<double> pixel_size, Array<int32_t> size, Array<double> read_noise,
                 Array<double> wavelength, Array<double> bandwidth, Array<double> A_matrix,
                 Array<double> polarization_fraction, Array<int32_t> crystal_index,
                 Array<int32_t> image_id, Array<int16_t> panel, Array<int32_t> miller_index,
                 Array<double> intensity_ref, Array<int32_t> bbox, Array<int64_t> pixel_offset,
                 Array<float> background, Array<float> counts, Array<uint8_t> mask)
      : keep_{origin, fast_axis, slow_axis, pixel_size, wavelength, bandwidth, A_matrix,
              polarization_fraction, miller_index, intensity_ref, background, counts, mask} {
    const py::ssize_t P = rows(pixel_size, "/detector/pixel_size"),
                      N = rows(wavelength, "/images/wavelength"),
                      M = rows(image_id, "/reflections/image_id"), T = rows(counts, "/pixels/counts");
    view_.n_panels = P;
    view_.origin = checked(origin, "/detector/origin", {P, 3});
    view_.fast_axis = checked(fast_axis, "/detector/fast_axis", {P, 3});
    view_.slow_axis = checked(slow_axis, "/detector/slow_axis", {P, 3});
    view_.pixel_size = checked(pixel_size, "/detector/pixel_size", {P});
    view_.panel_size = copied(size, "/detector/size", {P, 2}, size_);
    view_.read_noise = checked(read_noise, "/detector/read_noise", {P});
    view_.n_images = N;
    view_.wavelength = checked(wavelength, "/images/wavelength", {N});
    view_.bandwidth = checked(bandwidth, "/images/bandwidth", {N});
    view_.A_matrix = checked(A_matrix, "/images/A_matrix", {N, 3, 3});
    view_.polarization_fraction = checked(polarization_fraction, "/images/polarization_fraction", {N});
    view_.crystal_index = copied(crystal_index, "/images/crystal_id", {N}, crystal_index_);
    view_.n_reflections = M;
    view_.image_id = copied(image_id, "/reflections/image_id", {M}, image_id_);
    view_.panel = copied(panel, "/reflections/panel", {M}, panel_);
    view_.miller_index = checked(miller_index, "/reflections/miller_index", {M, 3});
    view_.intensity_ref = checked(intensity_ref, "/reflections/intensity_ref", {M});
    view_.bbox = copied(bbox, "/reflections/bbox", {M, 4}, bbox_);
    view_.pixel_offset = copied(pixel_offset, "/reflections/pixel_offset", {M}, pixel_offset_);
    view_.background = checked(background, "/reflections/background", {M});
    view_.n_pixels = T;
    view_.counts = checked(counts, "/pixels/counts", {T});
    view_.mask = checked(mask, "/pixels/mask", {T});
    view_.validate();
  }

  // From any Python objects: each must already be a C-contiguous array of its canonical dtype
  // (TypeError naming it otherwise; nothing is converted).
  static CoreShoeboxSet from_objects(const std::vector<py::object>& a) {
    if (a.size() != 20) throw std::invalid_argument("CoreShoeboxSet takes 20 arrays");
    return CoreShoeboxSet(
        exact_array<double>(a[0], "/detector/origin"), exact_array<double>(a[1], "/detector/fast_axis"),
        exact_array<double>(a[2], "/detector/slow_axis"),
        exact_array<double>(a[3], "/detector/pixel_size"), exact_array<int32_t>(a[4], "/detector/size"),
        exact_array<double>(a[5], "/detector/read_noise"),
        exact_array<double>(a[6], "/images/wavelength"), exact_array<double>(a[7], "/images/bandwidth"),
        exact_array<double>(a[8], "/images/A_matrix"),
        exact_array<double>(a[9], "/images/polarization_fraction"),
        exact_array<int32_t>(a[10], "crystal_index"), exact_array<int32_t>(a[11], "/reflections/image_id"),
        exact_array<int16_t>(a[12], "/reflections/panel"),
        exact_array<int32_t>(a[13], "/reflections/miller_index"),
        exact_array<double>(a[14], "/reflections/intensity_ref"),
        exact_array<int32_t>(a[15], "/reflections/bbox"),
        exact_array<int64_t>(a[16], "/reflections/pixel_offset"),
        exact_array<float>(a[17], "/reflections/background"), exact_array<float>(a[18], "/pixels/counts"),
        exact_array<uint8_t>(a[19], "/pixels/mask"));
  }

  // Moved, never copied: view_ points into the members' buffers, which a move keeps.
  CoreShoeboxSet(CoreShoeboxSet&&) = default;
  CoreShoeboxSet(const CoreShoeboxSet&) = delete;
  CoreShoeboxSet& operator=(const CoreShoeboxSet&) = delete;

  const ShoeboxSetView& view() const { return view_; }

 private:
  template <typename T>
  static const T* copied(const Array<T>& a, const char* name, std::vector<py::ssize_t> shape,
                         std::vector<T>& store) {
    const T* data = checked(a, name, shape);
    store.reserve(std::max<size_t>(1, size_t(a.size())));  // data() is not null when empty
    store.assign(data, data + a.size());
    return store.data();
  }

  std::vector<py::object> keep_;
  std::vector<int32_t> size_, crystal_index_, image_id_, bbox_;
  std::vector<int16_t> panel_;
  std::vector<int64_t> pixel_offset_;
  ShoeboxSetView view_;
};

// The result arrays by name: (name, member, dtype is int32, columns per row: 0 = a vector,
// -1 = k x k).
struct ResultField {
  const char* name;
  bool per_image;
  int columns;
  double* ResultsView::*d;
  int32_t* ResultsView::*i;
};
#define D_FIELD(name, per_image, columns) {#name, per_image, columns, &ResultsView::name, nullptr}
#define I_FIELD(name, per_image) {#name, per_image, 0, nullptr, &ResultsView::name}
const ResultField kResultFields[] = {
    D_FIELD(G, true, 0), D_FIELD(G_sigma, true, 0), D_FIELD(B, true, 0), D_FIELD(B_sigma, true, 0),
    D_FIELD(R1, true, 0), D_FIELD(R1_sigma, true, 0), D_FIELD(R1_tensor, true, 3),
    D_FIELD(shape, true, kMaxShape), D_FIELD(rotation, true, 3), D_FIELD(rotation_sigma, true, 3),
    D_FIELD(detector_shift, true, 0), D_FIELD(detector_shift_sigma, true, 0),
    I_FIELD(status, true), I_FIELD(n_iterations, true), I_FIELD(n_outer, true),
    D_FIELD(cost, true, 0), I_FIELD(n_reflections, true), I_FIELD(n_integrated, true),
    D_FIELD(chi2_pixel, true, 0), D_FIELD(chi2_intensity, true, 0), D_FIELD(chi2_shape, true, 0),
    D_FIELD(chi2_position, true, 0), D_FIELD(position_sigma, true, 0), D_FIELD(spot_sd, true, 0),
    D_FIELD(covariance, true, -1), D_FIELD(R0_gradient, true, 0), D_FIELD(R0_curvature, true, 0),
    D_FIELD(tail_gradient, true, 2), D_FIELD(tail_curvature, true, 3),
    D_FIELD(background_residual_sq, true, 0), D_FIELD(background_dof, true, 0),
    D_FIELD(background_poisson, true, 0), D_FIELD(background_read, true, 0),
    D_FIELD(intensity_prf, false, 0), D_FIELD(intensity_prf_sigma, false, 0),
    D_FIELD(intensity_scaled, false, 0), D_FIELD(intensity_scaled_sigma, false, 0),
    D_FIELD(intensity_model, false, 0), D_FIELD(intensity_count_sigma, false, 0),
    D_FIELD(partiality, false, 0), D_FIELD(excitation_error, false, 0), D_FIELD(d, false, 0),
    D_FIELD(xyzcal, false, 2), D_FIELD(xyzobs, false, 2), D_FIELD(m2_obs, false, 0),
    D_FIELD(background, false, 0), D_FIELD(background_plane, false, 3),
    D_FIELD(centre_offset, false, 2), D_FIELD(profile_fraction, false, 0), D_FIELD(chi2_pixel_reflection, false, 0),
    I_FIELD(flags, false),
};
#undef D_FIELD
#undef I_FIELD

template <typename T>
T* result_array(py::dict results, const char* key, std::vector<py::ssize_t> shape) {
  if (!results.contains(key)) throw std::invalid_argument(std::string("results: missing ") + key);
  Array<T> a = exact_array<T>(results[key], (std::string("results: ") + key).c_str());
  if (!a.writeable())
    throw std::invalid_argument(std::string("results: ") + key + " is read-only");
  return checked_mutable(a, key, shape);
}

ResultsView results_view(py::dict results, int64_t n_images, int64_t n_reflections, int k) {
  ResultsView out;
  out.n_covariance = k;
  for (const ResultField& f : kResultFields) {
    const py::ssize_t rows = f.per_image ? n_images : n_reflections;
    std::vector<py::ssize_t> shape = {rows};
    if (f.columns > 0) shape.push_back(f.columns);
    if (f.columns < 0) shape = {rows, k, k};
    if (f.d) out.*(f.d) = result_array<double>(results, f.name, shape);
    else out.*(f.i) = result_array<int32_t>(results, f.name, shape);
  }
  return out;
}

// The arrays are the caller's own (no conversion), so the pointers stay valid while it runs.
ImageModel image_model(const ShoeboxSetView& set, const Array<double>& R0,
                       const py::object& rotation, const py::object& detector_shift, double eta) {
  const py::ssize_t N = set.n_images;
  ImageModel model;
  model.R0 = checked(R0, "R0", {N});
  for (py::ssize_t i = 0; i < N; ++i)
    if (!(model.R0[i] >= 0.0) || !std::isfinite(model.R0[i]))
      throw std::invalid_argument("R0 row " + std::to_string(i) + ": must be finite and >= 0");
  if (!rotation.is_none())
    model.rotation = checked(exact_array<double>(rotation, "rotation"), "rotation", {N, 3});
  if (!detector_shift.is_none())
    model.detector_shift =
        checked(exact_array<double>(detector_shift, "detector_shift"), "detector_shift", {N});
  if (!(eta >= 0.0) || !std::isfinite(eta)) throw std::invalid_argument("eta must be finite and >= 0");
  model.eta = eta;
  return model;
}

// Every C++ exception as a Python exception of a documented type (see the top of this file).
void translate_exception(std::exception_ptr error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const py::builtin_exception&) {
    throw;  // pybind11's own (TypeError, ValueError, ...) keep their type
  } catch (const py::error_already_set&) {
    throw;
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_SetString(PyExc_MemoryError, "the pixelrefine core ran out of memory");
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError,
                    (std::string("internal error in the pixelrefine core: ") + e.what()).c_str());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError,
                    "internal error in the pixelrefine core: an unknown C++ exception");
  }
}

// (G, B, R1, a, c, t, s, omega[3], shift) as a parameter set.
ImageParameters parameters_from(const std::vector<double>& v, const char* name) {
  if (v.size() != 11) throw std::invalid_argument(std::string(name) + " must have 11 values");
  ImageParameters p;
  p.G = v[0];
  p.B = v[1];
  std::copy(v.begin() + 2, v.begin() + 7, p.phi);
  std::copy(v.begin() + 7, v.begin() + 10, p.rotation);
  p.detector_shift = v[10];
  return p;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pixelrefine C++ core: factored per-reflection likelihood refinement with Ceres";
  // Ceres logs through glog; per-image problems report through status codes instead, so
  // only errors reach stderr (a non-finite residual is a warning Ceres recovers from).
  FLAGS_minloglevel = google::GLOG_ERROR;
  py::register_exception_translator(&translate_exception);

  py::class_<CoreShoeboxSet>(m, "CoreShoeboxSet",
                             "Validated zero-copy view of a ShoeboxSet's arrays (canonical dtypes).")
      .def(py::init([](py::object origin, py::object fast_axis, py::object slow_axis, py::object pixel_size, py::object size, py::object read_noise, py::object wavelength, py::object bandwidth, py::object A_matrix, py::object polarization_fraction, py::object crystal_index, py::object image_id, py::object panel, py::object miller_index, py::object intensity_ref, py::object bbox, py::object pixel_offset, py::object background, py::object counts, py::object mask) {
             return CoreShoeboxSet::from_objects({origin, fast_axis, slow_axis, pixel_size, size, read_noise, wavelength, bandwidth, A_matrix, polarization_fraction, crystal_index, image_id, panel, miller_index, intensity_ref, bbox, pixel_offset, background, counts, mask});
           }),
           py::arg("origin"),
           py::arg("fast_axis"),
           py::arg("slow_axis"),
           py::arg("pixel_size"),
           py::arg("size"),
           py::arg("read_noise"),
           py::arg("wavelength"),
           py::arg("bandwidth"),
           py::arg("A_matrix"),
           py::arg("polarization_fraction"),
           py::arg("crystal_index"),
           py::arg("image_id"),
           py::arg("panel"),
           py::arg("miller_index"),
           py::arg("intensity_ref"),
           py::arg("bbox"),
           py::arg("pixel_offset"),
           py::arg("background"),
           py::arg("counts"),
           py::arg("mask"))
      .def_property_readonly("n_images", [](const CoreShoeboxSet& s) { return s.view().n_images; })
      .def_property_readonly("n_reflections",
                             [](const CoreShoeboxSet& s) { return s.view().n_reflections; })
      .def("image_start", [](const CoreShoeboxSet& s) {
        const auto& v = s.view().image_start;
        return Array<int64_t>(py::ssize_t(v.size()), v.data());
      });

  py::class_<RefineOptions>(m, "RefineOptions", "Options of a refinement (see METHODS.md).")
      .def(py::init<>())
#define OPTION(name) .def_readwrite(#name, &RefineOptions::name)
      OPTION(objective) OPTION(profile) OPTION(background) OPTION(R0) OPTION(eta)
      OPTION(error_scale) OPTION(read_variance_scale) OPTION(reference_error)
      OPTION(tail_fraction) OPTION(tail_scale)
      OPTION(G_prior) OPTION(R0_sigma) OPTION(tail_covariance) OPTION(sigma_G) OPTION(reference_bias_correction) OPTION(fit_centres) OPTION(refine_geometry) OPTION(sigma_rotation)
      OPTION(sigma_shift) OPTION(max_outer) OPTION(max_iterations) OPTION(outer_tolerance)
      OPTION(B_min) OPTION(B_max) OPTION(min_valid_pixels) OPTION(plane_min_pixels)
      OPTION(min_reflections) OPTION(outlier_sigma) OPTION(pixel_outlier_sigma)
      OPTION(model_neighbours)
      OPTION(min_profile_fraction) OPTION(min_partiality) OPTION(position_sigma)
      OPTION(spot_sd_min) OPTION(chi2_max) OPTION(variance_floor) OPTION(loss) OPTION(loss_scale);
#undef OPTION

  m.def("covariance_names", &covariance_names, py::arg("options"),
        "Names of the covariance's rows for these options.");

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
      "Refine images [first, last) on n_threads threads, writing rows of `results` in place "
      "(finite values there are the starting values: a warm start).");

  m.def(
      "evaluate_image",
      [](const CoreShoeboxSet& set, const RefineOptions& options, int64_t image,
         std::vector<double> values, std::vector<double> held, int passes) {
        if (passes < 1 || passes > kMaxPasses)
          throw std::invalid_argument("passes must lie in [1, " + std::to_string(kMaxPasses) + "]");
        const ImageParameters params = parameters_from(values, "values");
        const ImageParameters at = parameters_from(held.empty() ? values : held, "held");
        ImageEvaluation e;
        {
          py::gil_scoped_release release;
          e = evaluate_image(set.view(), image, options, params, at, passes);
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
      py::arg("held") = std::vector<double>{}, py::arg("passes") = 1,
      "Residuals, autodiff Jacobian (columns in covariance order), their terms and rows, and J "
      "per reflection of one image at values = (G, B, R1, a, c, t, s, omega[3], shift), after "
      "`passes` passes of per-reflection fits at held (default: values).");

  m.def(
      "model_counts",
      [](const CoreShoeboxSet& set, const RefineOptions& options, py::dict results, int n_threads) {
        const ShoeboxSetView& v = set.view();
        validate_options(options, v);
        const ResultsView view = results_view(results, v.n_images, v.n_reflections,
                                              covariance_size(options));
        Array<double> mu(v.n_pixels), var(v.n_pixels);
        std::fill(mu.mutable_data(), mu.mutable_data() + v.n_pixels, kNaN);
        std::fill(var.mutable_data(), var.mutable_data() + v.n_pixels, kNaN);
        double* mu_out = mu.mutable_data();
        double* var_out = var.mutable_data();
        {
          py::gil_scoped_release release;
          std::atomic<int64_t> next(0);
          auto worker = [&]() {
            for (int64_t i = next++; i < v.n_images; i = next++)
              model_counts(v, i, options, view, mu_out, var_out);
          };
          std::vector<std::thread> pool;
          const int threads = int(std::max<int64_t>(1, std::min<int64_t>({n_threads, kMaxThreads, v.n_images})));
          for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
          worker();
          for (std::thread& t : pool) t.join();
        }
        return py::make_tuple(mu, var);
      },
      py::arg("shoeboxes"), py::arg("options"), py::arg("results"), py::arg("n_threads") = 1,
      "Expected counts mu_p and model variance v_p of every shoebox pixel at a refinement's "
      "results (NaN G: not scaled, the fitted J is the amplitude).");

  m.def("pixel_deviate", py::vectorize(&pixel_deviate), py::arg("counts"), py::arg("expected"),
        py::arg("variance"), py::arg("error_scale") = 1.0,
        "Signed root of the Poisson deviance of counts against their model (Snyder's shift for "
        "the read noise; METHODS.md section I.7).");

  m.def("trivial_solve_seconds", &trivial_solve_seconds, py::arg("repeats") = 1000,
        py::call_guard<py::gil_scoped_release>(),
        "Seconds per Ceres Solve of a one-parameter problem (the per-solve overhead).");

  m.def(
      "predict",
      [](const CoreShoeboxSet& set, Array<int32_t> image_id, Array<int16_t> panel,
         Array<int32_t> miller_index, Array<double> R0, double eta, py::object rotation,
         py::object detector_shift) {
        const py::ssize_t M = rows(image_id, "image_id");
        PredictionArrays arrays;
        arrays.n = M;
        arrays.image_id = checked(image_id, "image_id", {M});
        arrays.panel = checked(panel, "panel", {M});
        arrays.miller_index = checked(miller_index, "miller_index", {M, 3});
        const ImageModel model = image_model(set.view(), R0, rotation, detector_shift, eta);
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
        return out;
      },
      py::arg("shoeboxes"), py::arg("image_id").noconvert(), py::arg("panel").noconvert(),
      py::arg("miller_index").noconvert(), py::arg("R0").noconvert(), py::arg("eta") = 0.0,
      py::arg("rotation") = py::none(), py::arg("detector_shift") = py::none(),
      "Predict reflections of the set's images (only its detector and images are used).");

  m.def(
      "check_profile",
      [](double eps1, double eps2, std::vector<double> phi, std::vector<double> S,
         std::vector<double> pixel, std::vector<double> delta, std::vector<double> cell,
         bool tail) {
        if (phi.size() != kMaxShape || S.size() != 3 || pixel.size() != 3 || delta.size() != 2 ||
            cell.size() != 4)
          throw std::invalid_argument("phi needs 5 values, S and pixel 3, delta 2, cell 4");
        const ProfileCheck c = check_profile(eps1, eps2, phi.data(), S.data(), pixel.data(),
                                             delta.data(), cell.data(), tail);
        return py::make_tuple(c.value, std::vector<double>(c.by_hand, c.by_hand + 7),
                              std::vector<double>(c.autodiff, c.autodiff + 7),
                              std::vector<double>(c.curvature, c.curvature + 3));
      },
      py::arg("eps1"), py::arg("eps2"), py::arg("phi"), py::arg("S"), py::arg("pixel"),
      py::arg("delta"), py::arg("cell"), py::arg("tail"),
      "The profile averaged over one cell (edges in eps, D's layout) and its derivatives in "
      "(R1, a, c, t, s, delta1, delta2): "
      "(value, by hand, by autodiff, d2f/d delta2 (11, 12, 22) as the pass computes it).");
}
