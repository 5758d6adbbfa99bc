// Register-blocked direct conv for stride 1 and dilation 1, the RepLKNet case: forward, and input grad as the
// forward with the filter flipped. Exact fp32 (fp16/bf16 storage too, accumulating in fp32).
//
// A block stages one source tile (plus halo) and the filter in shared memory. Each thread keeps 4 x 8 outputs in
// registers and walks the filter in chunks of 8 columns: per kernel row and chunk it loads a 4 x 16 window of
// sources (16 vector loads) and 8 weights, then does 256 FMAs from registers, about 0.1 shared loads per FMA. The
// filter is zero-padded to a multiple of 8 columns, so a chunk never needs a tail. Each thread clamps its kernel
// rows and chunks to those that reach inside the source map, so taps wholly in the padding are not computed.
//
// The kernel reaches the hardware only through primitives.cuh, so tests/cuda_emulation runs this source on a CPU.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "primitives.cuh"
#include "unit_stride.h"

namespace lkconv {
namespace blocked {

constexpr int kRows = 4;    // output rows per thread
constexpr int kCols = 8;    // output columns per thread
constexpr int kChunk = 8;   // filter columns per register window
constexpr int kSharedLimit = 48 * 1024;

__host__ __device__ inline int padded_kernel_w(int kernel_w) { return (kernel_w + kChunk - 1) / kChunk * kChunk; }

__device__ __forceinline__ int64_t clamp(int64_t value, int64_t low, int64_t high) {
  return value < low ? low : (value > high ? high : value);
}

// Threads (x, y) per block for an output `width` wide: 4 x 8 for narrow maps (a 32 x 32 tile), else 8 x 8.
inline bool narrow(int64_t width) { return width <= 32; }

template <int TX, int TY>
int64_t shared_floats(int kernel_h, int kernel_w) {
  const int64_t kw_pad = padded_kernel_w(kernel_w);
  return kernel_h * kw_pad + (TY * kRows + kernel_h - 1) * (TX * kCols + kw_pad);
}

// A launch: tiles of TY*kRows x TX*kCols outputs, one block of TX*TY threads per (plane, tile).
struct Tiling {
  int64_t tiles_h, tiles_w;
  int64_t blocks;
  int64_t shared_bytes;
};

template <int TX, int TY>
Tiling plan(const UnitStrideArgs& a) {
  const int64_t tiles_h = cdiv(a.dst.h, TY * kRows), tiles_w = cdiv(a.dst.w, TX * kCols);
  return {tiles_h, tiles_w, a.dst.n * a.dst.c * tiles_h * tiles_w,
          static_cast<int64_t>(sizeof(float)) * shared_floats<TX, TY>(a.kernel_h, a.kernel_w)};
}

// dst[n, d, y, x] = bias + sum_s sum_{r,q} src[n, channel(s), y + origin_h + r, x + origin_w + q] * filter_s[r, q],
// where for the forward s is the single source channel d / m with filter d, and for the input grad (flip) s runs
// over the m output channels d*m + j with their filters rotated by 180 degrees.
// Eight blocks per SM, about what the tiles' shared memory allows at K=31, let ptxas give each thread up to 128
// registers: the 32 accumulators and the 64-value window then stay in registers without spilling.
template <typename T, int TX, int TY>
__global__ void __launch_bounds__(TX * TY, 8) conv_kernel(UnitStrideArgs a, Tiling t) {
  constexpr int kTileH = TY * kRows, kTileW = TX * kCols;
  float* const shared = dynamic_shared<float>();
  const int kw_pad = padded_kernel_w(a.kernel_w);
  const int tile_w = kTileW + kw_pad;
  float* filter = shared;
  float* tile = shared + a.kernel_h * kw_pad;

  const int64_t block = block_index(), per_plane = t.tiles_h * t.tiles_w;
  const int64_t plane = block / per_plane, within = block % per_plane;
  const int64_t row0 = (within / t.tiles_w) * kTileH, col0 = (within % t.tiles_w) * kTileW;
  const int64_t n = plane / a.dst.c, d = plane % a.dst.c;
  const int64_t src_row0 = row0 + a.origin_h, src_col0 = col0 + a.origin_w;
  const int tid = thread_index();
  const int thread_row = tid / TX * kRows, thread_col = tid % TX * kCols;

  // The kernel rows and filter chunks whose sources reach inside the map for at least one of this thread's outputs.
  const int64_t first_row = src_row0 + thread_row, first_col = src_col0 + thread_col;
  const int r_begin = static_cast<int>(clamp(-(first_row + kRows - 1), 0, a.kernel_h));
  const int r_end = static_cast<int>(clamp(a.src.h - first_row, 0, a.kernel_h));
  const int q_begin = static_cast<int>(clamp(-(first_col + kCols - 1), 0, kw_pad)) / kChunk * kChunk;
  const int q_end = static_cast<int>(clamp(a.src.w - first_col, 0, kw_pad));

  float acc[kRows][kCols];
  const float bias = a.bias ? to_float(static_cast<const T*>(a.bias)[d]) : 0.f;
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[i][j] = bias;

  const int64_t sources = a.flip ? a.multiplier : 1;
  for (int64_t s = 0; s < sources; ++s) {
    const int64_t filter_channel = a.flip ? d * a.multiplier + s : d;
    const int64_t src_channel = a.flip ? filter_channel : d / a.multiplier;
    const T* weight = static_cast<const T*>(a.weight) + filter_channel * a.kernel_h * a.kernel_w;
    block_sync();  // the previous source's tile and filter are no longer read
    for (int i = tid; i < a.kernel_h * kw_pad; i += TX * TY) {
      const int r = i / kw_pad, q = i % kw_pad;
      const int rr = a.flip ? a.kernel_h - 1 - r : r, qq = a.flip ? a.kernel_w - 1 - q : q;
      filter[i] = q < a.kernel_w ? to_float(weight[rr * a.kernel_w + qq]) : 0.f;
    }
    const int tile_h = kTileH + a.kernel_h - 1;
    for (int i = tid; i < tile_h * tile_w; i += TX * TY) {
      tile[i] = load_or_zero<T>(a.src, n, src_channel, src_row0 + i / tile_w, src_col0 + i % tile_w);
    }
    block_sync();

    for (int r = r_begin; r < r_end; ++r) {
      for (int q0 = q_begin; q0 < q_end; q0 += kChunk) {
        float window[kRows][kCols + kChunk];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const float* row = tile + (thread_row + i + r) * tile_w + thread_col + q0;
          const float4* source = reinterpret_cast<const float4*>(row);
#pragma unroll
          for (int v = 0; v < (kCols + kChunk) / 4; ++v) {
            const float4 value = source[v];
            window[i][4 * v] = value.x;
            window[i][4 * v + 1] = value.y;
            window[i][4 * v + 2] = value.z;
            window[i][4 * v + 3] = value.w;
          }
        }
#pragma unroll
        for (int q = 0; q < kChunk; ++q) {
          const float w = filter[r * kw_pad + q0 + q];
#pragma unroll
          for (int i = 0; i < kRows; ++i)
#pragma unroll
            for (int j = 0; j < kCols; ++j) acc[i][j] = fmaf(w, window[i][j + q], acc[i][j]);
        }
      }
    }
  }

  T* out = static_cast<T*>(a.dst.data);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t y = row0 + thread_row + i;
    if (y >= a.dst.h) break;
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t x = col0 + thread_col + j;
      if (x < a.dst.w) out[offset(a.dst, n, d, y, x)] = from_float<T>(acc[i][j]);
    }
  }
}

}  // namespace blocked
}  // namespace lkconv
