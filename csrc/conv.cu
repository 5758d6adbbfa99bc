// The forward and input-grad launchers, and what lkconv.explain reports: at stride 1 and dilation 1 the tensor-core
// kernels (tensor_core.cu) or the register-blocked kernel (blocked.cu); otherwise the tiled correlation or the general
// kernels of direct_conv.cuh. Any stride, dilation, padding, depth multiplier and element strides.

#include "direct_conv.cuh"
#include "launch.cuh"
#include "unit_stride.h"

namespace lkconv {
namespace {

bool is_blocked(DType dtype, const Geometry& g) {
  return unit_stride_and_dilation(g) && blocked_fits(dtype, g.kernel_h, g.kernel_w);
}

bool is_tensor_core(DType dtype, bool allow_tf32, const Geometry& g) {
  return tensor_cores_allowed(dtype, allow_tf32) && unit_stride_and_dilation(g) &&
         tensor_core_fits(dtype, g.kernel_h, g.kernel_w);
}

// Whether the tiled kernel's source tile fits: the geometry alone decides, so the maps are left empty.
bool forward_is_tiled(const Geometry& g) {
  ForwardArgs shape{};
  shape.conv = g;
  return direct_conv::fits(direct_conv::plan(direct_conv::forward_correlation(shape)));
}

bool input_grad_is_tiled(const Geometry& g) {
  InputGradArgs shape{};
  shape.conv = g;
  return g.stride_h == 1 && g.stride_w == 1 &&
         direct_conv::fits(direct_conv::plan(direct_conv::input_grad_correlation(shape)));
}

// Launches the tiled correlation, in the storage type of `dtype`; returns the cudaError_t of the launch.
int launch_tiled(DType dtype, const direct_conv::Correlation& c, cudaStream_t stream) {
  const direct_conv::Tiling t = direct_conv::plan(c);
  return dispatch_dtype(dtype, [&]<typename T>() {
    return launch(direct_conv::tiled_kernel<T>, t.blocks, direct_conv::kThreads, t.shared_bytes, stream, c, t);
  });
}

}  // namespace

const char* kernel_name(Pass pass, DType dtype, bool allow_tf32, const Geometry& conv, const MapSizes& sizes) {
  const bool tf32 = dtype == DType::Float32;
  switch (pass) {
    case Pass::Forward:
      if (is_tensor_core(dtype, allow_tf32, conv)) {
        const UnitStrideSizes unit{sizes.batch, sizes.in_h, sizes.in_w, sizes.out_h, sizes.out_w};
        if (runs_whole_map(dtype, conv.kernel_h, conv.kernel_w, unit)) {
          return tf32 ? "forward_tensor_core_whole_map (tf32)" : "forward_tensor_core_whole_map";
        }
        return tf32 ? "forward_tensor_core (tf32)" : "forward_tensor_core";
      }
      return is_blocked(dtype, conv) ? "forward_blocked"
                                     : (forward_is_tiled(conv) ? "forward_tiled" : "forward_general");
    case Pass::InputGrad:
      if (is_tensor_core(dtype, allow_tf32, conv)) {  // dy is the source, dx the destination
        const UnitStrideSizes unit{sizes.batch, sizes.out_h, sizes.out_w, sizes.in_h, sizes.in_w};
        if (runs_whole_map(dtype, conv.kernel_h, conv.kernel_w, unit)) {
          return tf32 ? "input_grad_tensor_core_whole_map (tf32)" : "input_grad_tensor_core_whole_map";
        }
        return tf32 ? "input_grad_tensor_core (tf32)" : "input_grad_tensor_core";
      }
      return is_blocked(dtype, conv) ? "input_grad_blocked"
                                     : (input_grad_is_tiled(conv) ? "input_grad_tiled" : "input_grad_general");
    case Pass::WeightGrad:
      if (weight_grad_is_whole_map(dtype, allow_tf32, conv, sizes)) {
        return tf32 ? "weight_grad_tensor_core_whole_map_partials (tf32) + weight_grad_reduce"
                    : "weight_grad_tensor_core_whole_map_partials + weight_grad_reduce";
      }
      if (weight_grad_is_tensor_core(dtype, allow_tf32, conv)) {
        return tf32 ? "weight_grad_tensor_core_partials (tf32) + weight_grad_reduce"
                    : "weight_grad_tensor_core_partials + weight_grad_reduce";
      }
      return weight_grad_is_blocked(dtype, conv) ? "weight_grad_blocked_partials + weight_grad_reduce"
                                                 : "weight_grad_partials + weight_grad_reduce";
  }
  return "unknown";
}

int forward(const ForwardArgs& args, void* stream) {
  const int64_t total = direct_conv::numel(args.output);
  if (total == 0) return 0;
  const Geometry& g = args.conv;
  if (unit_stride_and_dilation(g)) {
    const UnitStrideArgs unit = forward_unit_stride(args);
    if (is_tensor_core(args.dtype, args.allow_tf32, g)) return tensor_core_conv(unit, stream);
    if (is_blocked(args.dtype, g)) return blocked_conv(unit, stream);
  }
  auto s = static_cast<cudaStream_t>(stream);
  if (forward_is_tiled(g)) return launch_tiled(args.dtype, direct_conv::forward_correlation(args), s);
  return dispatch_dtype(args.dtype, [&]<typename T>() {
    return launch(direct_conv::forward_general<T>, cdiv(total, direct_conv::kGeneralThreads),
                  direct_conv::kGeneralThreads, 0, s, args, total);
  });
}

int input_grad(const InputGradArgs& args, void* stream) {
  const int64_t total = direct_conv::numel(args.grad_input);
  if (total == 0) return 0;
  const Geometry& g = args.conv;
  if (unit_stride_and_dilation(g)) {
    const UnitStrideArgs unit = input_grad_unit_stride(args);
    if (is_tensor_core(args.dtype, args.allow_tf32, g)) return tensor_core_conv(unit, stream);
    if (is_blocked(args.dtype, g)) return blocked_conv(unit, stream);
  }
  auto s = static_cast<cudaStream_t>(stream);
  if (input_grad_is_tiled(g)) return launch_tiled(args.dtype, direct_conv::input_grad_correlation(args), s);
  return dispatch_dtype(args.dtype, [&]<typename T>() {
    return launch(direct_conv::input_grad_general<T>, cdiv(total, direct_conv::kGeneralThreads),
                  direct_conv::kGeneralThreads, 0, s, args, total);
  });
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

bool is_sticky_error(int code) { return breaks_the_context(static_cast<cudaError_t>(code)); }

int runtime_version() { return CUDART_VERSION; }

int driver_version() {
  int version = 0;
  return cudaDriverGetVersion(&version) == cudaSuccess ? version : 0;
}

}  // namespace lkconv
