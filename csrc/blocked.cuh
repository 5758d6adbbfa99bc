// Register-blocked direct conv for stride 1 and dilation 1, the RepLKNet case: forward, and input grad as the
// forward with the filter flipped. Exact fp32 (fp16/bf16 storage too, accumulating in fp32).
//
// A block stages one source tile (plus halo) and the filter in shared memory. Each thread keeps 4 x 8 outputs in
// registers and walks the filter in chunks of 8 columns. Within a chunk it walks source rows rather than kernel rows:
// source row s of the thread's window meets its output row i through kernel row s - i, so each source row is read
// once (4 vector loads of 16 values) for up to 4 x 64 FMAs, with 8 weights (2 broadcast vector loads) per kernel row.
// That is 12 shared loads per 256 FMAs; walking kernel rows instead re-reads each source row for each output row
// (18 loads, 16 of them 2-way bank-conflicted, per 256 FMAs: bound by shared memory at about half the FMA rate).
// The filter is zero-padded to a multiple of 8 columns, so a chunk never needs a tail. Each thread clamps its source
// rows and chunks to those inside the source map, so taps wholly in the padding are not computed.
//
// Where source rows start on 16-byte boundaries (rows_are_vectors), the tile starts `shift` columns early on a
// boundary and is staged in 16-byte vectors (stage_rows); the filter then gets `shift` leading zero columns.
//
// The kernel reaches the hardware only through primitives.cuh, so tests/cuda_emulation runs this source on a CPU.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "primitives.cuh"
#include "staging.cuh"
#include "unit_stride.h"

