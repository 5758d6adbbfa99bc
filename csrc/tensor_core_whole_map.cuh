// The whole-map form of the block-wise implicit GEMM (ARCHITECTURE.md §4.2) on tensor cores, for maps the kernel
// covers (most of): RepLKNet-31B's 14x14 maps with K=27 and 7x7 with K=13. Stride 1, dilation 1, fp32 accumulation;
// fp16/bf16, and fp32 as TF32 where PyTorch allows it for convs. Forward, and input grad with rotated filters.
//
// Per channel the conv is one dense GEMM with the images as rows, every source pixel as the reduction and every
// destination pixel as a column:
//   Y[n, p] += sum_s X[n, s] * T[s, p],   T[(sy, sx), (y, x)] = f[sy - y - origin_h, sx - x - origin_w]  (0 outside).
// The row form (tensor_core.cuh) multiplies mostly zeros on such maps; this form multiplies none when the kernel
// covers the map. The reduction walks source pixels row by row with `src_pitch` columns per row, W rounded up to
// even for 16-bit types, so that the two reduction entries of a B register, (s, s + 1), share a source row and are
// adjacent taps f[r, q], f[r, q + 1]: one word of a table of filter-row words (tensor_core_operands.cuh), as in the
// row form. That table has a row for every reachable r and a column for every reachable q, zero outside the filter,
// so the B register for (s, p) is table[key(s) - key(p)]: one shared load, no bounds check, never materialised.
//
// A block owns one destination channel, 32 MT images and 64 destination pixels; each of its 4 warps (2 x 2) owns
// MT x 16 images and 32 pixels. It stages the images' source pixels in chunks of 256 bytes per image (with each
// pixel's key), and per k-step each warp loads MT A fragments with ldmatrix and the B words of its 4 n-tiles.
//
// This header holds the kernel and its tiling plan; tensor_core.cu launches it. The hardware operations come from
// primitives.cuh, which the host emulation in tests/cuda_emulation replaces.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "tensor_core_operands.cuh"
#include "unit_stride.h"

