// How each storage type feeds mma.sync in the tensor-core kernels (tensor_core.cuh, tensor_core_whole_map.cuh,
// tensor_core_weight_grad.cuh):
//   fp16/bf16: m16n8k16; shared tiles of raw 16-bit elements; a B register holds two adjacent Toeplitz entries.
//   fp32 (TF32, only where PyTorch's conv TF32 setting allows it): m16n8k8; tiles of TF32-rounded 32-bit elements;
//   a B register holds one entry.
// Either way ldmatrix .x4 loads A: an "8x8 b16" matrix is 8 rows of 16 bytes, i.e. 8 x 8 halves or 8 x 4 floats, and
// the fragment each lane receives is the A fragment of the matching mma shape.
// Also here: the fragment loaders, the staging policy for stage_rows (staging.cuh), and the channel, filter-row and
// accumulator helpers both conv forms share.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "primitives.cuh"
#include "staging.cuh"
#include "unit_stride.h"

namespace lkconv {

template <typename T>
struct Operands {  // fp16 and bf16
  using Element = uint16_t;
  static constexpr int kK = 16;                        // reduction columns per mma
  static constexpr int kPitchPad = 16 / sizeof(Element);  // 16 bytes: tile rows an odd number of 16-byte units apart

  static constexpr int kVector = kVectorElements<T>;   // elements per 16-byte global load (stage_rows)
  __device__ __forceinline__ static Element stage(const void* data, int64_t index) {
    return static_cast<const uint16_t*>(data)[index];
  }
  // Elements index .. index + 7 (16-byte aligned) into `out` (16-byte aligned shared memory).
  __device__ __forceinline__ static void stage_vector(const void* data, int64_t index, Element* out) {
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(data) + index);
  }
  // The B table entry at d: elements d and d + 1 of a row, `element(i)` giving the staged bits or 0 outside it.
  template <typename ElementAt>
  __device__ __forceinline__ static uint32_t word(int d, ElementAt&& element) {
    return uint32_t{element(d)} | (uint32_t{element(d + 1)} << 16);
  }
};

template <>
struct Operands<float> {  // TF32
  using Element = uint32_t;
  static constexpr int kK = 8;
  static constexpr int kPitchPad = 16 / sizeof(Element);

  static constexpr int kVector = kVectorElements<float>;
  __device__ __forceinline__ static Element stage(const void* data, int64_t index) {
    return to_tf32(static_cast<const float*>(data)[index]);
  }
  __device__ __forceinline__ static void stage_vector(const void* data, int64_t index, Element* out) {
    const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(data) + index);
    *reinterpret_cast<uint4*>(out) = make_uint4(to_tf32(v.x), to_tf32(v.y), to_tf32(v.z), to_tf32(v.w));
  }
  template <typename ElementAt>
  __device__ __forceinline__ static uint32_t word(int d, ElementAt&& element) {
    return element(d);
  }
};

// The B registers of k-step u + i for n-tile G i + h (h < G = kK / 8 n-tiles per k-step width), which depend on u and
// h only: along a diagonal of (k-step, n-tile) pairs the Toeplitz operand repeats. For lane (group, quad), b0[h] holds
// entry kK u - 8 h + G quad - group of the table row (`row` points at entry 0) and b1[h] the entry kK / 2 further; for
// 16-bit types b1[1] is b0[0], so a diagonal step reads 3 words for all n-tiles.
template <typename T>
__device__ __forceinline__ void load_diagonal_b_fragments(const uint32_t* row, int u, int lane,
                                                          uint32_t (&b0)[Operands<T>::kK / 8],
                                                          uint32_t (&b1)[Operands<T>::kK / 8]) {
  constexpr int kK = Operands<T>::kK, kG = kK / 8;
  const int first = kK * u + kG * (lane % 4) - lane / 4;
#pragma unroll
  for (int h = 0; h < kG; ++h) {
    b0[h] = row[first - 8 * h];
    b1[h] = row[first - 8 * h + kK / 2];
  }
}

// Diagonal steps (as load_diagonal_b_fragments numbers them) whose band meets a Toeplitz operand `band` entries wide
// (the taps, or a weight-grad chunk's dy columns) when the staged tile starts `shift` columns early (tile column
// j, output column t and entry d are then related by j = t + d + shift).
template <typename T>
__host__ __device__ constexpr int diagonal_steps(int band, int shift) {
  return (band + shift + 2 * Operands<T>::kK - 2) / Operands<T>::kK;
}

// The A fragment (16 rows x kK columns) whose top-left element is tile[first_row * pitch + first_col].
template <typename T>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const typename Operands<T>::Element* tile,
                                                int64_t pitch, int first_row, int first_col, int lane) {
  constexpr int kK = Operands<T>::kK;
  load_matrix_x4(a, tile + (first_row + lane % 16) * pitch + first_col + (lane / 16) * (kK / 2));
}

// The two forms of the stride-1 conv (tensor_core.cuh, tensor_core_whole_map.cuh) share what follows.

// What destination channel d reads for its s-th source: the forward reads filter d on input channel d / m; the input
// grad (flip) reads each of its m output channels d m + s with that channel's filter.
struct ChannelSource {
  int64_t channel;      // in the source map
  int64_t filter_base;  // first tap of the filter in the weight
};

__device__ __forceinline__ ChannelSource channel_source(const UnitStrideArgs& a, int64_t d, int64_t s) {
  const int64_t filter_channel = a.flip ? d * a.multiplier + s : d;
  return {a.flip ? filter_channel : d / a.multiplier, filter_channel * a.kernel_h * a.kernel_w};
}

// Words q_first .. q_first + count - 1 of filter row r as B table words (`Operands<T>::word`), the filter
// rotated for the input grad; taps outside the filter, and rows outside it, are zero. The lanes of a warp share them.
template <typename T>
__device__ __forceinline__ void stage_filter_row(uint32_t* words, const UnitStrideArgs& a, int64_t filter_base,
                                                 int64_t r, int64_t q_first, int count, int lane) {
  using Ops = Operands<T>;
  const bool row_inside = r >= 0 && r < a.kernel_h;
  const int64_t row_base = filter_base + (a.flip ? a.kernel_h - 1 - r : r) * a.kernel_w;
  const auto tap = [&](int64_t q) -> typename Ops::Element {
    if (!row_inside || q < 0 || q >= a.kernel_w) return 0;
    return Ops::stage(a.weight, row_base + (a.flip ? a.kernel_w - 1 - q : q));
  };
  for (int e = lane; e < count; e += 32) words[e] = Ops::word(static_cast<int>(q_first + e), tap);
}

// Every accumulator of a warp's MT x NT mma tiles set to `value` (the bias, or 0).
template <int MT, int NT>
__device__ __forceinline__ void fill_accumulators(float (&acc)[MT][NT][4], float value) {
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = value;
}

// A warp's MT x NT mma accumulator tiles (16 MT rows x 8 NT columns) written to a row-major fp32 matrix in shared
// memory, `pitch` floats a row, from (first_row, first_col).
template <int MT, int NT>
__device__ __forceinline__ void store_accumulators(float* matrix, int pitch, int first_row, int first_col,
                                                   const float (&acc)[MT][NT][4], int lane) {
  const int group = lane / 4, quad = lane % 4;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = first_row + 16 * m + group + 8 * (e / 2), col = first_col + 8 * j + 2 * quad + e % 2;
        matrix[row * pitch + col] = acc[m][j][e];
      }
}

}  // namespace lkconv
