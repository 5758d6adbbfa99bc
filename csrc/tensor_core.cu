// Launches the tensor-core kernels: the row form (tensor_core.cuh) or the whole-map form (tensor_core_whole_map.cuh),
// the latter where it issues clearly fewer tensor-core multiply-adds for the shape. Picks the rows or images per warp,
// opts in to the shared memory the tiles need, and instantiates both for fp16, bf16 and fp32 (TF32).

#include <algorithm>

#include "launch.cuh"
#include "tensor_core.cuh"
#include "tensor_core_whole_map.cuh"

namespace lkconv {
namespace {

// Multiply-adds the row form issues per image (zeros included): every warp that writes some output multiplies its
// 16 MT x 64 outputs by the kernel rows that reach inside the map, each in its diagonal steps of kK x 64 x kK.
template <typename T>
double row_form_work(int kernel_h, int kernel_w, const UnitStrideSizes& s) {
  const int m_tiles = tensor_core::m_tiles_for<T>(s.dst_h);
  const int64_t warps = cdiv(s.dst_h, 16 * m_tiles) * cdiv(s.dst_w, tensor_core::kWarpCols);
  const int64_t rows = std::min<int64_t>(kernel_h, s.src_h + 16 * m_tiles - 1);
  const int64_t steps = diagonal_steps<T>(kernel_w, 0);
  return static_cast<double>(warps) * 16 * m_tiles * tensor_core::kWarpCols * rows * steps * Operands<T>::kK;
}

// The same for the whole-map form: every padded image row times every padded destination pixel times every
// reduction entry.
double whole_map_work(const tensor_core_whole_map::Tiling& t, int m_tiles, const UnitStrideSizes& s) {
  const double images = static_cast<double>(t.image_tiles * tensor_core_whole_map::block_images(m_tiles)) / s.batch;
  return images * t.pixel_tiles * tensor_core_whole_map::kBlockPixels * t.k_total;
}

// Per mma the whole-map form costs about twice the row form's shared-memory wavefronts (2.25 against 1.2 in the
// sm_90 SASS: each of its B words is a shared load found through a source key) and instructions (5.4 against 2.4),
// so it is taken only where it issues at most half the row form's multiply-adds. A prediction from those counts, to
// calibrate on a GPU (benchmarks/NOTES.md).
constexpr double kWholeMapMaxWorkRatio = 0.5;

template <typename T>
bool prefers_whole_map(int kernel_h, int kernel_w, const UnitStrideSizes& s) {
  // Maps past 8192 pixels never fit the table in shared memory; checked first so its sizes stay small ints.
  constexpr int64_t kMaxPixels = 8192;
  if (s.batch == 0 || s.dst_h * s.dst_w == 0 || s.src_h * s.src_w > kMaxPixels || s.dst_h * s.dst_w > kMaxPixels) {
    return false;
  }
  const int m_tiles = tensor_core_whole_map::m_tiles_for(s.batch);
  const tensor_core_whole_map::Tiling t =
      tensor_core_whole_map::plan<T>(m_tiles, s.batch, 1, s.src_h, s.src_w, s.dst_h, s.dst_w);
  return t.shared_bytes <= tensor_core_whole_map::kSharedLimit &&
         whole_map_work(t, m_tiles, s) <= kWholeMapMaxWorkRatio * row_form_work<T>(kernel_h, kernel_w, s);
}

template <typename T, int MT>
int launch_rows(const UnitStrideArgs& args, cudaStream_t stream) {
  const tensor_core::Tiling t =
      tensor_core::plan<T>(MT, args.kernel_h, args.kernel_w, args.dst.n * args.dst.c, args.dst.h, args.dst.w);
  return launch_opted_in(tensor_core::conv_kernel<T, MT>, t.blocks, tensor_core::kThreads, t.shared_bytes,
                         tensor_core::kSharedLimit, stream, args, t);
}

template <typename T, int MT>
int launch_whole_map(const UnitStrideArgs& args, cudaStream_t stream) {
  const tensor_core_whole_map::Tiling t = tensor_core_whole_map::plan<T>(MT, args.dst.n, args.dst.c, args.src.h,
                                                                         args.src.w, args.dst.h, args.dst.w);
  return launch_opted_in(tensor_core_whole_map::conv_kernel<T, MT>, t.blocks, tensor_core_whole_map::kThreads,
                         t.shared_bytes, tensor_core_whole_map::kSharedLimit, stream, args, t);
}

UnitStrideSizes sizes_of(const UnitStrideArgs& args) {
  return {args.dst.n, args.src.h, args.src.w, args.dst.h, args.dst.w};
}

}  // namespace

bool tensor_core_fits(DType dtype, int kernel_h, int kernel_w) {
  if (kernel_h > 4096 || kernel_w > 4096) return false;
  // Decided on the row form's tallest plan, so the choice does not depend on the map size.
  return dispatch_dtype(dtype, [&]<typename T>() {
    const auto tallest = tensor_core::plan<T>(tensor_core::kMaxMTiles<T>, kernel_h, kernel_w, 1, 1, 1);
    return static_cast<int>(tallest.shared_bytes <= tensor_core::kSharedLimit);
  }) != 0;
}

bool runs_whole_map(DType dtype, int kernel_h, int kernel_w, const UnitStrideSizes& sizes) {
  return dispatch_dtype(dtype, [&]<typename T>() {
    return static_cast<int>(prefers_whole_map<T>(kernel_h, kernel_w, sizes));
  }) != 0;
}

int tensor_core_conv(const UnitStrideArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(args.dtype, [&]<typename T>() {
    if (prefers_whole_map<T>(args.kernel_h, args.kernel_w, sizes_of(args))) {
      return tensor_core_whole_map::m_tiles_for(args.dst.n) == 2 ? launch_whole_map<T, 2>(args, s)
                                                                 : launch_whole_map<T, 1>(args, s);
    }
    if constexpr (tensor_core::kMaxMTiles<T> == 2) {
      if (tensor_core::m_tiles_for<T>(args.dst.h) == 2) return launch_rows<T, 2>(args, s);
    }
    return launch_rows<T, 1>(args, s);
  });
}

}  // namespace lkconv
