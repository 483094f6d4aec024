// Bilinear resampling helpers shared by the kernels: half-pixel-centre taps and a per-thread cache
// of horizontally interpolated source rows (each source row is interpolated once per thread and
// reused by every output row that reads it).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace rau_rt_native {

// Source taps of one axis, structure-of-arrays so the row loops vectorize.
struct Taps {
  std::vector<int64_t> lo;
  std::vector<int64_t> hi;
  std::vector<float> frac;
};

// Half-pixel-centre mapping as torch's CPU bilinear kernel computes it (align_corners=False), so
// upsampled SAM2 logits match F.interpolate: scale = in / out rounded to float32, then
// src = max(scale * (dst + 0.5) - 0.5, 0) evaluated unrounded (torch's fused multiply-add; here
// in double) and rounded once to float32; lo = floor(src), hi = min(lo + 1, in - 1).
inline Taps make_taps(int64_t in_size, int64_t out_size) {
  Taps taps;
  taps.lo.resize(static_cast<size_t>(out_size));
  taps.hi.resize(static_cast<size_t>(out_size));
  taps.frac.resize(static_cast<size_t>(out_size));
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  for (int64_t i = 0; i < out_size; ++i) {
    const float src = std::max(
        static_cast<float>(static_cast<double>(scale) * (static_cast<double>(i) + 0.5) - 0.5),
        0.0f);
    const int64_t lo = std::min(static_cast<int64_t>(src), in_size - 1);
    const size_t k = static_cast<size_t>(i);
    taps.lo[k] = lo;
    taps.frac[k] = src - static_cast<float>(lo);
    // A zero weight never reads the second tap (a + 0 * (b - a) == a exactly), so point it at
    // the first: an identity or integer-ratio axis then interpolates each source row once.
    taps.hi[k] = taps.frac[k] == 0.0f ? lo : std::min(lo + 1, in_size - 1);
  }
  return taps;
}

// Two row slots (one per vertical tap), each `planes` x `width` floats, remembering which source
// row they hold. `fill(row, dst)` interpolates source row `row` horizontally into `dst`.
class RowCache {
 public:
  RowCache(int64_t planes, int64_t width)
      : stride_(width), storage_(static_cast<size_t>(2 * planes * width)) {
    slot_[0] = storage_.data();
    slot_[1] = storage_.data() + planes * width;
  }

  int64_t plane_stride() const { return stride_; }

  // Returns {row lo, row hi} slots, interpolating only rows not already cached.
  template <typename Fill>
  void get(int64_t lo, int64_t hi, Fill&& fill, const float** out_lo, const float** out_hi) {
    if (row_[0] != lo && row_[1] == lo) swap();
    if (row_[0] != lo) {
      fill(lo, slot_[0]);
      row_[0] = lo;
    }
    if (hi == lo) {
      *out_lo = *out_hi = slot_[0];
      return;
    }
    if (row_[1] != hi) {
      fill(hi, slot_[1]);
      row_[1] = hi;
    }
    *out_lo = slot_[0];
    *out_hi = slot_[1];
  }

 private:
  void swap() {
    std::swap(slot_[0], slot_[1]);
    std::swap(row_[0], row_[1]);
  }

  int64_t stride_;
  std::vector<float> storage_;
  float* slot_[2];
  int64_t row_[2] = {-1, -1};
};

}  // namespace rau_rt_native
