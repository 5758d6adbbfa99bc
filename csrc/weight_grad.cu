// The weight- and bias-grad launcher, deterministic: the N*OH reduction is cut into `splits` fixed row ranges, a
// partials kernel writes fp32 sums for each output channel and range, and weight_grad_reduce adds the ranges in order.
//
// At stride 1 and dilation 1, fp16/bf16 (and fp32 where TF32 is allowed) take the tensor-core partials: the Gram-matrix
// form (tensor_core_whole_map_weight_grad.cuh) on maps the kernel covers, the row form (tensor_core_weight_grad.cuh)
// elsewhere; exact fp32 takes the register-tiled kernel, everything else the simple per-tap kernel (both in
// direct_weight_grad.cuh). All share the ordered reduce.

#include "common.cuh"
#include "direct_weight_grad.cuh"
#include "launch.cuh"
#include "tensor_core_weight_grad.cuh"
#include "tensor_core_whole_map_weight_grad.cuh"
#include "unit_stride.h"

namespace lkconv {

bool weight_grad_is_tensor_core(DType dtype, bool allow_tf32, const Geometry& g) {
  return tensor_cores_allowed(dtype, allow_tf32) && unit_stride_and_dilation(g) && g.kernel_h <= 1024 &&
         g.kernel_w <= 1024;
}

bool weight_grad_is_whole_map(DType dtype, bool allow_tf32, const Geometry& g, const MapSizes& sizes) {
  namespace wm = tensor_core_whole_map_weight_grad;
  if (!weight_grad_is_tensor_core(dtype, allow_tf32, g) || !wm::rows_fit(sizes.in_w, sizes.out_w)) return false;
  // Where the forward takes its whole-map form, the kernel covers the map: most of the row form's work is padding.
  if (!runs_whole_map(dtype, g.kernel_h, g.kernel_w,
                      {sizes.batch, sizes.in_h, sizes.in_w, sizes.out_h, sizes.out_w})) {
    return false;
  }
  return dispatch_dtype(dtype, [&]<typename T>() {
    const wm::Tiling t = wm::plan<T>(g.kernel_h, g.kernel_w, sizes.batch, 1, sizes.in_h, sizes.in_w, sizes.out_h,
                                     sizes.out_w);
    return static_cast<int>(t.shared_bytes <= wm::kSharedLimit);
  }) != 0;
}

bool weight_grad_is_blocked(DType dtype, const Geometry& g) {
  namespace dw = direct_weight_grad;
  return unit_stride_and_dilation(g) && dispatch_dtype(dtype, [&]<typename T>() {
           return static_cast<int>(dw::blocked_fits<T>(g.kernel_h, g.kernel_w));
         }) != 0;
}

namespace {

// Launches the partial-sums kernel the dtype, geometry and sizes call for (`whole_map`: the Gram-matrix form),
// writing `args.splits` partials; returns the cudaError_t of the launch.
template <typename T>
int launch_partials(const WeightGradArgs& args, bool whole_map, cudaStream_t stream) {
  const Geometry& g = args.conv;
  const int64_t channels = args.grad_output.c, rows = args.grad_output.n * args.grad_output.h;
  if (whole_map) {
    namespace wm = tensor_core_whole_map_weight_grad;
    const wm::Tiling t = wm::plan<T>(g.kernel_h, g.kernel_w, args.input.n, args.splits, args.input.h, args.input.w,
                                     args.grad_output.h, args.grad_output.w);
    return launch_opted_in(wm::partials_kernel<T>, channels * args.splits, wm::kThreads, t.shared_bytes,
                           wm::kSharedLimit, stream, args, t);
  }
  if (weight_grad_is_tensor_core(args.dtype, args.allow_tf32, g)) {
    namespace wg = tensor_core_weight_grad;
    const wg::Tiling t = wg::plan(g.kernel_h, g.kernel_w, rows, args.splits);
    const int64_t blocks = channels * args.splits * t.tap_tiles;
    return launch(wg::partials_kernel<T>, blocks, wg::kThreads, wg::Layout<T>::kSharedBytes, stream, args, t);
  }
  namespace dw = direct_weight_grad;
  const int64_t blocks = channels * args.splits;
  if (weight_grad_is_blocked(args.dtype, g)) {
    const dw::BlockedLayout layout = dw::blocked_layout<T>(args);
    return launch(dw::blocked_partials_kernel<T>(layout), blocks, dw::kBlockedThreads, layout.shared_bytes, stream,
                  args, dw::rows_per_split(args), layout);
  }
  return launch(dw::weight_grad_partials<T>, blocks, dw::kThreads, dw::kRowChunkBytes, stream, args,
                dw::rows_per_split(args));
}

}  // namespace

int weight_grad(const WeightGradArgs& args, void* stream) {
  const int64_t channels = args.grad_output.c;
  if (channels == 0) return 0;
  if (args.splits < 1) return static_cast<int>(cudaErrorInvalidValue);
  const int taps = args.conv.kernel_h * args.conv.kernel_w;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(args.dtype, [&]<typename T>() {
    const MapSizes sizes{args.input.n, args.input.h, args.input.w, args.grad_output.h, args.grad_output.w};
    const bool whole_map = weight_grad_is_whole_map(args.dtype, args.allow_tf32, args.conv, sizes);
    // The workspace holds args.splits partials; the Gram-matrix form takes no more splits than it has image chunks,
    // and the reduce reads the ones written.
    WeightGradArgs used = args;
    if (whole_map) used.splits = tensor_core_whole_map_weight_grad::splits_for<T>(args.input.n, args.splits);
    if (const int error = launch_partials<T>(used, whole_map, s); error != 0) return error;
    namespace dw = direct_weight_grad;
    return launch(dw::weight_grad_reduce<T>, cdiv(channels * (taps + 1), dw::kThreads), dw::kThreads, 0, s, used);
  });
}

}  // namespace lkconv
