// The kernels' thread limit: how many of torch's threads their parallel regions may use.

#include "ops.h"
#include "simd.h"

namespace tokenmill {

// Sets the limit (0, or torch's thread count or more: none); returns the previous one.
int64_t set_thread_limit(int64_t n) {
  TORCH_CHECK(n >= 0, "set_thread_limit: n must be >= 0");
  return thread_limit().exchange(static_cast<int>(std::min<int64_t>(n, 1 << 20)));
}

// How many threads a kernel's parallel region uses now (torch's count under the limit).
int64_t kernel_threads() { return num_threads(); }

}  // namespace tokenmill
