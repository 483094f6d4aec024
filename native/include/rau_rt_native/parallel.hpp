// Thread-count plumbing shared by the kernels. The count is passed into every call (resolved in
// rau_rt/ops.py from RAU_RT_THREADS or the caller); the extension keeps no global state.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rau_rt_native {

// Smallest chunk of output rows under guided scheduling. Guided hands out large chunks first
// (each chunk starts with a cold row cache: two extra horizontal passes, the costly part of an
// upsample) and shrinks them towards the end, down to this size, so a thread that loses its
// core to another process holds up only a small tail instead of half the frame.
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
