// The stride-1, dilation-1 correlation kernels that conv.cu's launchers call (RepLKNet's case): the exact
// register-blocked CUDA-core kernel (blocked.cu) and the tensor-core kernel (tensor_core.cu: fp16/bf16, and fp32 as
// TF32 where allowed). Torch-free.
#pragma once

#include <cstdint>

#include "depthwise.h"

namespace lkconv {

// One stride-1, dilation-1 correlation: dst[y, x] = bias + sum src[y + origin_h + r, x + origin_w + q] * f[r, q].
struct UnitStrideArgs {
  DType dtype;
  Map src;
  Map dst;
  const void* weight;  // (C*m, 1, kh, kw) contiguous
  const void* bias;    // forward only, or null
  int kernel_h, kernel_w;
  int64_t multiplier;
  int64_t origin_h, origin_w;
  bool flip;           // input grad: filters rotated 180 degrees, summed over each input channel's m outputs
};

// Whether the blocked kernel's shared-memory tile fits for this kernel size.
bool blocked_fits(int kernel_h, int kernel_w);

// Launches the blocked kernel on `stream`; returns the cudaError_t of the launch.
int blocked_conv(const UnitStrideArgs& args, void* stream);

// Whether the tensor-core kernel's tiles for this dtype and kernel size fit in shared memory.
bool tensor_core_fits(DType dtype, int kernel_h, int kernel_w);

// Launches the tensor-core kernel on `stream` (fp32 runs as TF32); returns the cudaError_t of the launch.
int tensor_core_conv(const UnitStrideArgs& args, void* stream);

}  // namespace lkconv
