// Weight and bias grad on maps the kernel covers (RepLKNet-31B's 14x14 with K=27, 7x7 with K=13) on tensor cores,
// stride 1 and dilation 1, fp32 accumulation; fp16/bf16, and fp32 as TF32 where PyTorch allows it for convs.
// Deterministic: fixed-order sums into fp32 partials that weight_grad.cu's reduce adds in order.
//
// On such maps the row-form weight grad (tensor_core_weight_grad.cuh) multiplies mostly padding: a 14-column dy row
// against 32-tap tiles issues about 12 times the useful work. Here, per channel, the tensor cores form the Gram
// matrix of the two maps over the images,
//   G[s, p] = sum_n x[n, s] * dy[n, p]        (s an x pixel, p a dy pixel),
// and every entry of G belongs to exactly one tap: dW[r, q] = sum_p G[p + (r - pad_top, q - pad_left), p]. The
// GEMM does the useful multiply-adds only (plus tile padding); the gather adds each entry once.
//
// A block owns one output channel and one image range (`split`). It stages dy a pass of tiles at a time (all of them
// on maps up to about 16x16; 4 tiles of 2 rows on RepLKNet's 28x28) and, per pass, x one tile at a time, each pixel as
// a row of up to 64 (16-bit) or 32 (TF32) images, i.e. transposed so that ldmatrix loads A = x and B's registers are
// words of dy. Tiles are whole map rows (64 / W of them, at most 64 pixels), so each tap meets a tile pair in a few
// runs of adjacent pixels; x tiles that meet no kernel row of the pass are not staged. Per tile pair the 4 warps
// (2 x 2, 32 x 32 each) compute the 64 x 64 tile of G, write it to shared memory, and each thread adds the entries of
// its own taps, tile pair after tile pair in a fixed order. The block's taps, and dy summed for the bias, are its
// partial sums.
//
// This header holds the kernel and its plan; weight_grad.cu launches it. The hardware operations come from
// primitives.cuh, which the host emulation in tests/cuda_emulation replaces.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "tensor_core_operands.cuh"

