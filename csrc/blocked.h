// The register-blocked stride-1 kernel (blocked.cu), as conv.cu's launchers call it. Torch-free.
#pragma once

#include <cstdint>

#include "depthwise.h"

namespace lkconv {

// One stride-1, dilation-1 correlation: dst[y, x] = bias + sum src[y + origin_h + r, x + origin_w + q] * f[r, q].
struct BlockedArgs {
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

// Launches it on `stream`; returns the cudaError_t of the launch.
int blocked_conv(const BlockedArgs& args, void* stream);

}  // namespace lkconv
