// Launches the register-blocked stride-1, dilation-1 conv (blocked.cuh): 4 x 8 threads for maps up to 32 wide,
// 8 x 8 otherwise, in fp32, fp16 and bf16.

#include "blocked.cuh"
#include "launch.cuh"

namespace lkconv {
namespace {

template <int TX, int TY>
int launch(const UnitStrideArgs& args, cudaStream_t stream) {
  return dispatch_dtype(args.dtype, [&]<typename T>() {
    const blocked::Tiling t = blocked::plan<T, TX, TY>(args);
    return launch(blocked::conv_kernel<T, TX, TY>, t.blocks, TX * TY, t.shared_bytes, stream, args, t);
  });
}

}  // namespace

bool blocked_fits(DType dtype, int kernel_h, int kernel_w) {
  // The wider (8 x 8 threads) tile with the dtype's largest shift is the largest; deciding on it keeps the choice
  // independent of the map width and of the source's alignment.
  if (kernel_h > 4096 || kernel_w > 4096) return false;
  return dispatch_dtype(dtype, [&]<typename T>() {
    const int widest = shifted_filter_columns(kernel_w, kVectorElements<T> - 1);
    return static_cast<int>(blocked::shared_floats<8, 8>(kernel_h, widest) * static_cast<int64_t>(sizeof(float)) <=
                            blocked::kSharedLimit);
  }) != 0;
}

int blocked_conv(const UnitStrideArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return blocked::narrow(args.dst.w) ? launch<4, 8>(args, s) : launch<8, 8>(args, s);
}

}  // namespace lkconv
