// Weight and bias grad at stride 1 and dilation 1 on tensor cores with fp32 accumulation (fp16/bf16, and fp32 as TF32
// where PyTorch allows it for convs): a small GEMM (kernel rows x kernel columns) with a long reduction
// (ARCHITECTURE.md §4.2). Deterministic: fixed partial sums.
//
// For one dy row y, a chunk of 64 output columns from x0 and a 32 x 32 tile of taps from (r0, s0), with x = x0 + j - s:
//   dW[r0 + r, s0 + s] += sum_j A[r, j] * B[j, s],
//   A[r, j] = x[y - pt + r0 + r, x0 - pl + s0 + j]  (rows and columns of the staged x tile, read with ldmatrix),
//   B[j, s] = dy[y, x0 + j - s]                     (Toeplitz in the dy row: zero unless 0 <= j - s < chunk width).
// B's fragments are 32-bit words of a per-row table indexed by e = j - s (tensor_core_operands.cuh: pairs
// (dy[y, x0 + e], dy[y, x0 + e + 1]) for 16-bit types, single TF32 values for fp32), as the forward reads the filter.
// A block owns one output channel, one row range (`split`) of the N*OH reduction and one 32 x 32 tile of taps; it
// stages strips of 32 dy rows x 64 columns (as B words) and the x rows and columns they reach. Each of its 4 warps
// takes every 4th row of a strip and accumulates the whole 32 x 32 tap tile (2 m-tiles x 4 n-tiles of
// mma.sync.m16n8k16), walking the (k-step, n-tile) pairs along the band's diagonals (accumulate_row); at the end the
// warps' sums are added in warp order and written as the block's fp32 partial.
// weight_grad.cu's reduce kernel then adds the splits in order. The tap tile (0, 0) block also sums dy for the bias.
//
// This header holds the kernel and its tiling plan; weight_grad.cu launches it. The hardware operations come from
// primitives.cuh, which the host emulation in tests/cuda_emulation replaces.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "tensor_core_operands.cuh"

