// Stride-1, dilation-1 depthwise correlation on tensor cores, fp16/bf16 storage with fp32 accumulation: the row form
// of the block-wise implicit GEMM (ARCHITECTURE.md §4.2). Forward, and input grad as the forward with rotated filters.
//
// Per channel and kernel row r, an output tile is a GEMM against a Toeplitz operand built from the filter on the fly:
//   Y[i, t] += sum_j X[i + r, j] * B_r[j, t],   B_r[j, t] = f[r, j - t]  (zero unless 0 <= j - t < kw).
// A block stages the source tile with its halo, and every filter row as 32-bit pairs P_r[d] = (f[r, d], f[r, d + 1]):
// the B fragment of mma.sync.m16n8k16 holds, per lane, two such pairs, so B is one shared load per register and is
// never materialised. Each of the 4 warps (2 x 2) owns MT x 16 output rows and 32 columns. Per kernel row and
// 16-column k-step it loads MT A fragments with ldmatrix and 5 filter words, and issues up to 4 MT mma; n-tiles whose
// band misses the k-step, k-steps wholly in the padding, and kernel rows whose sources are all padding are skipped.
//
// This header holds the kernel and its tiling plan; tensor_core.cu launches it. The hardware operations come from
// mma_primitives.cuh, which the host emulation in tests/cuda_emulation replaces.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "mma_primitives.cuh"
#include "unit_stride.h"

