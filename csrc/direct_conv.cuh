// Forward and input-grad kernels on CUDA cores for any stride, dilation and kernel size, fp32 accumulation, exact in
// fp32: the paths the register-blocked and tensor-core kernels (stride 1, dilation 1) do not take.
//
// The tiled kernel computes one strided, dilated correlation (the forward, or the input grad at stride 1 as the
// correlation of dy with the rotated filter): it stages one source tile (with its halo) and the filter in shared
// memory, each thread keeps kRows outputs of one column in registers, so every filter tap read from shared memory
// feeds kRows FMAs, and taps whose rows or columns fall wholly in the padding are skipped for the block. When the
// tile would not fit in shared memory, and for input grads at stride > 1, general kernels compute one output per
// thread straight from global memory.
//
// The kernels reach the hardware only through primitives.cuh, so tests/cuda_emulation runs this source on a CPU.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "primitives.cuh"

namespace lkconv {
namespace direct_conv {

constexpr int kTileW = 32;          // output columns per block: one warp wide, so global reads coalesce
constexpr int kTileH = 16;          // output rows per block
constexpr int kRows = 4;            // output rows per thread
constexpr int kThreads = kTileW * (kTileH / kRows);
constexpr int kGeneralThreads = 256;
constexpr int kSharedLimit = 48 * 1024;  // what a block may use without opting in to more

// One correlation: dst[n, d, y, x] = bias[d] + sum_s sum_{r,q} src[n, channel(s), y*sh + origin_h + r*dh,
// x*sw + origin_w + q*dw] * filter_s[r, q]. For the forward s is the single source channel d / m with filter d; for
// the input grad (flip) s runs over the m output channels d*m + j with their filters rotated by 180 degrees.
struct Correlation {
  Map src;
  Map dst;
  const void* weight;  // (C*m, 1, kh, kw) contiguous
  const void* bias;    // forward only, or null
  int kernel_h, kernel_w;
  int stride_h, stride_w;
  int dilation_h, dilation_w;
  int64_t multiplier;
  int64_t origin_h, origin_w;
  bool flip;
};

// The forward as a correlation of x with the filter, from the top-left padding corner.
inline Correlation forward_correlation(const ForwardArgs& a) {
  const Geometry& g = a.conv;
  return {a.input, a.output, a.weight, a.bias, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dilation_h,
          g.dilation_w, g.multiplier, -int64_t{g.pad_top}, -int64_t{g.pad_left}, false};
}

// The input grad at stride 1: dy correlated with the rotated filter, padded by (k - 1) * dilation - pad.
inline Correlation input_grad_correlation(const InputGradArgs& a) {
  const Geometry& g = a.conv;
  return {a.grad_output, a.grad_input, a.weight, nullptr, g.kernel_h, g.kernel_w, 1, 1, g.dilation_h, g.dilation_w,
          g.multiplier, int64_t{g.pad_top} - int64_t{g.kernel_h - 1} * g.dilation_h,
          int64_t{g.pad_left} - int64_t{g.kernel_w - 1} * g.dilation_w, true};
}

// A tiled launch: tiles of kTileH x kTileW outputs, one block of kThreads per (plane, tile), and the source tile
// each stages (sizes in int64, so huge dilations or kernels pick the general kernel rather than overflow).
struct Tiling {
  int64_t tiles_h, tiles_w;
  int64_t blocks;
  int64_t src_tile_h, src_tile_w;
  int64_t shared_bytes;
};

inline Tiling plan(const Correlation& a) {
  const int64_t tiles_h = cdiv(a.dst.h, kTileH), tiles_w = cdiv(a.dst.w, kTileW);
  const int64_t src_tile_h = int64_t{kTileH - 1} * a.stride_h + int64_t{a.kernel_h - 1} * a.dilation_h + 1;
  const int64_t src_tile_w = int64_t{kTileW - 1} * a.stride_w + int64_t{a.kernel_w - 1} * a.dilation_w + 1;
  const int64_t floats = int64_t{a.kernel_h} * a.kernel_w + src_tile_h * src_tile_w;
  return {tiles_h, tiles_w, a.dst.n * a.dst.c * tiles_h * tiles_w, src_tile_h, src_tile_w,
          static_cast<int64_t>(sizeof(float)) * floats};
}

inline bool fits(const Tiling& t) { return t.shared_bytes <= kSharedLimit; }

template <typename T>
__global__ void __launch_bounds__(kThreads) tiled_kernel(Correlation a, Tiling t) {
  float* const shared = dynamic_shared<float>();
  const int taps = a.kernel_h * a.kernel_w;
  const int tile_w = static_cast<int>(t.src_tile_w), tile_h = static_cast<int>(t.src_tile_h);
  float* filter = shared;
  float* tile = shared + taps;

  const int64_t block = block_index(), per_plane = t.tiles_h * t.tiles_w, within = block % per_plane;
  const int64_t n = block / per_plane / a.dst.c, d = block / per_plane % a.dst.c;
  const int64_t row0 = (within / t.tiles_w) * kTileH, col0 = (within % t.tiles_w) * kTileW;
  const int64_t src_row0 = row0 * a.stride_h + a.origin_h, src_col0 = col0 * a.stride_w + a.origin_w;
  const int tid = thread_index();
  const int row = tid / kTileW * kRows, col = tid % kTileW;

  float acc[kRows];
  const float bias = a.bias ? to_float(static_cast<const T*>(a.bias)[d]) : 0.f;
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = bias;

  const int64_t sources = a.flip ? a.multiplier : 1;
  for (int64_t s = 0; s < sources; ++s) {
    const int64_t filter_channel = a.flip ? d * a.multiplier + s : d;
    const int64_t src_channel = a.flip ? filter_channel : d / a.multiplier;
    const T* weight = static_cast<const T*>(a.weight) + filter_channel * taps;
    block_sync();  // the previous source's tile and filter are no longer read
    for (int i = tid; i < taps; i += kThreads) filter[i] = to_float(weight[a.flip ? taps - 1 - i : i]);
    for (int i = tid; i < tile_h * tile_w; i += kThreads) {
      tile[i] = load_or_zero<T>(a.src, n, src_channel, src_row0 + i / tile_w, src_col0 + i % tile_w);
    }
    block_sync();

    for (int r = 0; r < a.kernel_h; ++r) {
      // Rows of the tile this kernel row reads; skip the kernel row when all of them are padding.
      const int64_t first = src_row0 + int64_t{r} * a.dilation_h, last = first + int64_t{kTileH - 1} * a.stride_h;
      if (last < 0 || first >= a.src.h) continue;
      for (int q = 0; q < a.kernel_w; ++q) {
        const int64_t left = src_col0 + int64_t{q} * a.dilation_w, right = left + int64_t{kTileW - 1} * a.stride_w;
        if (right < 0 || left >= a.src.w) continue;
        const float w = filter[r * a.kernel_w + q];
        const float* source = tile + (row * a.stride_h + r * a.dilation_h) * tile_w + col * a.stride_w +
                              q * a.dilation_w;
#pragma unroll
        for (int i = 0; i < kRows; ++i) acc[i] = fmaf(w, source[i * a.stride_h * tile_w], acc[i]);
      }
    }
  }

  const int64_t x = col0 + col;
  if (x >= a.dst.w) return;
  T* out = static_cast<T*>(a.dst.data);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t y = row0 + row + i;
    if (y < a.dst.h) out[offset(a.dst, n, d, y, x)] = from_float<T>(acc[i]);
  }
}

inline int64_t numel(const Map& m) { return m.n * m.c * m.h * m.w; }

// The (n, c, h, w) of flat element `index` of a map, for one-element-per-thread kernels.
struct Position {
  int64_t n, c, h, w;
};

__device__ __forceinline__ Position position_of(int64_t index, const Map& m) {
  return {index / (m.w * m.h * m.c), (index / (m.w * m.h)) % m.c, (index / m.w) % m.h, index % m.w};
}

// Forward: y[n, o, oh, ow] = b[o] + sum_{r,q} x[n, o/m, oh*sh - pt + r*dh, ow*sw - pl + q*dw] * w[o, r, q].
template <typename T>
__global__ void forward_general(ForwardArgs a, int64_t total) {
  const int64_t index = block_index() * kGeneralThreads + thread_index();
  if (index >= total) return;
  const Geometry& g = a.conv;
  const auto [n, o, oh, ow] = position_of(index, a.output);
  const int64_t c = o / g.multiplier;
  const T* weight = static_cast<const T*>(a.weight) + o * g.kernel_h * g.kernel_w;
  float acc = a.bias ? to_float(static_cast<const T*>(a.bias)[o]) : 0.f;
  for (int r = 0; r < g.kernel_h; ++r) {
    const int64_t ih = oh * g.stride_h - g.pad_top + int64_t{r} * g.dilation_h;
    if (ih < 0 || ih >= a.input.h) continue;
    for (int q = 0; q < g.kernel_w; ++q) {
      const int64_t iw = ow * g.stride_w - g.pad_left + int64_t{q} * g.dilation_w;
      acc = fmaf(to_float(weight[r * g.kernel_w + q]), load_or_zero<T>(a.input, n, c, ih, iw), acc);
    }
  }
  static_cast<T*>(a.output.data)[offset(a.output, n, o, oh, ow)] = from_float<T>(acc);
}

// Input grad for any stride: each input element gathers the outputs whose window covered it.
template <typename T>
__global__ void input_grad_general(InputGradArgs a, int64_t total) {
  const int64_t index = block_index() * kGeneralThreads + thread_index();
  if (index >= total) return;
  const Geometry& g = a.conv;
  const Map& dy = a.grad_output;
  const auto [n, c, ih, iw] = position_of(index, a.grad_input);
  float acc = 0.f;
  for (int64_t j = 0; j < g.multiplier; ++j) {
    const int64_t o = c * g.multiplier + j;
    const T* weight = static_cast<const T*>(a.weight) + o * g.kernel_h * g.kernel_w;
    for (int r = 0; r < g.kernel_h; ++r) {
      const int64_t rows = ih + g.pad_top - int64_t{r} * g.dilation_h;  // oh * stride_h when this tap reaches ih
      if (rows < 0 || rows % g.stride_h != 0 || rows / g.stride_h >= dy.h) continue;
      for (int q = 0; q < g.kernel_w; ++q) {
        const int64_t cols = iw + g.pad_left - int64_t{q} * g.dilation_w;
        if (cols < 0 || cols % g.stride_w != 0 || cols / g.stride_w >= dy.w) continue;
        acc = fmaf(to_float(weight[r * g.kernel_w + q]),
                   load_or_zero<T>(dy, n, o, rows / g.stride_h, cols / g.stride_w), acc);
      }
    }
  }
  static_cast<T*>(a.grad_input.data)[offset(a.grad_input, n, c, ih, iw)] = from_float<T>(acc);
}

}  // namespace direct_conv
}  // namespace lkconv