namespace lkconv {
namespace tensor_core_weight_grad {

constexpr int kTapTile = 32;       // kernel rows and columns per block: 2 m-tiles x 4 n-tiles
constexpr int kChunk = 64;         // dy columns per chunk
constexpr int kStripRows = 32;     // dy rows per strip
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileRows = kStripRows + kTapTile - 1;
constexpr int kTableOrigin = 32;   // the entry for e is stored at e + 32: fragments reach e = -22

// Shared-memory layout for storage type T.
template <typename T>
struct Layout {
  using Ops = Operands<T>;
  // j spans 64 + 31 columns, from a 16-byte boundary up to kVector - 1 columns early (partials_kernel).
  static constexpr int kKSteps = (kChunk + kTapTile - 1 + Ops::kVector - 1 + Ops::kK - 1) / Ops::kK;
  static constexpr int kTileCols = Ops::kK * kKSteps;
  static constexpr int kTilePitch = kTileCols + Ops::kPitchPad;  // an odd number of 16-byte units: no conflicts
  // Diagonal steps of a full chunk at the widest shift; the table holds the words they read.
  static constexpr int kDiagonalSteps = diagonal_steps<T>(kChunk, Ops::kVector - 1);
  static constexpr int kTablePitch = Ops::kK * kDiagonalSteps + kTableOrigin;
  static constexpr int64_t kSharedBytes =
      int64_t{sizeof(typename Ops::Element)} * kTileRows * kTilePitch + int64_t{4} * kStripRows * kTablePitch;
  static_assert(kSharedBytes >= int64_t{4} * (kWarps * kTapTile * kTapTile + kThreads),
                "the warps' sums and the bias sums reuse the tiles' memory");
  static_assert(kSharedBytes <= 48 * 1024, "no opt-in to more shared memory is made");
};

struct Tiling {
  int64_t tap_tiles_w;  // 32-column tap tiles per kernel row band
  int64_t tap_tiles;    // tap tiles in all: the slowest-varying part of the block index
  int64_t rows_per_split;
};

inline Tiling plan(int kernel_h, int kernel_w, int64_t total_rows, int64_t splits) {
  const int64_t tiles_w = cdiv(kernel_w, kTapTile);
  return {tiles_w, cdiv(kernel_h, kTapTile) * tiles_w, cdiv(total_rows, splits)};
}

// One dy row's products added to a warp's tap tile: A (x rows i and i + 16 of the staged tile) times B (the Toeplitz
// operand of dy row i, `dy_row` pointing at its table entry 0), walked in diagonal steps as the conv's row form does
// (tensor_core.cuh): step u multiplies k-step u + w by n-tiles G w + h, all with the same B words, and keeps the A
// fragments of the k-steps it spans in a sliding register window. Tiles wholly outside the kernel (`m_tiles`,
// `n_tiles`) are skipped unless kFullTile says there are none, in which case no mma carries a predicate.
template <typename T, bool kFullTile>
__device__ __forceinline__ void accumulate_row(float (&acc)[2][4][4], const typename Operands<T>::Element* tile,
                                               const uint32_t* dy_row, int i, int steps, int m_tiles, int n_tiles,
                                               int lane) {
  constexpr int kK = Operands<T>::kK;
  constexpr int kGroup = kK / 8;           // n-tiles per k-step width
  constexpr int kWindow = 4 / kGroup;      // k-steps one diagonal step multiplies
  uint32_t window[2][kWindow][4];          // window[m][w]: the A fragment of k-step u + w at step u
#pragma unroll
  for (int w = 0; w + 1 < kWindow; ++w)
#pragma unroll
    for (int m = 0; m < 2; ++m) load_a_fragment<T>(window[m][w], tile, Layout<T>::kTilePitch, i + 16 * m, kK * w, lane);
#pragma unroll 2
  for (int u = 0; u < steps; ++u) {
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      load_a_fragment<T>(window[m][kWindow - 1], tile, Layout<T>::kTilePitch, i + 16 * m, kK * (u + kWindow - 1),
                         lane);
    }
    uint32_t b0[kGroup], b1[kGroup];
    load_diagonal_b_fragments<T>(dy_row, u, lane, b0, b1);
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int w = 0; w < kWindow; ++w)
#pragma unroll
        for (int h = 0; h < kGroup; ++h) {
          if (kFullTile || (m < m_tiles && kGroup * w + h < n_tiles)) {
            mma_sync<T>(acc[m][kGroup * w + h], window[m][w], b0[h], b1[h]);
          }
        }
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int w = 0; w + 1 < kWindow; ++w)
#pragma unroll
        for (int e = 0; e < 4; ++e) window[m][w][e] = window[m][w + 1][e];
  }
}

