#include "rau_rt_native/preprocess.hpp"

#include <algorithm>

#include "rau_rt_native/parallel.hpp"
#include "rau_rt_native/resample.hpp"
#include "rau_rt_native/rows.hpp"

namespace rau_rt_native {

template <typename T>
void preprocess(const ImageView<T>& src, const PreprocessParams& params, float* out) {
  const Taps xs = make_taps(src.width, params.out_width);
  const Taps ys = make_taps(src.height, params.out_height);
  const int64_t width = params.out_width;
  const int64_t plane = params.out_height * width;
  const int64_t channels = src.channels;
  const bool gray = params.source_channel[0] == params.source_channel[1] &&
                    params.source_channel[1] == params.source_channel[2];

  // Byte offsets of the two horizontal taps of every output column.
  std::vector<int64_t> col_lo(static_cast<size_t>(width)), col_hi(static_cast<size_t>(width));
  for (int64_t x = 0; x < width; ++x) {
    col_lo[static_cast<size_t>(x)] = xs.lo[static_cast<size_t>(x)] * src.col_stride;
    col_hi[static_cast<size_t>(x)] = xs.hi[static_cast<size_t>(x)] * src.col_stride;
  }

  // Horizontal pass: source row -> one float row per source channel.
  auto fill = [&](int64_t row, float* dst) {
    const char* base = src.data + row * src.row_stride;
    for (int64_t c = 0; c < channels; ++c) {
      const char* chan = base + c * src.channel_stride;
      float* d = dst + c * width;
      for (int64_t x = 0; x < width; ++x) {
        const size_t i = static_cast<size_t>(x);
        const float a = static_cast<float>(*reinterpret_cast<const T*>(chan + col_lo[i]));
        const float b = static_cast<float>(*reinterpret_cast<const T*>(chan + col_hi[i]));
        d[x] = a + xs.frac[i] * (b - a);
      }
    }
  };

#pragma omp parallel num_threads(params.threads) if (params.threads > 1)
  {
    RowCache cache(channels, width);
#pragma omp for schedule(guided, kRowChunk)
    for (int64_t y = 0; y < params.out_height; ++y) {
      const size_t iy = static_cast<size_t>(y);
      const float* top = nullptr;
      const float* bottom = nullptr;
      cache.get(ys.lo[iy], ys.hi[iy], fill, &top, &bottom);
      const float fy = ys.frac[iy];
      // Vertical pass + window/scale + per-plane affine (rows.hpp, vectorized per CPU).
      if (gray) {  // one source channel for all three planes (X-ray): interpolate once
        float* o0 = out + y * width;
        affine_row3(top + params.source_channel[0] * width,
                    bottom + params.source_channel[0] * width, fy, params.value_scale,
                    params.value_offset, params.clamp, params.plane_scale, params.plane_offset,
                    o0, o0 + plane, o0 + 2 * plane, width);
        continue;
      }
      for (int k = 0; k < 3; ++k) {
        affine_row(top + params.source_channel[k] * width,
                   bottom + params.source_channel[k] * width, fy, params.value_scale,
                   params.value_offset, params.clamp, params.plane_scale[k],
                   params.plane_offset[k], out + k * plane + y * width, width);
      }
    }
  }
}

template void preprocess<uint8_t>(const ImageView<uint8_t>&, const PreprocessParams&, float*);
template void preprocess<uint16_t>(const ImageView<uint16_t>&, const PreprocessParams&, float*);

}  // namespace rau_rt_native
