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
#include "rau_rt_native/preprocess.hpp"

namespace py = pybind11;
using rau_rt_native::ImageView;
using rau_rt_native::PreprocessParams;

namespace {

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
}
