#include "rau_rt_native/rows.hpp"

#include <algorithm>

namespace rau_rt_native {

RAU_RT_MULTIVERSION
void affine_row(const float* t, const float* b, float fy, float vs, float vo, bool clamp,
                float ps, float po, float* out, int64_t width) {
  if (clamp) {
    for (int64_t x = 0; x < width; ++x) {
      float v = (t[x] + fy * (b[x] - t[x])) * vs + vo;
      v = std::min(std::max(v, 0.0f), 1.0f);
      out[x] = v * ps + po;
    }
  } else {
    for (int64_t x = 0; x < width; ++x) {
      out[x] = ((t[x] + fy * (b[x] - t[x])) * vs + vo) * ps + po;
    }
  }
}

RAU_RT_MULTIVERSION
void affine_row3(const float* t, const float* b, float fy, float vs, float vo, bool clamp,
                 const float* ps, const float* po, float* out0, float* out1, float* out2,
                 int64_t width) {
  const float s0 = ps[0], s1 = ps[1], s2 = ps[2], f0 = po[0], f1 = po[1], f2 = po[2];
  for (int64_t x = 0; x < width; ++x) {
    float v = (t[x] + fy * (b[x] - t[x])) * vs + vo;
    if (clamp) v = std::min(std::max(v, 0.0f), 1.0f);
    out0[x] = v * s0 + f0;
    out1[x] = v * s1 + f1;
    out2[x] = v * s2 + f2;
  }
}

RAU_RT_MULTIVERSION
int64_t threshold_row(const float* t, const float* b, float fy, float threshold, float* values,
                      uint8_t* mask, int64_t width) {
  int64_t area = 0;
  for (int64_t x = 0; x < width; ++x) {
    const float v = t[x] + fy * (b[x] - t[x]);
    values[x] = v;
    const uint8_t inside = v > threshold ? 1 : 0;
    mask[x] = inside;
    area += inside;
  }
  return area;
}

}  // namespace rau_rt_native
