// Stride-1, dilation-1 depthwise correlation on tensor cores with fp32 accumulation: the row form of the block-wise
// implicit GEMM (ARCHITECTURE.md §4.2), for fp16/bf16 and, where PyTorch allows TF32 for convs, fp32. Forward, and
// input grad as the forward with rotated filters.
//
// Per channel and kernel row r, an output tile is a GEMM against a Toeplitz operand built from the filter on the fly:
//   Y[i, t] += sum_j X[i + r, j] * B_r[j, t],   B_r[j, t] = f[r, j - t]  (zero unless 0 <= j - t < kw).
// A block stages the source tile with its halo, and every filter row as a table of 32-bit words indexed by d = j - t
// (tensor_core_operands.cuh: pairs (f[r, d], f[r, d + 1]) for 16-bit types, single TF32 taps for fp32), so every B
// register is one shared load and B is never materialised. Each of the 4 warps (2 x 2) owns MT x 16 output rows and
// 32 columns. Per kernel row and k-step it loads MT A fragments with ldmatrix and the B words of 4 n-tiles, and issues
// up to 4 MT mma; n-tiles whose band misses the k-step, k-steps wholly in the padding, and kernel rows whose sources
// are all padding are skipped.
//
// This header holds the kernel and its tiling plan; tensor_core.cu launches it. The hardware operations come from
// primitives.cuh, which the host emulation in tests/cuda_emulation replaces.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "tensor_core_operands.cuh"
#include "unit_stride.h"

namespace lkconv {
namespace tensor_core {

constexpr int kWarpCols = 32;                 // output columns per warp: 4 n-tiles of 8
constexpr int kWarpsM = 2, kWarpsN = 2;       // warps per block along rows and columns
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kBlockCols = kWarpCols * kWarpsN;
constexpr int kTableOrigin = 32;              // the entry for d is stored at d + 32: fragments reach down to d = -31
constexpr int64_t kSharedLimit = 99 * 1024;   // opt-in dynamic shared memory; sm_80 allows 163 KB per block
// Blocks per SM the kernel is compiled for: 4 (16 warps) leaves it up to 128 registers a thread. Without it ptxas
// aimed at more blocks and spilled (12-40 bytes) at 64-80 registers.
constexpr int kMinBlocksPerSM = 4;

// Where a launch's tiles sit in shared memory, and how many blocks cover the output.
struct Tiling {
  int k_steps;          // kK-column k-steps per kernel row: ceil((32 + kw - 1) / kK)
  int tile_rows;        // source rows staged: block rows + kh - 1
  int tile_cols;        // source columns staged: 32 + kK k_steps (the second warp column starts 32 to the right)
  int tile_pitch;       // elements per staged row: tile_cols + 16 bytes, an odd number of 16-byte units
  int table_pitch;      // 32-bit B words per kernel row: kK k_steps + 32
  int64_t tiles_h, tiles_w;
  int64_t blocks;
  int64_t shared_bytes;
};

__host__ __device__ constexpr int block_rows(int m_tiles) { return 16 * m_tiles * kWarpsM; }

template <typename T>
Tiling plan(int m_tiles, int kernel_h, int kernel_w, int64_t planes, int64_t out_h, int64_t out_w) {
  using Ops = Operands<T>;
  Tiling t{};
  t.k_steps = (kWarpCols + kernel_w - 1 + Ops::kK - 1) / Ops::kK;
  t.tile_rows = block_rows(m_tiles) + kernel_h - 1;
  t.tile_cols = kWarpCols * (kWarpsN - 1) + Ops::kK * t.k_steps;
  t.tile_pitch = t.tile_cols + Ops::kPitchPad;
  t.table_pitch = Ops::kK * t.k_steps + kTableOrigin;
  t.tiles_h = cdiv(out_h, block_rows(m_tiles));
  t.tiles_w = cdiv(out_w, kBlockCols);
  t.blocks = planes * t.tiles_h * t.tiles_w;
  t.shared_bytes = int64_t{sizeof(typename Ops::Element)} * t.tile_rows * t.tile_pitch +
                   int64_t{4} * kernel_h * t.table_pitch;
  return t;
}

// Output rows per warp: 32 once the map is taller than one block of 16-row warps, else 16.
inline int m_tiles_for(int64_t out_h) { return out_h > block_rows(1) ? 2 : 1; }

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) conv_kernel(UnitStrideArgs a, Tiling t) {
  using Ops = Operands<T>;
  using Element = typename Ops::Element;
  constexpr int kK = Ops::kK;
  Element* tile = dynamic_shared<Element>();
  uint32_t* table = reinterpret_cast<uint32_t*>(tile + int64_t{t.tile_rows} * t.tile_pitch);

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
  fill_accumulators<MT>(acc, a.bias ? to_float(static_cast<const T*>(a.bias)[d]) : 0.f);

  const int64_t sources = a.flip ? a.multiplier : 1;
  for (int64_t s = 0; s < sources; ++s) {
    const ChannelSource source = channel_source(a, d, s);
    block_sync();  // the previous source's tile and filter are no longer read
    // Warps take rows and lanes take columns, so the loops need no division and global reads run along rows.
    for (int r = warp; r < a.kernel_h; r += kThreads / 32) {
      stage_filter_row<T>(table + r * t.table_pitch, a, source.filter_base, r, -kTableOrigin, t.table_pitch, lane);
    }
    for (int row = warp; row < t.tile_rows; row += kThreads / 32) {
      const int64_t y = src_row0 + row;
      const bool row_inside = y >= 0 && y < a.src.h;
      const int64_t row_offset = offset(a.src, n, source.channel, y, 0);
      for (int col = lane; col < t.tile_cols; col += 32) {
        const int64_t x = src_col0 + col;
        const bool inside = row_inside && x >= 0 && x < a.src.w;
        tile[row * t.tile_pitch + col] = inside ? Ops::stage(a.src.data, row_offset + x * a.src.stride_w) : 0;
      }
    }
    block_sync();
    if (!warp_writes) continue;

    for (int r = r_begin; r < r_end; ++r) {
      const uint32_t* filter_row = table + r * t.table_pitch + kTableOrigin;
      for (int ks = 0; ks < t.k_steps; ++ks) {
        const int64_t first_col = src_col0 + warp_col + kK * ks;
        if (first_col + kK - 1 < 0 || first_col >= a.src.w) continue;  // the k-step's sources are all padding
        uint32_t b0[4], b1[4];
        load_b_fragments<T>(filter_row, ks, lane, b0, b1);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          uint32_t a_frag[4];
          load_a_fragment<T>(a_frag, tile, t.tile_pitch, warp_row + 16 * m + r, warp_col + kK * ks, lane);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int band = kK * ks - 8 * j;  // j - t over this mma spans band - 7 .. band + kK - 1
            if (band + kK - 1 >= 0 && band - 7 < a.kernel_w) mma_sync<T>(acc[m][j], a_frag, b0[j], b1[j]);
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
