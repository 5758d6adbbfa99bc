// The interface between the torch binding (binding.cpp) and the CUDA kernels (*.cu), free of torch types:
// plain structs of pointers, sizes and element strides, so strided and channels_last tensors need no copies.
#pragma once

#include <cstdint>

namespace lkconv {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// One (N, C, H, W) tensor: its data and element strides.
struct Map {
  void* data;
  int64_t n, c, h, w;
  int64_t stride_n, stride_c, stride_h, stride_w;
};

// What every pass needs to know about the conv. Output channel `o` reads input channel `o / multiplier`.
struct Geometry {
  int64_t multiplier;
  int kernel_h, kernel_w;
  int stride_h, stride_w;
  int pad_top, pad_left;
  int dilation_h, dilation_w;
};

inline bool unit_stride_and_dilation(const Geometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && g.dilation_h == 1 && g.dilation_w == 1;
}

// Whether a dtype may run on tensor cores: fp16/bf16 always, fp32 only as TF32 where PyTorch allows it for convs.
inline bool tensor_cores_allowed(DType dtype, bool allow_tf32) { return dtype != DType::Float32 || allow_tf32; }

struct ForwardArgs {
  DType dtype;
  bool allow_tf32;     // fp32 may run on tensor cores as TF32 (PyTorch's conv TF32 setting)
  Geometry conv;
  Map input;           // (N, C, H, W)
  Map output;          // (N, C*m, OH, OW), written
  const void* weight;  // (C*m, 1, kh, kw), contiguous
  const void* bias;    // (C*m,) contiguous, or null
};

struct InputGradArgs {
  DType dtype;
  bool allow_tf32;     // fp32 may run on tensor cores as TF32 (PyTorch's conv TF32 setting)
  Geometry conv;
  Map grad_output;     // (N, C*m, OH, OW)
  Map grad_input;      // (N, C, H, W), written
  const void* weight;  // (C*m, 1, kh, kw), contiguous
};

struct WeightGradArgs {
  DType dtype;
  bool allow_tf32;     // fp32 may run on tensor cores as TF32 (PyTorch's conv TF32 setting)
  Geometry conv;
  Map grad_output;     // (N, C*m, OH, OW)
  Map input;           // (N, C, H, W)
  float* workspace;    // splits x C*m x (kh*kw + 1) fp32 partial sums (the +1 is the bias)
  int64_t splits;      // how many row ranges the N*OH reduction is cut into
  void* grad_weight;   // (C*m, 1, kh, kw), contiguous, written
  void* grad_bias;     // (C*m,) contiguous, written, or null
};

// Each launcher enqueues its kernels on `stream` (a cudaStream_t) and returns the cudaError_t of the launch (0 on
// success).
int forward(const ForwardArgs& args, void* stream);
int input_grad(const InputGradArgs& args, void* stream);
int weight_grad(const WeightGradArgs& args, void* stream);

enum class Pass : int { Forward = 0, InputGrad = 1, WeightGrad = 2 };

// Whether the weight grad runs its tensor-core kernel (fp16/bf16, or fp32 allowed TF32; stride 1, dilation 1).
bool weight_grad_is_tensor_core(DType dtype, bool allow_tf32, const Geometry& conv);

// A conv's batch and map sizes: besides the geometry, they decide between kernel forms.
struct MapSizes {
  int64_t batch;
  int64_t in_h, in_w;
  int64_t out_h, out_w;
};

// Whether the weight grad runs its tensor-core Gram-matrix form: maps the kernel covers, rows at most 64 wide.
bool weight_grad_is_whole_map(DType dtype, bool allow_tf32, const Geometry& conv, const MapSizes& sizes);

// Whether the weight grad runs its register-tiled kernel (stride 1, dilation 1, strips fit in shared memory).
bool weight_grad_is_blocked(DType dtype, const Geometry& conv);

// The kernel a launcher picks for a pass with this dtype, TF32 permission, geometry and sizes (what lkconv.explain
// reports).
const char* kernel_name(Pass pass, DType dtype, bool allow_tf32, const Geometry& conv, const MapSizes& sizes);

// cudaGetErrorString for a code the launchers returned.
const char* error_string(int code);
// Whether the launchers' error `code` leaves the CUDA context broken (an illegal address, ...: sticky).
bool is_sticky_error(int code);

// The CUDA runtime version the kernels were built with (linked statically, e.g. 13000 for 13.0), and the newest one
// the installed driver supports (0 without a driver): a driver of an older major version cannot launch anything.
int runtime_version();
int driver_version();

}  // namespace lkconv
