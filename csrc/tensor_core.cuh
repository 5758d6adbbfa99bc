// Stride-1, dilation-1 depthwise correlation on tensor cores with fp32 accumulation: the row form of the block-wise
// implicit GEMM (ARCHITECTURE.md §4.2), for fp16/bf16 and, where PyTorch allows TF32 for convs, fp32. Forward, and
// input grad as the forward with rotated filters.
//
// Per channel and kernel row r, an output tile is a GEMM against a Toeplitz operand built from the filter on the fly:
//   Y[i, t] += sum_j X[i + r, j] * B_r[j, t],   B_r[j, t] = f[r, j - t]  (zero unless 0 <= j - t < kw).
// A block stages the source tile with its halo (in 16-byte vectors where the source rows allow: stage_rows),
// and every filter row as a table of 32-bit words indexed by d = j - t (tensor_core_operands.cuh: pairs
// (f[r, d], f[r, d + 1]) for 16-bit types, single TF32 taps for fp32), so every B register is one shared load and B
// is never materialised. Each of the 2 warps owns MT x 16 output rows and 64 columns (8 n-tiles).
//
// The mma of k-step ks and n-tile j meets the band only near the diagonal ks = j / G (G = kK / 8 n-tiles per k-step
// width), and its B fragment depends on ks - j / G alone. So per kernel row a warp walks diagonal steps u: step u
// multiplies k-step u + i by the n-tiles of group i, for every i, with the same few B words (3 shared loads for all 8
// n-tiles in 16-bit types), and keeps the A fragments of the k-steps it spans in registers, sliding the window by one
// k-step per step. Every mma of a step is issued (no per-mma predicate): the steps are exactly the diagonals that
// meet the band, and the staged halo is zero where the map ends. Kernel rows whose sources are all padding are skipped.
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

constexpr int kNTiles = 8;                    // n-tiles (8 output columns each) per warp
constexpr int kWarpCols = 8 * kNTiles;
constexpr int kWarpsM = 2;                    // warps per block, stacked along rows
constexpr int kThreads = 32 * kWarpsM;
constexpr int kTableOrigin = 32;              // the entry for d is stored at d + 32: fragments reach down to d = -22
constexpr int64_t kSharedLimit = 99 * 1024;   // opt-in dynamic shared memory; sm_80 allows 163 KB per block
// Blocks per SM the kernel is compiled for: 6 (12 warps; shared memory allows 6 at K=31 too) leaves it up to 168
// registers a thread. The two m-tile instance holds 64 accumulators and a 32-register A window; at 128 registers
// (8 blocks) it spilled 84 bytes.
constexpr int kMinBlocksPerSM = 6;

// The most m-tiles (16 rows each) a warp takes: TF32's A window holds twice the k-steps of a 16-bit one, so it stays
// at one to fit the registers.
template <typename T>
constexpr int kMaxMTiles = Operands<T>::kK == 16 ? 2 : 1;

// Where a launch's tiles sit in shared memory, and how many blocks cover the output.
struct Tiling {
  int k_steps;          // kK-column k-steps a warp's sources span, from a 16-byte boundary: ceil((64 + kw + 6) / kK)
  int diagonal_steps;   // the most diagonal steps per kernel row (the widest shift of the tile)
  int tile_rows;        // source rows staged: block rows + kh - 1
  int tile_cols;        // source columns staged: kK k_steps
  int tile_pitch;       // elements per staged row: tile_cols + 16 bytes, an odd number of 16-byte units
  int table_pitch;      // 32-bit B words per kernel row: kK diagonal_steps + 32
  int64_t tiles_h, tiles_w;
  int64_t blocks;
  int64_t shared_bytes;
};

__host__ __device__ constexpr int block_rows(int m_tiles) { return 16 * m_tiles * kWarpsM; }

template <typename T>
Tiling plan(int m_tiles, int kernel_h, int kernel_w, int64_t planes, int64_t out_h, int64_t out_w) {
  using Ops = Operands<T>;
  Tiling t{};
  // The tile starts up to kVector - 1 columns early, on a 16-byte boundary of the source row (conv_kernel).
  t.k_steps = (kWarpCols + kernel_w - 1 + Ops::kVector - 1 + Ops::kK - 1) / Ops::kK;
  t.diagonal_steps = diagonal_steps<T>(kernel_w, Ops::kVector - 1);
  t.tile_rows = block_rows(m_tiles) + kernel_h - 1;
  t.tile_cols = Ops::kK * t.k_steps;
  t.tile_pitch = t.tile_cols + Ops::kPitchPad;
  t.table_pitch = Ops::kK * t.diagonal_steps + kTableOrigin;
  t.tiles_h = cdiv(out_h, block_rows(m_tiles));
  t.tiles_w = cdiv(out_w, kWarpCols);
  t.blocks = planes * t.tiles_h * t.tiles_w;
  t.shared_bytes = int64_t{sizeof(typename Ops::Element)} * t.tile_rows * t.tile_pitch +
                   int64_t{4} * kernel_h * t.table_pitch;
  return t;
}

