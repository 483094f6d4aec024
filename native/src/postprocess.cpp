#include "rau_rt_native/postprocess.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "rau_rt_native/parallel.hpp"
#include "rau_rt_native/resample.hpp"
#include "rau_rt_native/rows.hpp"

namespace rau_rt_native {
namespace {

inline float logit_at(const LogitsView& v, int64_t n, int64_t y, int64_t x) {
  return *reinterpret_cast<const float*>(v.data + n * v.region_stride + y * v.row_stride +
                                         x * v.col_stride);
}

struct Partial {
  int64_t x1 = std::numeric_limits<int64_t>::max();
  int64_t y1 = std::numeric_limits<int64_t>::max();
  int64_t x2 = -1;
  int64_t y2 = -1;
  int64_t area = 0;
  double sum = 0.0;
};

}  // namespace

void postprocess_masks(const LogitsView& logits, float threshold, int64_t out_height,
                       int64_t out_width, uint8_t* masks, const RegionStats& stats, int threads) {
  const Taps xs = make_taps(logits.width, out_width);
  const Taps ys = make_taps(logits.height, out_height);
  const int64_t plane = out_height * out_width;
  const int64_t regions = logits.regions;
  std::vector<Partial> totals(static_cast<size_t>(regions));

  // Source rows are cached under key = region * height + row, so one cache serves every region.
  auto fill = [&](int64_t key, float* dst) {
    const int64_t n = key / logits.height, row = key % logits.height;
    for (int64_t x = 0; x < out_width; ++x) {
      const size_t i = static_cast<size_t>(x);
      const float a = logit_at(logits, n, row, xs.lo[i]);
      const float b = logit_at(logits, n, row, xs.hi[i]);
      dst[x] = a + xs.frac[i] * (b - a);
    }
  };

  // One parallel region over all (region, output row) pairs: a single fork/join per call, and
  // guided chunks so a thread that loses its core to another process does not hold up the rest.
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    RowCache cache(1, out_width);
    std::vector<float> values(static_cast<size_t>(out_width));
    std::vector<Partial> parts(static_cast<size_t>(regions));
#pragma omp for schedule(guided, kRowChunk)
    for (int64_t item = 0; item < regions * out_height; ++item) {
      const int64_t n = item / out_height, y = item % out_height;
      const size_t iy = static_cast<size_t>(y);
      const float* t = nullptr;
      const float* b = nullptr;
      cache.get(n * logits.height + ys.lo[iy], n * logits.height + ys.hi[iy], fill, &t, &b);
      const float fy = ys.frac[iy];
      uint8_t* m = masks + n * plane + y * out_width;
      float* v = values.data();
      const int64_t row_area = threshold_row(t, b, fy, threshold, v, m, out_width);
      if (row_area == 0) continue;  // most rows of a thin vessel's mask are empty
      Partial& part = parts[static_cast<size_t>(n)];
      part.y1 = std::min(part.y1, y);
      part.y2 = std::max(part.y2, y + 1);
      part.area += row_area;
      for (int64_t x = 0; x < out_width; ++x) {
        if (!m[x]) continue;
        part.x1 = std::min(part.x1, x);
        part.x2 = std::max(part.x2, x + 1);
        part.sum += 1.0 / (1.0 + std::exp(-static_cast<double>(v[x])));
      }
    }
#pragma omp critical
    for (int64_t n = 0; n < regions; ++n) {
      Partial& total = totals[static_cast<size_t>(n)];
      const Partial& part = parts[static_cast<size_t>(n)];
      total.x1 = std::min(total.x1, part.x1);
      total.y1 = std::min(total.y1, part.y1);
      total.x2 = std::max(total.x2, part.x2);
      total.y2 = std::max(total.y2, part.y2);
      total.area += part.area;
      total.sum += part.sum;
    }
  }

