// Python bindings for rau_rt._native. Reached only through rau_rt/ops.py, which validates inputs
// and raises rau_rt.InputError; the checks here are a second line so that a direct caller gets a
// ValueError instead of a crash.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>

#include "rau_rt_native/parallel.hpp"
#include "rau_rt_native/postprocess.hpp"
#include "rau_rt_native/preprocess.hpp"

namespace py = pybind11;
using rau_rt_native::ImageView;
using rau_rt_native::LogitsView;
using rau_rt_native::PreprocessParams;

namespace {

// A C-contiguous array of dtype T with `ndim` dims; `writeable` also checks the write flag.
template <typename T>
py::buffer_info require_c_array(const py::array& array, int ndim, bool writeable,
                                 const char* name) {
  if (!array.dtype().is(py::dtype::of<T>()) ||
      !(array.flags() & py::array::c_style) || array.ndim() != ndim) {
    throw py::value_error(std::string(name) + ": wrong dtype, ndim or layout");
  }
  if (writeable && !array.writeable()) throw py::value_error(std::string(name) + ": read-only");
  return array.request(writeable);
}

LogitsView logits_view(const py::array& logits) {
  if (!logits.dtype().is(py::dtype::of<float>()) || logits.ndim() != 3) {
    throw py::value_error("logits must be float32 (N, h, w)");
  }
  const py::buffer_info info = logits.request();
  if (info.shape[1] < 1 || info.shape[2] < 1) throw py::value_error("logits must not be empty");
  return LogitsView{static_cast<const char*>(info.ptr), info.shape[0], info.shape[1],
                    info.shape[2], info.strides[0], info.strides[1], info.strides[2]};
}

void postprocess_masks(const py::array& logits, py::array& masks, py::array& boxes,
                       py::array& areas, py::array& score_sums, float threshold, int threads) {
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const LogitsView view = logits_view(logits);
  py::buffer_info m = require_c_array<uint8_t>(masks, 3, true, "masks");
  py::buffer_info b = require_c_array<int64_t>(boxes, 2, true, "boxes");
  py::buffer_info a = require_c_array<int64_t>(areas, 1, true, "areas");
  py::buffer_info s = require_c_array<double>(score_sums, 1, true, "score_sums");
  if (m.shape[0] != view.regions || m.shape[1] < 1 || m.shape[2] < 1 ||
      b.shape[0] != view.regions || b.shape[1] != 4 || a.shape[0] != view.regions ||
      s.shape[0] != view.regions) {
    throw py::value_error("output shapes do not match the number of regions");
  }
  const rau_rt_native::RegionStats stats{static_cast<int64_t*>(b.ptr),
                                         static_cast<int64_t*>(a.ptr),
                                         static_cast<double*>(s.ptr)};
  py::gil_scoped_release release;
  rau_rt_native::postprocess_masks(view, threshold, m.shape[1], m.shape[2],
                                   static_cast<uint8_t*>(m.ptr), stats, threads);
}

void fill_holes(const py::array& logits, py::array& out, float threshold, int64_t max_hole_area,
                int64_t max_sprinkle_area, int threads) {
  if (threads < 1) throw py::value_error("threads must be >= 1");
  if (max_hole_area < 0 || max_sprinkle_area < 0) throw py::value_error("areas must be >= 0");
  const LogitsView view = logits_view(logits);
  py::buffer_info o = require_c_array<float>(out, 3, true, "out");
  if (o.shape[0] != view.regions || o.shape[1] != view.height || o.shape[2] != view.width) {
    throw py::value_error("out must have the shape of logits");
  }
  py::gil_scoped_release release;
  rau_rt_native::fill_holes(view, threshold, max_hole_area, max_sprinkle_area,
                            static_cast<float*>(o.ptr), threads);
}

void overlay(py::array& image, const py::array& masks, const py::array& colors, float alpha,
             int threads) {
  if (threads < 1) throw py::value_error("threads must be >= 1");
  py::buffer_info img = require_c_array<uint8_t>(image, 3, true, "image");
  py::buffer_info m = require_c_array<uint8_t>(masks, 3, false, "masks");
  py::buffer_info c = require_c_array<uint8_t>(colors, 2, false, "colors");
  if (img.shape[2] != 3 || m.shape[1] != img.shape[0] || m.shape[2] != img.shape[1] ||
      c.shape[0] != m.shape[0] || c.shape[1] != 3) {
    throw py::value_error("overlay shapes do not match");
  }
  py::gil_scoped_release release;
  rau_rt_native::overlay(static_cast<uint8_t*>(img.ptr), img.shape[0], img.shape[1],
                         static_cast<const uint8_t*>(m.ptr), m.shape[0],
                         static_cast<const uint8_t*>(c.ptr), alpha, threads);
}

template <typename T>
ImageView<T> image_view(const py::buffer_info& info) {
  const int64_t channels = info.ndim == 3 ? info.shape[2] : 1;
  return ImageView<T>{static_cast<const char*>(info.ptr),
                      info.shape[0],
                      info.shape[1],
                      channels,
                      info.strides[0],
                      info.strides[1],
                      info.ndim == 3 ? info.strides[2] : 0};
}

void preprocess(const py::array& image, py::array& out, std::array<int, 3> source_channel,
                float value_scale, float value_offset, bool clamp,
                std::array<float, 3> plane_scale, std::array<float, 3> plane_offset, int threads) {
  const py::buffer_info in = image.request();
  if (in.ndim != 2 && in.ndim != 3) throw py::value_error("image must be (H, W) or (H, W, C)");
  if (in.shape[0] < 1 || in.shape[1] < 1) throw py::value_error("image must not be empty");
  const int64_t channels = in.ndim == 3 ? in.shape[2] : 1;
  if (channels != 1 && channels != 3) throw py::value_error("image must have 1 or 3 channels");
  for (int c : source_channel) {
    if (c < 0 || c >= channels) throw py::value_error("source_channel out of range");
  }
  if (threads < 1) throw py::value_error("threads must be >= 1");

  if (!py::isinstance<py::array_t<float, py::array::c_style>>(out) ||
      !out.dtype().is(py::dtype::of<float>())) {
    throw py::value_error("out must be a C-contiguous float32 array");
  }
  if (!out.writeable()) throw py::value_error("out must be writeable");
  py::buffer_info dst = out.request(true);
  if (dst.ndim != 3 || dst.shape[0] != 3 || dst.shape[1] < 1 || dst.shape[2] < 1) {
    throw py::value_error("out must have shape (3, H, W)");
  }

  PreprocessParams params{};
  params.out_height = dst.shape[1];
  params.out_width = dst.shape[2];
  params.value_scale = value_scale;
  params.value_offset = value_offset;
  params.clamp = clamp;
  params.threads = threads;
  for (int k = 0; k < 3; ++k) {
    params.source_channel[k] = source_channel[static_cast<size_t>(k)];
    params.plane_scale[k] = plane_scale[static_cast<size_t>(k)];
    params.plane_offset[k] = plane_offset[static_cast<size_t>(k)];
  }
  float* dst_ptr = static_cast<float*>(dst.ptr);

  if (image.dtype().is(py::dtype::of<uint8_t>())) {
    const auto view = image_view<uint8_t>(in);
    py::gil_scoped_release release;
    rau_rt_native::preprocess(view, params, dst_ptr);
  } else if (image.dtype().is(py::dtype::of<uint16_t>())) {
    const auto view = image_view<uint16_t>(in);
    py::gil_scoped_release release;
    rau_rt_native::preprocess(view, params, dst_ptr);
  } else {
    throw py::value_error("image dtype must be uint8 or uint16");
  }
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "rau-rt fused pre/post-processing kernels (use rau_rt.ops, not this module)";
  m.def("has_openmp", &rau_rt_native::has_openmp, "Whether the extension was built with OpenMP.");
  m.def("openmp_max_threads", &rau_rt_native::openmp_max_threads,
        "The OpenMP runtime's default thread count (1 without OpenMP).");
  m.def("preprocess", &preprocess, py::arg("image"), py::arg("out"), py::arg("source_channel"),
        py::arg("value_scale"), py::arg("value_offset"), py::arg("clamp"), py::arg("plane_scale"),
        py::arg("plane_offset"), py::arg("threads"),
        "Bilinear resize + window/scale + per-plane affine of a uint8/uint16 (H, W[, C]) image "
        "into a float32 (3, h, w) buffer. See rau_rt.ops.preprocess.");
  m.def("postprocess_masks", &postprocess_masks, py::arg("logits"), py::arg("masks"),
        py::arg("boxes"), py::arg("areas"), py::arg("score_sums"), py::arg("threshold"),
        py::arg("threads"),
        "Upsample + threshold + box/area/score of N low-res logit maps. See "
        "rau_rt.ops.postprocess_masks.");
  m.def("fill_holes", &fill_holes, py::arg("logits"), py::arg("out"), py::arg("threshold"),
        py::arg("max_hole_area"), py::arg("max_sprinkle_area"), py::arg("threads"),
        "SAM2-style hole filling / sprinkle removal on low-res logits. See rau_rt.ops.fill_holes.");
  m.def("overlay", &overlay, py::arg("image"), py::arg("masks"), py::arg("colors"),
        py::arg("alpha"), py::arg("threads"),
        "In-place alpha blend of binary masks onto a BGR/RGB uint8 image. See rau_rt.ops.overlay.");
}
