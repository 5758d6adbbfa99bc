// Host-side launch helpers shared by the .cu launchers (never compiled for the CPU emulation). Every kernel launch
// in csrc/ goes through `launch` or `launch_opted_in`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lkconv {

// The most blocks a launch takes: gridDim.x is at most 2^31 - 1, and <<<>>> keeps only the low 32 bits of a larger
// count, so such a launch would run a fraction of its blocks, leave the rest of the output unwritten and report no
// error. (Every grid here is 1-D.)
constexpr int64_t kMaxBlocks = 2147483647;

// Launches `kernel` with `blocks` blocks of `threads` threads and `shared_bytes` of dynamic shared memory on
// `stream`; returns the cudaError_t. A block count outside [1, kMaxBlocks] is refused as an invalid configuration
// before anything is launched.
template <typename... Params, typename... Args>
int launch(void (*kernel)(Params...), int64_t blocks, int threads, int64_t shared_bytes, cudaStream_t stream,
           const Args&... args) {
  if (blocks < 1 || blocks > kMaxBlocks) return static_cast<int>(cudaErrorInvalidConfiguration);
  kernel<<<static_cast<unsigned int>(blocks), threads, static_cast<size_t>(shared_bytes), stream>>>(args...);
  return static_cast<int>(cudaGetLastError());
}

// `launch`, opting in first to `opt_in_bytes` of dynamic shared memory (the kernel's fixed ceiling, not this
// launch's size: concurrent launches of one kernel then never shrink each other's allowance). The attribute belongs
// to the current device, so it is set on every launch; a refused opt-in is cleared from the runtime's last error so
// that it cannot surface at a later launch.
template <typename... Params, typename... Args>
int launch_opted_in(void (*kernel)(Params...), int64_t blocks, int threads, int64_t shared_bytes,
                    int64_t opt_in_bytes, cudaStream_t stream, const Args&... args) {
  const cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(opt_in_bytes));
  if (status != cudaSuccess) {
    cudaGetLastError();
    return static_cast<int>(status);
  }
  return launch(kernel, blocks, threads, shared_bytes, stream, args...);
}

// Whether `error` is a sticky one: the context is broken (by this or an earlier kernel: an illegal address, a failed
// assert, ...) and every later CUDA call fails too, PyTorch's included.
inline bool breaks_the_context(cudaError_t error) {
  switch (error) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorECCUncorrectable:
      return true;
    default:
      return false;
  }
}

}  // namespace lkconv
