// The stride-1, dilation-1 correlation kernels that conv.cu's launchers call (RepLKNet's case): the exact
// register-blocked CUDA-core kernel (blocked.cu) and the tensor-core kernels (tensor_core.cu: fp16/bf16, and fp32 as
// TF32 where allowed; a row form and a whole-map form). Torch-free.
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

// The forward as a stride-1 correlation of x with the filter, from the top-left padding corner.
inline UnitStrideArgs forward_unit_stride(const ForwardArgs& a) {
  const Geometry& g = a.conv;
  return {a.dtype, a.input, a.output, a.weight, a.bias, g.kernel_h, g.kernel_w, g.multiplier, -int64_t{g.pad_top},
          -int64_t{g.pad_left}, false};
}

// The input grad: dy correlated with the rotated filter, padded by (k - 1 - pad).
inline UnitStrideArgs input_grad_unit_stride(const InputGradArgs& a) {
  const Geometry& g = a.conv;
  return {a.dtype, a.grad_output, a.grad_input, a.weight, nullptr, g.kernel_h, g.kernel_w, g.multiplier,
          int64_t{g.pad_top} - (g.kernel_h - 1), int64_t{g.pad_left} - (g.kernel_w - 1), true};
}

// The map sizes that decide between the tensor-core kernel's two forms.
struct UnitStrideSizes {
  int64_t batch;
  int64_t src_h, src_w;
  int64_t dst_h, dst_w;
};

// Whether the blocked kernel's shared-memory tile fits for this dtype and kernel size, whatever the source's alignment.
bool blocked_fits(DType dtype, int kernel_h, int kernel_w);

// Launches the blocked kernel on `stream`; returns the cudaError_t of the launch.
int blocked_conv(const UnitStrideArgs& args, void* stream);

// Whether the tensor-core kernel's tiles for this dtype and kernel size fit in shared memory.
bool tensor_core_fits(DType dtype, int kernel_h, int kernel_w);

// Whether the tensor-core kernel runs its whole-map form (one dense GEMM per channel) rather than the row form: true
// when that issues fewer multiply-adds, i.e. when the kernel covers most of a small map and the batch fills the GEMM.
bool runs_whole_map(DType dtype, int kernel_h, int kernel_w, const UnitStrideSizes& sizes);

// Launches the tensor-core kernel on `stream` (fp32 runs as TF32), in the form runs_whole_map picks; returns
// the cudaError_t of the launch.
int tensor_core_conv(const UnitStrideArgs& args, void* stream);

}  // namespace lkconv
