// Fused frame pre-processing: bilinear resize + window/scale + per-channel affine + HWC->CHW.
#pragma once

#include <cstdint>

namespace rau_rt_native {

// A strided 2-D image with 1 or 3 interleaved channels. Strides are in bytes and may be negative
// (e.g. a channel-reversed NumPy view), so any NumPy view is read without a copy.
template <typename T>
struct ImageView {
  const char* data;
  int64_t height;
  int64_t width;
  int64_t channels;
  int64_t row_stride;      // bytes between rows
  int64_t col_stride;      // bytes between pixels
  int64_t channel_stride;  // bytes between channels of one pixel
};

struct PreprocessParams {
  int64_t out_height;
  int64_t out_width;
  // Plane k of the output reads input channel source_channel[k] (BGR->RGB swap, gray->3 planes).
  int source_channel[3];
  // x = v * value_scale + value_offset, then clamped to [0, 1] when clamp is true (window/level).
  float value_scale;
  float value_offset;
  bool clamp;
  // out[k] = x * plane_scale[k] + plane_offset[k]  (= (x - mean[k]) / std[k])
  float plane_scale[3];
  float plane_offset[3];
  int threads;
};

// Writes a float32 (3, out_height, out_width) C-contiguous tensor to `out`.
// Bilinear sampling uses half-pixel centres (align_corners=False, no antialiasing), the source
// index clamped at the borders: the semantics of torch.nn.functional.interpolate(mode="bilinear",
// align_corners=False) and of rau_rt.ops.preprocess_reference.
template <typename T>
void preprocess(const ImageView<T>& src, const PreprocessParams& params, float* out);

}  // namespace rau_rt_native
