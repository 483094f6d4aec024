// Mask post-processing: SAM2-style hole filling on low-res logits, fused upsample + threshold +
// per-region statistics, and the overlay blend.
#pragma once

#include <cstdint>

namespace rau_rt_native {

// N regions of low-res float32 logits with arbitrary byte strides.
struct LogitsView {
  const char* data;
  int64_t regions;
  int64_t height;
  int64_t width;
  int64_t region_stride;
  int64_t row_stride;
  int64_t col_stride;
};

// Per-region results of postprocess_masks. Boxes are x1, y1, x2, y2 with exclusive x2/y2 (the
// continuous extent of the mask's pixels); an empty mask gives area 0 and box {-1, -1, -1, -1}.
struct RegionStats {
  int64_t* boxes;      // N x 4
  int64_t* areas;      // N
  double* score_sums;  // N: sum of sigmoid(logit) over the mask's pixels
};

// Bilinear upsample (half-pixel centres) of each region's logits to (out_height, out_width),
// `mask = logit > threshold` written to `masks` (N x out_height x out_width, C-contiguous uint8,
// values 0/1), and the region's box, area and score sum, in one pass over the output.
void postprocess_masks(const LogitsView& logits, float threshold, int64_t out_height,
                       int64_t out_width, uint8_t* masks, const RegionStats& stats, int threads);

// SAM2's fill_holes_in_mask_scores and sprinkle removal on low-res logits, 8-connectivity:
// background components (logit <= threshold) of at most `max_hole_area` pixels are set to
// threshold + 0.1 (sam2's video predictor uses 0.1 with threshold 0); then foreground components
// of at most `max_sprinkle_area` pixels are set to threshold - 0.1. An area of 0 disables a step.
// `out` is C-contiguous (N, height, width) float32 and may alias nothing in `logits`.
void fill_holes(const LogitsView& logits, float threshold, int64_t max_hole_area,
                int64_t max_sprinkle_area, float* out, int threads);

// In-place alpha blend of N binary masks onto a C-contiguous (height, width, 3) uint8 image:
// for each region in order, px = round(px + alpha * (color - px)) where its mask is non-zero.
void overlay(uint8_t* image, int64_t height, int64_t width, const uint8_t* masks, int64_t regions,
             const uint8_t* colors, float alpha, int threads);

}  // namespace rau_rt_native