namespace lkconv {
namespace tensor_core {

constexpr int kWarpCols = 32;                 // output columns per warp: 4 n-tiles of 8
constexpr int kWarpsM = 2, kWarpsN = 2;       // warps per block along rows and columns
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kBlockCols = kWarpCols * kWarpsN;
constexpr int kPairOrigin = 32;               // P_r[d] is stored at index d + 32: fragments reach down to d = -31
constexpr int64_t kSharedLimit = 99 * 1024;   // opt-in dynamic shared memory; sm_80 allows 163 KB per block

// Where a launch's tiles sit in shared memory, and how many blocks cover the output.
struct Tiling {
  int k_steps;          // 16-column k-steps per kernel row: ceil((32 + kw - 1) / 16)
  int tile_rows;        // source rows staged: block rows + kh - 1
  int tile_cols;        // source columns staged: 32 + 16 k_steps (the second warp column starts 32 to the right)
  int tile_pitch;       // elements per staged row: tile_cols + 8, an odd number of 16-byte units (no bank conflicts)
  int pair_pitch;       // 32-bit filter pairs per kernel row: 16 k_steps + 32
  int64_t tiles_h, tiles_w;
  int64_t blocks;
  int64_t shared_bytes;
};

__host__ __device__ constexpr int block_rows(int m_tiles) { return 16 * m_tiles * kWarpsM; }

inline Tiling plan(int m_tiles, int kernel_h, int kernel_w, int64_t planes, int64_t out_h, int64_t out_w) {
  Tiling t{};
  t.k_steps = (kWarpCols + kernel_w - 1 + 15) / 16;
  t.tile_rows = block_rows(m_tiles) + kernel_h - 1;
  t.tile_cols = kWarpCols * (kWarpsN - 1) + 16 * t.k_steps;
  t.tile_pitch = t.tile_cols + 8;
  t.pair_pitch = 16 * t.k_steps + kPairOrigin;
  t.tiles_h = cdiv(out_h, block_rows(m_tiles));
  t.tiles_w = cdiv(out_w, kBlockCols);
  t.blocks = planes * t.tiles_h * t.tiles_w;
  t.shared_bytes = int64_t{2} * t.tile_rows * t.tile_pitch + int64_t{4} * kernel_h * t.pair_pitch;
  return t;
}

// Output rows per warp: 32 once the map is taller than one block of 16-row warps, else 16.
inline int m_tiles_for(int64_t out_h) { return out_h > block_rows(1) ? 2 : 1; }

__device__ __forceinline__ uint16_t raw_bits(const void* data, int64_t index) {
  return static_cast<const uint16_t*>(data)[index];
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) conv_kernel(UnitStrideArgs a, Tiling t) {
  uint16_t* tile = dynamic_shared<uint16_t>();
  uint32_t* pairs = reinterpret_cast<uint32_t*>(tile + int64_t{t.tile_rows} * t.tile_pitch);

  const int64_t per_plane = t.tiles_h * t.tiles_w, block = block_index();
  const int64_t plane = block / per_plane, within = block % per_plane;
  const int64_t row0 = (within / t.tiles_w) * block_rows(MT), col0 = (within % t.tiles_w) * kBlockCols;
  const int64_t n = plane / a.dst.c, d = plane % a.dst.c;
  const int64_t src_row0 = row0 + a.origin_h, src_col0 = col0 + a.origin_w;

  const int tid = thread_index(), lane = tid % 32, warp = tid / 32;
  const int warp_row = (warp / kWarpsN) * 16 * MT, warp_col = (warp % kWarpsN) * kWarpCols;
  const int group = lane / 4, quad = lane % 4;  // mma fragment coordinates: row or column `group`, pair `quad`
  const bool warp_writes = row0 + warp_row < a.dst.h && col0 + warp_col < a.dst.w;

  // Kernel rows whose sources reach inside the map for some row of this warp.
  const int64_t warp_src_row = src_row0 + warp_row;
  const int r_begin = static_cast<int>(warp_src_row + 16 * MT - 1 < 0 ? -(warp_src_row + 16 * MT - 1) : 0);
  const int64_t rows_left = a.src.h - warp_src_row;
  const int r_end = static_cast<int>(rows_left < a.kernel_h ? (rows_left < 0 ? 0 : rows_left) : a.kernel_h);

  float acc[MT][4][4];
  const float bias = a.bias ? to_float(static_cast<const T*>(a.bias)[d]) : 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = bias;

  const int64_t sources = a.flip ? a.multiplier : 1;
  for (int64_t s = 0; s < sources; ++s) {
    const int64_t filter_channel = a.flip ? d * a.multiplier + s : d;
    const int64_t src_channel = a.flip ? filter_channel : d / a.multiplier;
    const int64_t filter_base = filter_channel * a.kernel_h * a.kernel_w;
    block_sync();  // the previous source's tile and filter are no longer read
    // Warps take rows and lanes take columns, so the loops need no division and global reads run along rows.
    for (int r = warp; r < a.kernel_h; r += kThreads / 32) {
      const int rr = a.flip ? a.kernel_h - 1 - r : r;
      for (int e = lane; e < t.pair_pitch; e += 32) {
        uint32_t pair = 0;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int q = e - kPairOrigin + half;
          if (q >= 0 && q < a.kernel_w) {
            const int qq = a.flip ? a.kernel_w - 1 - q : q;
            pair |= uint32_t{raw_bits(a.weight, filter_base + rr * a.kernel_w + qq)} << (16 * half);
          }
        }
        pairs[r * t.pair_pitch + e] = pair;
      }
    }
    for (int row = warp; row < t.tile_rows; row += kThreads / 32) {
      const int64_t y = src_row0 + row;
      const bool row_inside = y >= 0 && y < a.src.h;
      const int64_t row_offset = offset(a.src, n, src_channel, y, 0);
      for (int col = lane; col < t.tile_cols; col += 32) {
        const int64_t x = src_col0 + col;
        const bool inside = row_inside && x >= 0 && x < a.src.w;
        tile[row * t.tile_pitch + col] = inside ? raw_bits(a.src.data, row_offset + x * a.src.stride_w) : 0;
      }
    }
    block_sync();
    if (!warp_writes) continue;

    for (int r = r_begin; r < r_end; ++r) {
      const uint32_t* filter_row = pairs + r * t.pair_pitch + kPairOrigin;
      for (int ks = 0; ks < t.k_steps; ++ks) {
        const int64_t first_col = src_col0 + warp_col + 16 * ks;
        if (first_col + 15 < 0 || first_col >= a.src.w) continue;  // the k-step's sources are all padding
        // B fragments: b0 of n-tile j is P[16 ks - 8 j + 2 quad - group], b1 is the same 8 further, so b1(j) = b0(j-1).
        uint32_t words[5];
#pragma unroll
        for (int v = 0; v < 5; ++v) words[v] = filter_row[16 * ks + 8 - 8 * v + 2 * quad - group];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          uint32_t a_frag[4];
          const int row = warp_row + 16 * m + r + lane % 16, col = warp_col + 16 * ks + (lane / 16) * 8;
          load_matrix_x4(a_frag, tile + int64_t{row} * t.tile_pitch + col);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int band = 16 * ks - 8 * j;  // j - t over this mma spans band - 7 .. band + 15
            if (band + 15 >= 0 && band - 7 < a.kernel_w) mma_16816<T>(acc[m][j], a_frag, words[j + 1], words[j]);
          }
        }
      }
    }
  }
  if (!warp_writes) return;

  T* out = static_cast<T*>(a.dst.data);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t y = row0 + warp_row + 16 * m + group + 8 * (e / 2);
        const int64_t x = col0 + warp_col + 8 * j + 2 * quad + e % 2;
        if (y < a.dst.h && x < a.dst.w) out[offset(a.dst, n, d, y, x)] = from_float<T>(acc[m][j][e]);
      }
    }
  }
}

}  // namespace tensor_core
}  // namespace lkconv
