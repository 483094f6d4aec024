// Row kernels of the vertical (second) bilinear pass: contiguous float rows, the part of every
// kernel that touches each output pixel. They are compiled several times (baseline, AVX2,
// AVX-512) and picked at load time for the running CPU, as OpenCV dispatches its own kernels, so
// a portable build still uses the wide vector units. Rounding is identical in every version:
// the build disables FMA contraction.
#pragma once

#include <cstdint>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__)
#define RAU_RT_MULTIVERSION __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define RAU_RT_MULTIVERSION
#endif

namespace rau_rt_native {

// out[x] = clamp?((t + fy * (b - t)) * vs + vo) * ps + po, clamp to [0, 1] when `clamp`.
void affine_row(const float* t, const float* b, float fy, float vs, float vo, bool clamp,
                float ps, float po, float* out, int64_t width);

// The same value written to three planes with their own (ps, po): gray input.
void affine_row3(const float* t, const float* b, float fy, float vs, float vo, bool clamp,
                 const float* ps, const float* po, float* out0, float* out1, float* out2,
                 int64_t width);

// values[x] = t + fy * (b - t); mask[x] = values[x] > threshold; returns the row's mask count.
int64_t threshold_row(const float* t, const float* b, float fy, float threshold, float* values,
                      uint8_t* mask, int64_t width);

}  // namespace rau_rt_native
