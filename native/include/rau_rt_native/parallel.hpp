// Thread-count plumbing shared by the kernels. The count is passed into every call (resolved in
// rau_rt/ops.py from RAU_RT_THREADS or the caller); the extension keeps no global state.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rau_rt_native {

// Output rows per dynamically scheduled chunk: large enough that a chunk reuses its cached
// source rows (a 256 -> 1080 upsample reads each source row for ~4 output rows), small enough
// that a thread descheduled by another process holds up at most a few percent of a frame.
constexpr int kRowChunk = 16;

inline bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// Threads the OpenMP runtime would use by default (1 without OpenMP).
inline int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace rau_rt_native