namespace lkconv {
namespace blocked {

constexpr int kRows = 4;    // output rows per thread
constexpr int kCols = 8;    // output columns per thread
constexpr int kChunk = 8;   // filter columns per register window
static_assert(kChunk == 8, "shifted_filter_columns (staging.cuh) pads filter rows to windows of 8 columns");
constexpr int kSharedLimit = 48 * 1024;

__device__ __forceinline__ int64_t clamp(int64_t value, int64_t low, int64_t high) {
  return value < low ? low : (value > high ? high : value);
}

// Threads (x, y) per block for an output `width` wide: 4 x 8 for narrow maps (a 32 x 32 tile), else 8 x 8.
inline bool narrow(int64_t width) { return width <= 32; }

template <int TX, int TY>
int64_t shared_floats(int kernel_h, int kw_pad) {
  return int64_t{kernel_h} * kw_pad + int64_t{TY * kRows + kernel_h - 1} * (TX * kCols + kw_pad);
}

// A launch: tiles of TY*kRows x TX*kCols outputs, one block of TX*TY threads per (plane, tile). Every tile's first
// source column is origin_w plus a multiple of 8, so one `shift` serves all blocks.
struct Tiling {
  int64_t tiles_h, tiles_w;
  int64_t blocks;
  bool vectors;  // stage the tile in 16-byte vectors
  int shift;     // the tile starts this many columns before the first source column a tile reaches
  int kw_pad;    // filter columns in shared memory: `shift` zeros, the filter, zeros to a whole chunk
  int64_t shared_bytes;
};

template <typename T, int TX, int TY>
Tiling plan(const UnitStrideArgs& a) {
  Tiling t{};
  t.tiles_h = cdiv(a.dst.h, TY * kRows);
  t.tiles_w = cdiv(a.dst.w, TX * kCols);
  t.blocks = a.dst.n * a.dst.c * t.tiles_h * t.tiles_w;
  t.vectors = rows_are_vectors<T>(a.src);
  t.shift = vector_shift<T>(a.origin_w, t.vectors);
  t.kw_pad = shifted_filter_columns(a.kernel_w, t.shift);
  t.shared_bytes = static_cast<int64_t>(sizeof(float)) * shared_floats<TX, TY>(a.kernel_h, t.kw_pad);
  return t;
}

// acc[j] += sum_q w[q] window[j + q] over one chunk of 8 filter columns (`weights`, 32-byte aligned).
__device__ __forceinline__ void accumulate_chunk(float (&acc)[kCols], const float (&window)[kCols + kChunk],
                                                 const float* weights) {
  const float4 low = reinterpret_cast<const float4*>(weights)[0], high = reinterpret_cast<const float4*>(weights)[1];
  const float w[kChunk] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
#pragma unroll
  for (int q = 0; q < kChunk; ++q)
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[j] = fmaf(w[q], window[j + q], acc[j]);
}

// dst[n, d, y, x] = bias + sum_s sum_{r,q} src[n, channel(s), y + origin_h + r, x + origin_w + q] * filter_s[r, q],
// where for the forward s is the single source channel d / m with filter d, and for the input grad (flip) s runs
// over the m output channels d*m + j with their filters rotated by 180 degrees.
// Eight blocks per SM, about what the tiles' shared memory allows at K=31, let ptxas give each thread up to 128
// registers: the 32 accumulators, the 16-value window and the 8 weights then stay in registers without spilling.
template <typename T, int TX, int TY>
__global__ void __launch_bounds__(TX * TY, 8) conv_kernel(UnitStrideArgs a, Tiling t) {
  constexpr int kTileH = TY * kRows, kTileW = TX * kCols;
  float* const shared = dynamic_shared<float>();
  const int kw_pad = t.kw_pad;
  const int tile_w = kTileW + kw_pad;
  float* filter = shared;
  float* tile = shared + a.kernel_h * kw_pad;

  const int64_t block = block_index(), per_plane = t.tiles_h * t.tiles_w;
  const int64_t plane = block / per_plane, within = block % per_plane;
  const int64_t row0 = (within / t.tiles_w) * kTileH, col0 = (within % t.tiles_w) * kTileW;
  const int64_t n = plane / a.dst.c, d = plane % a.dst.c;
  const int64_t src_row0 = row0 + a.origin_h, tile_col0 = col0 + a.origin_w - t.shift;
  const int tid = thread_index();
  const int thread_row = tid / TX * kRows, thread_col = tid % TX * kCols;

  // The thread's window: source rows first_row + s for s < kernel_h + kRows - 1, and the columns of its chunks; only
  // those inside the source map are walked.
  const int rows_reached = a.kernel_h + kRows - 1;
  const int64_t first_row = src_row0 + thread_row, first_col = tile_col0 + thread_col;
  const int s_begin = static_cast<int>(clamp(-first_row, 0, rows_reached));
  const int s_end = static_cast<int>(clamp(a.src.h - first_row, 0, rows_reached));
  const int q_begin = static_cast<int>(clamp(-(first_col + kCols - 1), 0, kw_pad)) / kChunk * kChunk;
  const int q_end = static_cast<int>(clamp(a.src.w - first_col, 0, kw_pad));

  float acc[kRows][kCols];
  const float bias = a.bias ? to_float(static_cast<const T*>(a.bias)[d]) : 0.f;
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[i][j] = bias;

  const int64_t sources = a.flip ? a.multiplier : 1;
  for (int64_t source = 0; source < sources; ++source) {
    const int64_t filter_channel = a.flip ? d * a.multiplier + source : d;
    const int64_t src_channel = a.flip ? filter_channel : d / a.multiplier;
    const T* weight = static_cast<const T*>(a.weight) + filter_channel * a.kernel_h * a.kernel_w;
    block_sync();  // the previous source's tile and filter are no longer read
    for (int i = tid; i < a.kernel_h * kw_pad; i += TX * TY) {
      const int r = i / kw_pad, q = i % kw_pad - t.shift;
      const int rr = a.flip ? a.kernel_h - 1 - r : r, qq = a.flip ? a.kernel_w - 1 - q : q;
      filter[i] = q >= 0 && q < a.kernel_w ? to_float(weight[rr * a.kernel_w + qq]) : 0.f;
    }
    stage_rows<FloatTile<T>, TX * TY / 32>(tile, tile_w, kTileH + a.kernel_h - 1, tile_w, a.src, n, src_channel,
                                          src_row0, tile_col0, t.vectors, tid / 32, tid % 32);
    block_sync();

    for (int q0 = q_begin; q0 < q_end; q0 += kChunk) {
      // Source row s of the window, and kernel row s (what output row 0 meets there) of the chunk's filter columns.
      const float* source_row = tile + (thread_row + s_begin) * tile_w + thread_col + q0;
      const float* weights = filter + s_begin * kw_pad + q0;
#pragma unroll 2
      for (int s = s_begin; s < s_end; ++s, source_row += tile_w, weights += kw_pad) {
        float window[kCols + kChunk];
#pragma unroll
        for (int v = 0; v < (kCols + kChunk) / 4; ++v) {
          const float4 value = reinterpret_cast<const float4*>(source_row)[v];
          window[4 * v] = value.x;
          window[4 * v + 1] = value.y;
          window[4 * v + 2] = value.z;
          window[4 * v + 3] = value.w;
        }
        if (s >= kRows - 1 && s < a.kernel_h) {  // every output row meets a kernel row: no tests
#pragma unroll
          for (int i = 0; i < kRows; ++i) accumulate_chunk(acc[i], window, weights - i * kw_pad);
        } else {
#pragma unroll
          for (int i = 0; i < kRows; ++i) {
            if (s - i >= 0 && s - i < a.kernel_h) accumulate_chunk(acc[i], window, weights - i * kw_pad);
          }
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
