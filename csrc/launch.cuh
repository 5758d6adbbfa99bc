// Host-side launch helper shared by the .cu launchers (never compiled for the CPU emulation).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lkconv {

// Launches `kernel` on `stream` with `shared_bytes` of dynamic shared memory, opting in first to `opt_in_bytes`
// (the kernel's fixed ceiling, not this launch's size: concurrent launches of one kernel then never shrink each
// other's allowance). The attribute belongs to the current device, so it is set on every launch; a refused opt-in
// is cleared from the runtime's last error so that it cannot surface at a later launch. Returns the cudaError_t.
template <typename... Params, typename... Args>
int launch_opted_in(void (*kernel)(Params...), int64_t blocks, int threads, int64_t shared_bytes,
                    int64_t opt_in_bytes, cudaStream_t stream, const Args&... args) {
  const cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(opt_in_bytes));
  if (status != cudaSuccess) {
    cudaGetLastError();
    return static_cast<int>(status);
  }
  kernel<<<blocks, threads, shared_bytes, stream>>>(args...);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lkconv