// Output rows per warp: 32 once the map is taller than one block of 16-row warps (16-bit types), else 16.
template <typename T>
int m_tiles_for(int64_t out_h) {
  return out_h > block_rows(1) ? kMaxMTiles<T> : 1;
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) conv_kernel(UnitStrideArgs a, Tiling t) {
  using Ops = Operands<T>;
  using Element = typename Ops::Element;
  constexpr int kK = Ops::kK;
  constexpr int kGroup = kK / 8;              // n-tiles per k-step width
  constexpr int kWindow = kNTiles / kGroup;   // k-steps one diagonal step multiplies
  Element* tile = dynamic_shared<Element>();
  uint32_t* table = reinterpret_cast<uint32_t*>(tile + int64_t{t.tile_rows} * t.tile_pitch);

  const int64_t per_plane = t.tiles_h * t.tiles_w, block = block_index();
  const int64_t plane = block / per_plane, within = block % per_plane;
  const int64_t row0 = (within / t.tiles_w) * block_rows(MT), col0 = (within % t.tiles_w) * kWarpCols;
  const int64_t n = plane / a.dst.c, d = plane % a.dst.c;
  const int64_t src_row0 = row0 + a.origin_h, src_col0 = col0 + a.origin_w;
  // Where source rows start on 16-byte boundaries, the tile starts `shift` columns early, on a boundary, so it stages
  // whole 16-byte vectors; the filter table is then read `shift` entries lower (j = t + d + shift).
  const bool vectors = rows_are_vectors<T>(a.src);
  const int shift = vector_shift<T>(src_col0, vectors);
  const int64_t tile_col0 = src_col0 - shift;
  const int steps = diagonal_steps<T>(a.kernel_w, shift);

  const int tid = thread_index(), lane = tid % 32, warp = tid / 32;
  const int warp_row = warp * 16 * MT;
  const int group = lane / 4, quad = lane % 4;  // mma fragment coordinates: row or column `group`, pair `quad`
  const bool warp_writes = row0 + warp_row < a.dst.h;

  // Kernel rows whose sources reach inside the map for some row of this warp.
  const int64_t warp_src_row = src_row0 + warp_row;
  const int r_begin = static_cast<int>(warp_src_row + 16 * MT - 1 < 0 ? -(warp_src_row + 16 * MT - 1) : 0);
  const int64_t rows_left = a.src.h - warp_src_row;
  const int r_end = static_cast<int>(rows_left < a.kernel_h ? (rows_left < 0 ? 0 : rows_left) : a.kernel_h);

  float acc[MT][kNTiles][4];
  fill_accumulators(acc, a.bias ? to_float(static_cast<const T*>(a.bias)[d]) : 0.f);

  const int64_t sources = a.flip ? a.multiplier : 1;
  for (int64_t s = 0; s < sources; ++s) {
    const ChannelSource source = channel_source(a, d, s);
    block_sync();  // the previous source's tile and filter are no longer read
    for (int r = warp; r < a.kernel_h; r += kThreads / 32) {
      stage_filter_row<T>(table + r * t.table_pitch, a, source.filter_base, r, -kTableOrigin, t.table_pitch, lane);
    }
    stage_rows<Ops, kWarpsM>(tile, t.tile_pitch, t.tile_rows, t.tile_cols, a.src, n, source.channel, src_row0,
                             tile_col0, vectors, warp, lane);
    block_sync();
    if (!warp_writes) continue;

    for (int r = r_begin; r < r_end; ++r) {
      const uint32_t* filter_row = table + r * t.table_pitch + kTableOrigin - shift;
      // window[m][i] holds the A fragment of k-step u + i at diagonal step u.
      uint32_t window[MT][kWindow][4];
#pragma unroll
      for (int i = 0; i + 1 < kWindow; ++i)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          load_a_fragment<T>(window[m][i], tile, t.tile_pitch, warp_row + 16 * m + r, kK * i, lane);
        }
#pragma unroll 4
      for (int u = 0; u < steps; ++u) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          load_a_fragment<T>(window[m][kWindow - 1], tile, t.tile_pitch, warp_row + 16 * m + r, kK * (u + kWindow - 1),
                             lane);
        }
        uint32_t b0[kGroup], b1[kGroup];
        load_diagonal_b_fragments<T>(filter_row, u, lane, b0, b1);
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int i = 0; i < kWindow; ++i)
#pragma unroll
            for (int h = 0; h < kGroup; ++h) mma_sync<T>(acc[m][kGroup * i + h], window[m][i], b0[h], b1[h]);
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int i = 0; i + 1 < kWindow; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) window[m][i][e] = window[m][i + 1][e];
      }
    }
  }
  if (!warp_writes) return;

  T* out = static_cast<T*>(a.dst.data);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t y = row0 + warp_row + 16 * m + group + 8 * (e / 2);
        const int64_t x = col0 + 8 * j + 2 * quad + e % 2;
        if (y < a.dst.h && x < a.dst.w) out[offset(a.dst, n, d, y, x)] = from_float<T>(acc[m][j][e]);
      }
    }
  }
}

}  // namespace tensor_core
}  // namespace lkconv