namespace lkconv {
namespace tensor_core_whole_map {

constexpr int kWarpsM = 2, kWarpsN = 2;     // warps per block along images and destination pixels
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWarpPixels = 32;             // destination pixels per warp: 4 n-tiles of 8
constexpr int kBlockPixels = kWarpPixels * kWarpsN;
constexpr int kChunkBytes = 256;            // staged bytes per image and chunk: 128 fp16/bf16 or 64 TF32 pixels
constexpr int64_t kSharedLimit = 99 * 1024;  // opt-in dynamic shared memory
// Blocks per SM the kernel is compiled for: 4 (16 warps) leaves it up to 128 registers a thread. Without it ptxas
// aimed at more blocks and spilled (12-40 bytes) at 64-80 registers.
constexpr int kMinBlocksPerSM = 4;

__host__ __device__ constexpr int block_images(int m_tiles) { return 16 * m_tiles * kWarpsM; }

template <typename T>
struct Chunk {
  using Element = typename Operands<T>::Element;
  static constexpr int kPixels = kChunkBytes / static_cast<int>(sizeof(Element));
  static constexpr int kPitch = kPixels + Operands<T>::kPitchPad;  // an odd number of 16-byte units: no conflicts
};

// Where a launch's operands sit in shared memory, and how many blocks cover the output.
struct Tiling {
  int src_pitch;       // reduction entries per source row: W, rounded up to even for 16-bit types
  int64_t k_total;     // reduction entries: src_h * src_pitch rounded up to a whole k-step
  int table_rows;      // reachable filter rows r: src_h + dst_h - 1
  int table_pitch;     // reachable filter columns q: src_pitch + dst_w - 1
  int64_t image_tiles, pixel_tiles;
  int64_t blocks;
  int64_t shared_bytes;
};

template <typename T>
Tiling plan(int m_tiles, int64_t batch, int64_t channels, int64_t src_h, int64_t src_w, int64_t dst_h,
            int64_t dst_w) {
  using Ops = Operands<T>;
  Tiling t{};
  t.src_pitch = static_cast<int>(sizeof(typename Ops::Element) == 2 ? src_w + src_w % 2 : src_w);
  t.k_total = cdiv(src_h * t.src_pitch, Ops::kK) * Ops::kK;
  t.table_rows = static_cast<int>(src_h + dst_h - 1);
  t.table_pitch = static_cast<int>(t.src_pitch + dst_w - 1);
  t.image_tiles = cdiv(batch, block_images(m_tiles));
  t.pixel_tiles = cdiv(dst_h * dst_w, kBlockPixels);
  t.blocks = channels * t.image_tiles * t.pixel_tiles;
  t.shared_bytes = int64_t{kChunkBytes + Ops::kPitchPad * int64_t{sizeof(typename Ops::Element)}} *
                       block_images(m_tiles) +
                   int64_t{4} * Chunk<T>::kPixels + int64_t{4} * t.table_rows * t.table_pitch;
  return t;
}

// Images per warp: 32 once the batch fills more than one block of 16-image warps, else 16.
inline int m_tiles_for(int64_t batch) { return batch > block_images(1) ? 2 : 1; }

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) conv_kernel(UnitStrideArgs a, Tiling t) {
  using Ops = Operands<T>;
  using Element = typename Ops::Element;
  constexpr int kK = Ops::kK;
  constexpr int kImages = block_images(MT);
  Element* chunk = dynamic_shared<Element>();
  int32_t* src_keys = reinterpret_cast<int32_t*>(chunk + kImages * Chunk<T>::kPitch);
  uint32_t* table = reinterpret_cast<uint32_t*>(src_keys + Chunk<T>::kPixels);

  const int64_t block = block_index(), per_channel = t.image_tiles * t.pixel_tiles;
  const int64_t d = block / per_channel, within = block % per_channel;
  const int64_t image0 = (within / t.pixel_tiles) * kImages, pixel0 = (within % t.pixel_tiles) * kBlockPixels;
  const int64_t dst_pixels = a.dst.h * a.dst.w;

  const int tid = thread_index(), lane = tid % 32, warp = tid / 32;
  const int warp_row = (warp / kWarpsN) * 16 * MT, warp_col = (warp % kWarpsN) * kWarpPixels;
  const int group = lane / 4, quad = lane % 4;  // mma fragment coordinates: row or column `group`, pair `quad`
  const bool warp_writes = image0 + warp_row < a.dst.n && pixel0 + warp_col < dst_pixels;

  // key(p) for this lane's column of each n-tile; the table index of T[s, p] is key(s) - key(p), never negative.
  // Pixels past the map take pixel 0's key: their products are computed and never stored.
  int32_t dst_keys[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t p = pixel0 + warp_col + 8 * j + group;
    const int64_t y = p < dst_pixels ? p / a.dst.w : 0, x = p < dst_pixels ? p % a.dst.w : 0;
    dst_keys[j] = static_cast<int32_t>((y - a.dst.h + 1) * t.table_pitch + (x - a.dst.w + 1));
  }

  float acc[MT][4][4];
  fill_accumulators<MT>(acc, a.bias ? to_float(static_cast<const T*>(a.bias)[d]) : 0.f);

  // The staging threads: each takes one chunk column (a source pixel) for every kImageStep-th image.
  constexpr int kImageStep = kThreads / Chunk<T>::kPixels;
  const int stage_col = tid % Chunk<T>::kPixels, stage_image = tid / Chunk<T>::kPixels;

  const int64_t sources = a.flip ? a.multiplier : 1;
  for (int64_t s = 0; s < sources; ++s) {
    const ChannelSource source = channel_source(a, d, s);
    block_sync();  // the previous source's table and chunk are no longer read
    // Table row i holds filter row r = i - (dst_h - 1) - origin_h from column q = -(dst_w - 1) - origin_w on.
    for (int i = warp; i < t.table_rows; i += kThreads / 32) {
      stage_filter_row<T>(table + i * t.table_pitch, a, source.filter_base, i - (a.dst.h - 1) - a.origin_h,
                          -(a.dst.w - 1) - a.origin_w, t.table_pitch, lane);
    }

    for (int64_t k0 = 0; k0 < t.k_total; k0 += Chunk<T>::kPixels) {
      block_sync();  // the previous chunk is no longer read
      {
        const int64_t k = k0 + stage_col, sy = k / t.src_pitch, sx = k % t.src_pitch;
        const bool inside = sy < a.src.h && sx < a.src.w;
        // Padding columns and the tail past the map stage zeros; their key is pixel 0's, which keeps the table
        // index in range.
        if (stage_image == 0) src_keys[stage_col] = inside ? static_cast<int32_t>(sy * t.table_pitch + sx) : 0;
        const int64_t pixel_offset = inside ? sy * a.src.stride_h + sx * a.src.stride_w : 0;
        for (int i = stage_image; i < kImages; i += kImageStep) {
          const int64_t n = image0 + i;
          chunk[i * Chunk<T>::kPitch + stage_col] =
              inside && n < a.src.n
                  ? Ops::stage(a.src.data, n * a.src.stride_n + source.channel * a.src.stride_c + pixel_offset)
                  : 0;
        }
      }
      block_sync();
      if (!warp_writes) continue;

      const int64_t k_left = t.k_total - k0;
      const int k_steps = static_cast<int>(k_left < Chunk<T>::kPixels ? k_left : Chunk<T>::kPixels) / kK;
      for (int ks = 0; ks < k_steps; ++ks) {
        // B fragments: b0 of n-tile j holds T[s, p] for s = kK ks + (kK / 8) quad and p = 8 j + group, b1 the same
        // for s + kK / 2 (tensor_core_operands.cuh); fp16/bf16 words hold s and s + 1.
        const int32_t key0 = src_keys[kK * ks + (kK / 8) * quad], key1 = src_keys[kK * ks + (kK / 8) * quad + kK / 2];
        uint32_t b0[4], b1[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          b0[j] = table[key0 - dst_keys[j]];
          b1[j] = table[key1 - dst_keys[j]];
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          uint32_t a_frag[4];
          load_a_fragment<T>(a_frag, chunk, Chunk<T>::kPitch, warp_row + 16 * m, kK * ks, lane);
#pragma unroll
          for (int j = 0; j < 4; ++j) mma_sync<T>(acc[m][j], a_frag, b0[j], b1[j]);
        }
      }
    }
  }
  if (!warp_writes) return;

  T* out = static_cast<T*>(a.dst.data);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t p = pixel0 + warp_col + 8 * j + 2 * quad + half;
      if (p >= dst_pixels) continue;
      const int64_t y = p / a.dst.w, x = p % a.dst.w;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int upper = 0; upper < 2; ++upper) {
          const int64_t n = image0 + warp_row + 16 * m + group + 8 * upper;
          if (n < a.dst.n) out[offset(a.dst, n, d, y, x)] = from_float<T>(acc[m][j][2 * upper + half]);
        }
      }
    }
  }
}

}  // namespace tensor_core_whole_map
}  // namespace lkconv
