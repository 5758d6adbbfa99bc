// Staging a block's source tile from global into shared memory, in 16-byte vectors where the source rows allow: the
// tensor-core kernels (tensor_core.cuh, tensor_core_weight_grad.cuh) and the CUDA-core kernels (blocked.cuh,
// direct_weight_grad.cuh) share it. What a tile holds (raw 16-bit elements, TF32-rounded or fp32 values) is the
// caller's staging policy:
//   Element                                        the tile's element type;
//   kVector                                        storage elements per 16-byte global load (kVectorElements<T>);
//   stage(data, index)                             one element, as the tile holds it;
//   stage_vector(data, index, out)                 elements index .. index + kVector - 1 (16-byte aligned) into out.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace lkconv {

template <typename T>
inline constexpr int kVectorElements = 16 / static_cast<int>(sizeof(T));

// The staging policy of the CUDA-core kernels (blocked.cuh, direct_weight_grad.cuh): tiles of fp32 values, whatever
// the storage type.
template <typename T>
struct FloatTile {
  using Element = float;
  static constexpr int kVector = kVectorElements<T>;
  __device__ __forceinline__ static float stage(const void* data, int64_t index) {
    return to_float(static_cast<const T*>(data)[index]);
  }
  __device__ __forceinline__ static void stage_vector(const void* data, int64_t index, float* out) {
    alignas(16) T values[kVector];
    *reinterpret_cast<uint4*>(values) = *reinterpret_cast<const uint4*>(static_cast<const T*>(data) + index);
#pragma unroll
    for (int v = 0; v < kVector / 4; ++v) {
      reinterpret_cast<float4*>(out)[v] = make_float4(to_float(values[4 * v]), to_float(values[4 * v + 1]),
                                                      to_float(values[4 * v + 2]), to_float(values[4 * v + 3]));
    }
  }
};

// Whether every row of `m` starts on a 16-byte boundary and runs contiguously, so that runs of kVectorElements<T>
// columns starting at a multiple of it load as single 16-byte vectors.
template <typename T>
__host__ __device__ inline bool rows_are_vectors(const Map& m) {
  constexpr int64_t v = kVectorElements<T>;
  return m.stride_w == 1 && m.stride_h % v == 0 && m.stride_c % v == 0 && m.stride_n % v == 0 &&
         reinterpret_cast<uintptr_t>(m.data) % 16 == 0;
}

// The column `shift` (0 .. kVectorElements<T> - 1) that moves `first_col` back to a multiple of the vector where
// rows_are_vectors, else 0: a tile staged from first_col - shift loads whole vectors.
template <typename T>
__host__ __device__ inline int vector_shift(int64_t first_col, bool vectors) {
  constexpr int64_t v = kVectorElements<T>;
  return vectors ? static_cast<int>(((first_col % v) + v) % v) : 0;
}

// The filter (or tap) columns of a row once `shift` leading zeros align it with a tile staged `shift` columns early,
// padded to whole windows of 8 columns, the CUDA-core kernels' register windows.
__host__ __device__ inline int shifted_filter_columns(int kernel_w, int shift) {
  return (shift + kernel_w + 7) / 8 * 8;
}

// Rows row0 .. row0 + rows - 1 and columns col0 .. col0 + cols - 1 of channel `channel` of image n of `src` into a
// shared tile (`pitch` elements a row), zero outside the map; a block of kWarps warps. With `vectors`
// (rows_are_vectors, col0 and cols multiples of kVector, the tile's rows 16-byte aligned) lanes take 16-byte vectors,
// several rows per warp where a row has few, and vectors that leave the map go element by element. Otherwise warps
// take rows and lanes take elements, so global reads run along rows.
template <typename Staging, int kWarps>
__device__ __forceinline__ void stage_rows(typename Staging::Element* tile, int pitch, int rows, int cols,
                                           const Map& src, int64_t n, int64_t channel, int64_t row0, int64_t col0,
                                           bool vectors, int warp, int lane) {
  constexpr int kVector = Staging::kVector;
  if (vectors) {
    const int per_row = cols / kVector;
    int lanes_per_row = 32;
    while (lanes_per_row / 2 >= per_row) lanes_per_row /= 2;
    const int rows_per_warp = 32 / lanes_per_row;
    for (int row = warp * rows_per_warp + lane / lanes_per_row; row < rows; row += kWarps * rows_per_warp) {
      const int64_t y = row0 + row;
      const bool row_inside = y >= 0 && y < src.h;
      const int64_t row_offset = offset(src, n, channel, y, 0);
      for (int col = kVector * (lane % lanes_per_row); col < cols; col += kVector * lanes_per_row) {
        const int64_t x = col0 + col;
        typename Staging::Element* out = tile + row * pitch + col;
        if (row_inside && x >= 0 && x + kVector <= src.w) {
          Staging::stage_vector(src.data, row_offset + x, out);
          continue;
        }
        for (int e = 0; e < kVector; ++e) {
          out[e] = row_inside && x + e >= 0 && x + e < src.w ? Staging::stage(src.data, row_offset + x + e) : 0;
        }
      }
    }
    return;
  }
  for (int row = warp; row < rows; row += kWarps) {
    const int64_t y = row0 + row;
    const bool row_inside = y >= 0 && y < src.h;
    const int64_t row_offset = offset(src, n, channel, y, 0);
    for (int col = lane; col < cols; col += 32) {
      const int64_t x = col0 + col;
      const bool inside = row_inside && x >= 0 && x < src.w;
      tile[row * pitch + col] = inside ? Staging::stage(src.data, row_offset + x * src.stride_w) : 0;
    }
  }
}

}  // namespace lkconv