namespace lkconv {
namespace tensor_core_whole_map_weight_grad {

constexpr int kTile = 64;                    // pixels per tile: the GEMM's 64 rows (x) and 64 columns (dy)
constexpr int kWarps = 4;                    // 2 x 2, each 32 x pixels x 32 dy pixels
constexpr int kThreads = 32 * kWarps;
constexpr int kImageBytes = 128;             // images staged per pixel row: 64 fp16/bf16 or 32 TF32
constexpr int kRowBytes = kImageBytes + 16;  // an odd number of 16-byte units apart: ldmatrix without conflicts
constexpr int kGramPitch = kTile + 4;        // floats per row of the G tile in shared memory
constexpr int64_t kSharedLimit = 99 * 1024;  // opt-in dynamic shared memory
// What a block's dy passes aim to stay within: three blocks per SM on an H100 (227 KB), so one block's barriers and
// gathers overlap two others' tensor-core work. A prediction, to calibrate on a GPU.
constexpr int64_t kSharedBudget = 72 * 1024;

template <typename T>
struct Images {
  using Element = typename Operands<T>::Element;
  static constexpr int kCount = kImageBytes / static_cast<int>(sizeof(Element));  // images per chunk
  static constexpr int kPitch = kRowBytes / static_cast<int>(sizeof(Element));    // elements per pixel row
};

struct Tiling {
  int rows_x, rows_dy;   // map rows per tile: 64 / W and 64 / OW
  int tiles_x, tiles_dy;
  int dy_tiles_per_pass; // dy tiles staged at once
  int64_t images_per_split;
  int64_t shared_bytes;  // a pass of dy tiles, one x tile, the G tile, the taps' sums, the bias sums
};

// The splits a launch uses, at most `requested`: each split repeats the whole G staging and gather, and one with
// fewer images than a chunk leaves the GEMM's reduction partly zeros, so a split gets at least a full chunk.
template <typename T>
int64_t splits_for(int64_t batch, int64_t requested) {
  const int64_t chunks = cdiv(batch, Images<T>::kCount);
  return requested < chunks ? requested : (chunks > 0 ? chunks : 1);
}

// Whether the maps' rows fit in tiles at all (at most 64 pixels wide).
inline bool rows_fit(int64_t x_w, int64_t dy_w) { return x_w <= kTile && dy_w <= kTile; }

template <typename T>
Tiling plan(int kernel_h, int kernel_w, int64_t batch, int64_t splits, int64_t x_h, int64_t x_w, int64_t dy_h,
            int64_t dy_w) {
  Tiling t{};
  t.rows_x = static_cast<int>(kTile / x_w);
  t.rows_dy = static_cast<int>(kTile / dy_w);
  t.tiles_x = static_cast<int>(cdiv(x_h, t.rows_x));
  t.tiles_dy = static_cast<int>(cdiv(dy_h, t.rows_dy));
  t.images_per_split = cdiv(cdiv(batch, Images<T>::kCount), splits) * Images<T>::kCount;  // whole chunks
  const int64_t tile_bytes = int64_t{kRowBytes} * kTile;
  const int64_t fixed = tile_bytes + int64_t{4} * kTile * kGramPitch + int64_t{4} * kernel_h * kernel_w +
                        int64_t{4} * kThreads;
  const int64_t fitting = (kSharedBudget - fixed) / tile_bytes;
  t.dy_tiles_per_pass = static_cast<int>(fitting < 1 ? 1 : (fitting < t.tiles_dy ? fitting : t.tiles_dy));
  t.shared_bytes = fixed + tile_bytes * t.dy_tiles_per_pass;  // past kSharedLimit: the kernel is not chosen
  return t;
}

// Block (o, split) in a flat index, o fastest.
template <typename T>
__global__ void __launch_bounds__(kThreads) partials_kernel(WeightGradArgs a, Tiling t) {
  using Ops = Operands<T>;
  using Element = typename Ops::Element;
  constexpr int kK = Ops::kK;
  constexpr int kImages = Images<T>::kCount, kPitch = Images<T>::kPitch;
  Element* dy_rows = dynamic_shared<Element>();  // dy_tiles_per_pass x 64 pixel rows
  Element* x_rows = dy_rows + t.dy_tiles_per_pass * kTile * kPitch;
  float* gram = reinterpret_cast<float*>(x_rows + kTile * kPitch);
  float* tap_sums = gram + kTile * kGramPitch;
  float* bias_sums = tap_sums + a.conv.kernel_h * a.conv.kernel_w;

  const Geometry& g = a.conv;
  const Map &dy = a.grad_output, &x = a.input;
  const int64_t block = block_index();
  const int64_t o = block % dy.c, split = block / dy.c, c = o / g.multiplier;
  const int64_t first_image = split * t.images_per_split;
  const int64_t end_image = first_image + t.images_per_split < dy.n ? first_image + t.images_per_split : dy.n;
  const int taps = g.kernel_h * g.kernel_w;

  const int tid = thread_index(), lane = tid % 32, warp = tid / 32;
  const int group = lane / 4, quad = lane % 4;  // mma fragment coordinates
  const int warp_row = (warp / 2) * 32, warp_col = (warp % 2) * 32;

  for (int tap = tid; tap < taps; tap += kThreads) tap_sums[tap] = 0.f;
  float bias = 0.f;

  // The staging threads: each takes one pixel of a tile (its map row and column fixed) for every other image.
  const int stage_pixel = tid % kTile, stage_image = tid / kTile;
  const int dy_row_in_tile = stage_pixel / static_cast<int>(dy.w), dy_col = stage_pixel % static_cast<int>(dy.w);
  const int x_row_in_tile = stage_pixel / static_cast<int>(x.w), x_col = stage_pixel % static_cast<int>(x.w);

  for (int64_t image0 = first_image; image0 < end_image; image0 += kImages) {
    for (int pass0 = 0; pass0 < t.tiles_dy; pass0 += t.dy_tiles_per_pass) {
      const int pass_end = pass0 + t.dy_tiles_per_pass < t.tiles_dy ? pass0 + t.dy_tiles_per_pass : t.tiles_dy;
      block_sync();  // the previous pass's rows are no longer read (each pair's barrier after its mma orders this too)
      for (int tile = pass0; tile < pass_end; ++tile) {
        const int64_t y = int64_t{tile} * t.rows_dy + dy_row_in_tile;
        const bool pixel_inside = dy_row_in_tile < t.rows_dy && y < dy.h;
        for (int i = stage_image; i < kImages; i += kThreads / kTile) {
          const int64_t n = image0 + i;
          Element value = 0;
          if (pixel_inside && n < end_image) {
            const int64_t index = offset(dy, n, o, y, dy_col);
            value = Ops::stage(dy.data, index);
            bias += to_float(static_cast<const T*>(dy.data)[index]);
          }
          dy_rows[((tile - pass0) * kTile + stage_pixel) * kPitch + i] = value;
        }
      }
      const int pass_row0 = pass0 * t.rows_dy;
      const int pass_row_end = pass_end * t.rows_dy < dy.h ? pass_end * t.rows_dy : static_cast<int>(dy.h);

      for (int tile_x = 0; tile_x < t.tiles_x; ++tile_x) {
        const int x_row0 = tile_x * t.rows_x;
        const int x_row_end = x_row0 + t.rows_x < x.h ? x_row0 + t.rows_x : static_cast<int>(x.h);
        // Kernel rows a pair meets: x row - dy row + pad_top. Skip the x tile (the whole block) if it meets none of
        // the pass's rows, and a pair if it meets none of its dy tile's.
        if ((x_row_end - 1) - pass_row0 + g.pad_top < 0 || x_row0 - (pass_row_end - 1) + g.pad_top >= g.kernel_h) {
          continue;
        }
        block_sync();  // the previous x tile is no longer read (each pair's barrier after its mma orders this too)
        {
          const int64_t y = x_row0 + x_row_in_tile;
          const bool pixel_inside = x_row_in_tile < t.rows_x && y < x.h;
          for (int i = stage_image; i < kImages; i += kThreads / kTile) {
            const int64_t n = image0 + i;
            x_rows[stage_pixel * kPitch + i] =
                pixel_inside && n < end_image ? Ops::stage(x.data, offset(x, n, c, y, x_col)) : 0;
          }
        }

        for (int tile_dy = pass0; tile_dy < pass_end; ++tile_dy) {
          const int dy_row0 = tile_dy * t.rows_dy;
          const int dy_row_end = dy_row0 + t.rows_dy < dy.h ? dy_row0 + t.rows_dy : static_cast<int>(dy.h);
          const int r_lo = x_row0 - (dy_row_end - 1) + g.pad_top, r_hi = (x_row_end - 1) - dy_row0 + g.pad_top;
          if (r_hi < 0 || r_lo >= g.kernel_h) continue;
          block_sync();  // the x tile is staged; the previous pair's G tile is no longer read

          float acc[2][4][4];
          fill_accumulators<2>(acc, 0.f);
          const uint32_t* dy_words =
              reinterpret_cast<const uint32_t*>(dy_rows + (tile_dy - pass0) * kTile * kPitch);
#pragma unroll
          for (int ks = 0; ks < kImages / kK; ++ks) {
            // B (images x dy pixels): b0 of n-tile j holds the images kK ks + (kK / 8) quad (and the next, for 16-bit
            // types) of pixel 8 j + group: word 8 ks + quad of that pixel's row either way; b1 the word 4 further.
            uint32_t b0[4], b1[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const uint32_t* row = dy_words + (warp_col + 8 * j + group) * (kRowBytes / 4) + 8 * ks + quad;
              b0[j] = row[0];
              b1[j] = row[4];
            }
#pragma unroll
            for (int m = 0; m < 2; ++m) {
              uint32_t a_frag[4];
              load_a_fragment<T>(a_frag, x_rows, kPitch, warp_row + 16 * m, kK * ks, lane);
#pragma unroll
              for (int j = 0; j < 4; ++j) mma_sync<T>(acc[m][j], a_frag, b0[j], b1[j]);
            }
          }
          store_accumulators<2>(gram, kGramPitch, warp_row, warp_col, acc, lane);
          block_sync();

          // Each thread adds the G entries of its taps: for tap (r, q) and each dy row y of the tile whose x row
          // y + r - pad_top is in the x tile, the run of columns where both pixels are inside the maps.
          for (int tap = tid; tap < taps; tap += kThreads) {
            const int dr = tap / g.kernel_w - g.pad_top, dc = tap % g.kernel_w - g.pad_left;
            const int y_lo = dy_row0 > x_row0 - dr ? dy_row0 : x_row0 - dr;
            const int y_hi = dy_row_end < x_row_end - dr ? dy_row_end : x_row_end - dr;
            const int col_lo = dc < 0 ? -dc : 0;
            const int col_hi = static_cast<int>(dy.w < x.w - dc ? dy.w : x.w - dc);
            if (y_lo >= y_hi || col_lo >= col_hi) continue;
            float sum = 0.f;
            for (int y = y_lo; y < y_hi; ++y) {
              const int s = (y + dr - x_row0) * static_cast<int>(x.w) + col_lo + dc;
              const int p = (y - dy_row0) * static_cast<int>(dy.w) + col_lo;
              const float* entry = gram + s * kGramPitch + p;
              for (int col = col_lo; col < col_hi; ++col, entry += kGramPitch + 1) sum += *entry;
            }
            tap_sums[tap] += sum;
          }
        }
      }
    }
  }

  // Write this block's partial sums: the taps, then dy summed in thread order for the bias.
  bias_sums[tid] = bias;
  block_sync();
  float* partial = a.workspace + (split * dy.c + o) * (taps + 1);
  for (int tap = tid; tap < taps; tap += kThreads) partial[tap] = tap_sums[tap];
  if (tid == 0) {
    float sum = 0.f;
    for (int i = 0; i < kThreads; ++i) sum += bias_sums[i];
    partial[taps] = sum;
  }
}

}  // namespace tensor_core_whole_map_weight_grad
}  // namespace lkconv