  for (int64_t n = 0; n < regions; ++n) {
    const Partial& total = totals[static_cast<size_t>(n)];
    int64_t* box = stats.boxes + 4 * n;
    if (total.area == 0) {
      box[0] = box[1] = box[2] = box[3] = -1;
    } else {
      box[0] = total.x1;
      box[1] = total.y1;
      box[2] = total.x2;
      box[3] = total.y2;
    }
    stats.areas[n] = total.area;
    stats.score_sums[n] = total.sum;
  }
}

namespace {

// Relabels every 8-connected component of pixels whose class (logit > threshold) equals
// `foreground` and whose area is at most `max_area` to `replacement`. `plane` is modified in place.
void replace_small_components(float* plane, int64_t height, int64_t width, float threshold,
                              bool foreground, int64_t max_area, float replacement) {
  const int64_t size = height * width;
  std::vector<uint8_t> seen(static_cast<size_t>(size), 0);
  std::vector<int64_t> component;
  std::vector<int64_t> stack;
  auto in_class = [&](int64_t i) { return (plane[i] > threshold) == foreground; };
  for (int64_t start = 0; start < size; ++start) {
    if (seen[static_cast<size_t>(start)] || !in_class(start)) continue;
    component.clear();
    stack.assign(1, start);
    seen[static_cast<size_t>(start)] = 1;
    while (!stack.empty()) {
      const int64_t i = stack.back();
      stack.pop_back();
      component.push_back(i);
      const int64_t y = i / width, x = i % width;
      for (int64_t dy = -1; dy <= 1; ++dy) {
        for (int64_t dx = -1; dx <= 1; ++dx) {
          const int64_t ny = y + dy, nx = x + dx;
          if ((dy == 0 && dx == 0) || ny < 0 || ny >= height || nx < 0 || nx >= width) continue;
          const int64_t j = ny * width + nx;
          if (seen[static_cast<size_t>(j)] || !in_class(j)) continue;
          seen[static_cast<size_t>(j)] = 1;
          stack.push_back(j);
        }
      }
    }
    if (static_cast<int64_t>(component.size()) <= max_area) {
      for (int64_t i : component) plane[i] = replacement;
    }
  }
}

}  // namespace

void fill_holes(const LogitsView& logits, float threshold, int64_t max_hole_area,
                int64_t max_sprinkle_area, float* out, int threads) {
  const int64_t plane = logits.height * logits.width;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
  for (int64_t n = 0; n < logits.regions; ++n) {
    float* dst = out + n * plane;
    for (int64_t y = 0; y < logits.height; ++y) {
      for (int64_t x = 0; x < logits.width; ++x) {
        dst[y * logits.width + x] = logit_at(logits, n, y, x);
      }
    }
    if (max_hole_area > 0) {
      replace_small_components(dst, logits.height, logits.width, threshold, false, max_hole_area,
                               threshold + 0.1f);
    }
    if (max_sprinkle_area > 0) {
      replace_small_components(dst, logits.height, logits.width, threshold, true,
                               max_sprinkle_area, threshold - 0.1f);
    }
  }
}

void overlay(uint8_t* image, int64_t height, int64_t width, const uint8_t* masks, int64_t regions,
             const uint8_t* colors, float alpha, int threads) {
  const int64_t plane = height * width;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t y = 0; y < height; ++y) {
    uint8_t* row = image + y * width * 3;
    for (int64_t n = 0; n < regions; ++n) {
      const uint8_t* m = masks + n * plane + y * width;
      const uint8_t* color = colors + 3 * n;
      for (int64_t x = 0; x < width; ++x) {
        if (!m[x]) continue;
        for (int c = 0; c < 3; ++c) {
          const float p = static_cast<float>(row[3 * x + c]);
          const float v = p + alpha * (static_cast<float>(color[c]) - p);
          row[3 * x + c] = static_cast<uint8_t>(std::floor(v + 0.5f));
        }
      }
    }
  }
}

}  // namespace rau_rt_native
