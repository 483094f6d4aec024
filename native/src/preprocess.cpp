#include "rau_rt_native/preprocess.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "rau_rt_native/parallel.hpp"

namespace rau_rt_native {
namespace {

// Source taps for one output coordinate along one axis.
struct Tap {
  int64_t lo;
  int64_t hi;
  float frac;
};

// Half-pixel-centre mapping, as in torch's area_pixel_compute_source_index(align_corners=False).
std::vector<Tap> make_taps(int64_t in_size, int64_t out_size) {
  std::vector<Tap> taps(static_cast<size_t>(out_size));
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  for (int64_t i = 0; i < out_size; ++i) {
    const float src = std::max(static_cast<float>((static_cast<double>(i) + 0.5) * scale - 0.5), 0.0f);
    int64_t lo = std::min(static_cast<int64_t>(src), in_size - 1);
    int64_t hi = std::min(lo + 1, in_size - 1);
    taps[static_cast<size_t>(i)] = Tap{lo, hi, src - static_cast<float>(lo)};
  }
  return taps;
}

template <typename T>
inline float load(const char* p) {
  return static_cast<float>(*reinterpret_cast<const T*>(p));
}

}  // namespace

template <typename T>
void preprocess(const ImageView<T>& src, const PreprocessParams& params, float* out) {
  const std::vector<Tap> xs = make_taps(src.width, params.out_width);
  const std::vector<Tap> ys = make_taps(src.height, params.out_height);
  const int64_t plane = params.out_height * params.out_width;

  // Byte offsets of each plane's source channel, hoisted out of the pixel loop.
  int64_t channel_offset[3];
  for (int k = 0; k < 3; ++k) channel_offset[k] = params.source_channel[k] * src.channel_stride;

#pragma omp parallel for schedule(static) num_threads(params.threads) if (params.threads > 1)
  for (int64_t oy = 0; oy < params.out_height; ++oy) {
    const Tap ty = ys[static_cast<size_t>(oy)];
    const char* row0 = src.data + ty.lo * src.row_stride;
    const char* row1 = src.data + ty.hi * src.row_stride;
    float* out_row[3];
    for (int k = 0; k < 3; ++k) out_row[k] = out + k * plane + oy * params.out_width;

    for (int64_t ox = 0; ox < params.out_width; ++ox) {
      const Tap tx = xs[static_cast<size_t>(ox)];
      const int64_t c0 = tx.lo * src.col_stride;
      const int64_t c1 = tx.hi * src.col_stride;
      for (int k = 0; k < 3; ++k) {
        const int64_t ch = channel_offset[k];
        const float p00 = load<T>(row0 + c0 + ch);
        const float p01 = load<T>(row0 + c1 + ch);
        const float p10 = load<T>(row1 + c0 + ch);
        const float p11 = load<T>(row1 + c1 + ch);
        const float top = p00 + tx.frac * (p01 - p00);
        const float bottom = p10 + tx.frac * (p11 - p10);
        const float v = top + ty.frac * (bottom - top);
        float x = v * params.value_scale + params.value_offset;
        if (params.clamp) x = std::min(std::max(x, 0.0f), 1.0f);
        out_row[k][ox] = x * params.plane_scale[k] + params.plane_offset[k];
      }
    }
  }
}

template void preprocess<uint8_t>(const ImageView<uint8_t>&, const PreprocessParams&, float*);
template void preprocess<uint16_t>(const ImageView<uint16_t>&, const PreprocessParams&, float*);

}  // namespace rau_rt_native