// Block (o, split, tap tile) in a flat index: o fastest, so neighbouring blocks share the split's rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) partials_kernel(WeightGradArgs a, Tiling t) {
  using L = Layout<T>;
  using Ops = Operands<T>;
  using Element = typename Ops::Element;
  Element* tile = dynamic_shared<Element>();
  uint32_t* table = reinterpret_cast<uint32_t*>(tile + kTileRows * L::kTilePitch);

  const Geometry& g = a.conv;
  const Map& dy = a.grad_output;
  const int64_t block = block_index();
  const int64_t o = block % dy.c, split = (block / dy.c) % a.splits, tap_tile = block / (dy.c * a.splits);
  const int64_t c = o / g.multiplier;
  const int r0 = static_cast<int>(tap_tile / t.tap_tiles_w) * kTapTile;
  const int s0 = static_cast<int>(tap_tile % t.tap_tiles_w) * kTapTile;
  const int64_t total_rows = dy.n * dy.h, first_row = split * t.rows_per_split;
  const int64_t end_row = first_row + t.rows_per_split < total_rows ? first_row + t.rows_per_split : total_rows;
  const bool with_bias = tap_tile == 0;

  const int tid = thread_index(), lane = tid % 32, warp = tid / 32;
  // m-tiles and n-tiles of the tap tile that hold taps of the kernel (the last tile of a band may be partial).
  const int m_tiles = g.kernel_h - r0 > 16 ? 2 : 1;
  const int n_tiles = (g.kernel_w - s0 + 7) / 8 < 4 ? (g.kernel_w - s0 + 7) / 8 : 4;
  const bool full_tile = m_tiles == 2 && n_tiles == 4;
  const bool vectors = rows_are_vectors<T>(a.input);

  float acc[2][4][4] = {};
  float bias = 0.f;

  for (int64_t flat = first_row; flat < end_row;) {
    const int64_t n = flat / dy.h, y0 = flat % dy.h;
    int64_t rows = end_row - flat < dy.h - y0 ? end_row - flat : dy.h - y0;  // a strip stays within one image
    rows = rows < kStripRows ? rows : kStripRows;
    const int64_t src_row0 = y0 - g.pad_top + r0;
    for (int64_t x0 = 0; x0 < dy.w; x0 += kChunk) {
      const int width = static_cast<int>(dy.w - x0 < kChunk ? dy.w - x0 : kChunk);
      // The x tile starts `shift` columns early where that puts it on a 16-byte boundary (stage_rows' vectors); the
      // table is then read `shift` entries lower (tile column j + shift meets dy column x0 + j - s).
      const int64_t src_col0 = x0 - g.pad_left + s0;
      const int shift = vector_shift<T>(src_col0, vectors);
      block_sync();  // the previous strip is no longer read
      // Warps take rows and lanes take columns: no division, and global reads run along rows.
      for (int i = warp; i < kStripRows; i += kWarps) {
        const bool row_inside = i < rows;
        const int64_t row_offset = offset(dy, n, o, y0 + i, 0);
        const auto value = [&](int col) -> Element {
          if (!row_inside || col < 0 || col >= width) return 0;
          return Ops::stage(dy.data, row_offset + (x0 + col) * dy.stride_w);
        };
        for (int e = lane; e < L::kTablePitch; e += 32) {
          const int col = e - kTableOrigin;
          table[i * L::kTablePitch + e] = Ops::word(col, value);
          if (with_bias && row_inside && col >= 0 && col < width) {
            bias += to_float(static_cast<const T*>(dy.data)[row_offset + (x0 + col) * dy.stride_w]);
          }
        }
      }
      stage_rows<Ops, kWarps>(tile, L::kTilePitch, kTileRows, L::kTileCols, a.input, n, c, src_row0, src_col0 - shift,
                              vectors, warp, lane);
      block_sync();

      const int steps = diagonal_steps<T>(width, shift);
      for (int i = warp; i < rows; i += kWarps) {
        const uint32_t* dy_row = table + i * L::kTablePitch + kTableOrigin - shift;
        if (full_tile) {
          accumulate_row<T, true>(acc, tile, dy_row, i, steps, m_tiles, n_tiles, lane);
        } else {
          accumulate_row<T, false>(acc, tile, dy_row, i, steps, m_tiles, n_tiles, lane);
        }
      }
    }
    flat += rows;
  }

  // Add the warps' tiles in warp order (deterministic) and write this block's partial sums.
  block_sync();  // the strips are no longer read
  float* sums = dynamic_shared<float>();  // kWarps x 32 x 32
  store_accumulators<2>(sums + warp * kTapTile * kTapTile, kTapTile, 0, 0, acc, lane);
  float* bias_sums = sums + kWarps * kTapTile * kTapTile;  // one per thread, past the tiles
  bias_sums[tid] = bias;
  block_sync();
  const int taps = g.kernel_h * g.kernel_w;
  float* partial = a.workspace + (split * dy.c + o) * (taps + 1);
  for (int index = tid; index < kTapTile * kTapTile; index += kThreads) {
    const int r = index / kTapTile, s = index % kTapTile;
    if (r0 + r >= g.kernel_h || s0 + s >= g.kernel_w) continue;
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) sum += sums[w * kTapTile * kTapTile + index];
    partial[(r0 + r) * g.kernel_w + s0 + s] = sum;
  }
  if (with_bias && tid == 0) {
    float sum = 0.f;
    for (int i = 0; i < kThreads; ++i) sum += bias_sums[i];
    partial[taps] = sum;
  }
}

}  // namespace tensor_core_weight_grad
}  // namespace lkconv
