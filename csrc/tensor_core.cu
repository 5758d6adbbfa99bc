// Launches the tensor-core kernel of tensor_core.cuh: picks the rows per warp from the map height, opts in to the
// shared memory the tiles need, and instantiates the kernel for fp16, bf16 and fp32 (TF32).

#include "tensor_core.cuh"

namespace lkconv {
namespace {

template <typename T, int MT>
int launch(const UnitStrideArgs& args, cudaStream_t stream) {
  const tensor_core::Tiling t =
      tensor_core::plan<T>(MT, args.kernel_h, args.kernel_w, args.dst.n * args.dst.c, args.dst.h, args.dst.w);
  const auto kernel = tensor_core::conv_kernel<T, MT>;
  // Set on every launch: the attribute belongs to the current device, and a process may use several.
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(t.shared_bytes));
  if (status != cudaSuccess) return static_cast<int>(status);
  kernel<<<t.blocks, tensor_core::kThreads, t.shared_bytes, stream>>>(args, t);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

bool tensor_core_fits(DType dtype, int kernel_h, int kernel_w) {
  if (kernel_h > 4096 || kernel_w > 4096) return false;
  // Decided on the taller (two m-tile) plan, so the choice does not depend on the map size.
  return dispatch_dtype(dtype, [&]<typename T>() {
    return static_cast<int>(tensor_core::plan<T>(2, kernel_h, kernel_w, 1, 1, 1).shared_bytes <=
                            tensor_core::kSharedLimit);
  }) != 0;
}

int tensor_core_conv(const UnitStrideArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(args.dtype, [&]<typename T>() {
    return tensor_core::m_tiles_for(args.dst.h) == 2 ? launch<T, 2>(args, s) : launch<T, 1>(args, s);
  });
}

}  // namespace lkconv
