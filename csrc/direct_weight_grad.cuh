// Weight and bias grad on CUDA cores, fp32 accumulation, exact in fp32, and the ordered reduce every weight-grad form
// shares. Each partials block writes the fp32 sums of one output channel over one fixed range of the N*OH dy rows
// (a split); weight_grad_reduce adds the splits in order. No atomics, so repeated runs give bit-identical results.
//
// dW[o, r, q] = sum_{n, oh, ow} dy[n, o, oh, ow] * x[n, o/m, oh*sh - pt + r*dh, ow*sw - pl + q*dw]
// db[o]       = sum_{n, oh, ow} dy[n, o, oh, ow]   (handled as one extra "tap" whose input is 1)
//
// Blocks are numbered split * C*m + o. The kernels reach the hardware only through primitives.cuh, so
// tests/cuda_emulation runs this source on a CPU.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "primitives.cuh"
#include "staging.cuh"

namespace lkconv {
namespace direct_weight_grad {

constexpr int kThreads = 256;
constexpr int kTapsPerThread = 16;  // taps a thread accumulates in registers per pass: 4096 taps, a 63x63 kernel
constexpr int kRowChunk = 1024;     // dy row elements staged in shared memory at a time
constexpr int64_t kRowChunkBytes = kRowChunk * sizeof(float);

// Any stride and dilation: each thread owns up to kTapsPerThread taps (and the bias) and adds dy row chunks staged in
// shared memory times x read straight from global memory.
template <typename T>
__global__ void __launch_bounds__(kThreads) weight_grad_partials(WeightGradArgs a, int64_t rows_per_split) {
  float* const row = dynamic_shared<float>();  // kRowChunk floats
  const Geometry& g = a.conv;
  const int taps = g.kernel_h * g.kernel_w;
  const int64_t o = block_index() % a.grad_output.c, split = block_index() / a.grad_output.c, c = o / g.multiplier;
  const int64_t total_rows = a.grad_output.n * a.grad_output.h;
  const int64_t first_row = split * rows_per_split;
  const int64_t end_row = first_row + rows_per_split < total_rows ? first_row + rows_per_split : total_rows;
  float* partial = a.workspace + (split * a.grad_output.c + o) * (taps + 1);
  const int tid = thread_index();

  // Taps are dealt out in groups of kThreads * kTapsPerThread; tap index `taps` is the bias.
  for (int group = 0; group <= taps; group += kThreads * kTapsPerThread) {
    float acc[kTapsPerThread];
#pragma unroll
    for (int s = 0; s < kTapsPerThread; ++s) acc[s] = 0.f;

    for (int64_t flat = first_row; flat < end_row; ++flat) {
      const int64_t n = flat / a.grad_output.h, oh = flat % a.grad_output.h;
      for (int64_t col0 = 0; col0 < a.grad_output.w; col0 += kRowChunk) {
        const int width = static_cast<int>(a.grad_output.w - col0 < kRowChunk ? a.grad_output.w - col0 : kRowChunk);
        block_sync();  // the previous chunk is no longer read
        for (int i = tid; i < width; i += kThreads) {
          row[i] = to_float(static_cast<const T*>(a.grad_output.data)[offset(a.grad_output, n, o, oh, col0 + i)]);
        }
        block_sync();
#pragma unroll
        for (int s = 0; s < kTapsPerThread; ++s) {
          const int tap = group + s * kThreads + tid;
          if (tap > taps) continue;
          if (tap == taps) {  // the bias: dy summed
            for (int i = 0; i < width; ++i) acc[s] += row[i];
            continue;
          }
          const int64_t ih = oh * g.stride_h - g.pad_top + (tap / g.kernel_w) * g.dilation_h;
          if (ih < 0 || ih >= a.input.h) continue;
          const int64_t iw0 = (col0 * g.stride_w) - g.pad_left + (tap % g.kernel_w) * g.dilation_w;
          const T* source = static_cast<const T*>(a.input.data) + offset(a.input, n, c, ih, 0);
          for (int i = 0; i < width; ++i) {
            const int64_t iw = iw0 + static_cast<int64_t>(i) * g.stride_w;
            if (iw >= 0 && iw < a.input.w) acc[s] = fmaf(row[i], to_float(source[iw * a.input.stride_w]), acc[s]);
          }
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kTapsPerThread; ++s) {
      const int tap = group + s * kThreads + tid;
      if (tap <= taps) partial[tap] = acc[s];
    }
  }
}

// Stride 1, dilation 1: a register-tiled correlation. A block stages a strip of up to 8 dy rows x 64 columns and
// the x rows and columns they reach in shared memory. Each thread owns one kernel row and kTaps adjacent taps (16
// where the padded filter row is whole windows of 16 and that issues less, taps_cost; else 8) and walks the strip's
// columns 8 at a time: 2 dy loads and kTaps / 4 + 2 x loads (128-bit) feed 8 kTaps FMAs. With few taps (small
// kernels) groups of threads take interleaved column chunks and their sums are added in group order, so the result
// stays deterministic.
// A thread skips the strip rows whose x row, for its kernel row, lies in the padding. Every thread sums its share of
// dy for the bias, and those sums are added in thread order at the end.
//
// Where x rows start on 16-byte boundaries (rows_are_vectors), the x strip starts `shift` columns early on a boundary
// and is staged in 16-byte vectors (stage_rows); threads then own taps shifted by `shift`, and the sums of the
// `shift` leading ones, which lie left of the filter, are dropped. The x strip's rows are an odd number of 16-byte
// units apart (where that still fits: not for the largest kernels), so the kernel rows that a quarter-warp's 128-bit
// loads cover read different banks wherever a row has 2 windows of 16 or 4 of 8 (K = 25..32).
constexpr int kStripRows = 8;
constexpr int kPieceW = 64;
constexpr int kDyChunk = 8;  // dy columns per step
constexpr int kBlockedThreads = 128;
constexpr int64_t kBlockedSharedLimit = 48 * 1024;

// Where the blocked weight grad's strips sit in shared memory, and how many taps a thread owns, for one launch.
struct BlockedLayout {
  bool vectors;         // stage x in 16-byte vectors
  int shift;            // the x strip starts this many columns before the first x column the taps reach
  int kw_pad;           // tap columns threads own: `shift` before the filter, the filter, zeros to a whole window of 8
  int taps_per_thread;  // 8 or 16 (kTaps)
  int x_pitch;          // floats per x strip row
  int64_t shared_bytes;
};

// Groups of threads that repeat each (kernel row, kTaps taps) unit when there are few units: as many as fit, but no
// more than a strip piece has column chunks.
__host__ __device__ inline int thread_groups(int units) {
  const int fitting = units >= kBlockedThreads ? 1 : kBlockedThreads / units;
  return fitting < kPieceW / kDyChunk ? fitting : kPieceW / kDyChunk;
}

// Issue cost, in instructions per thread and strip row, of kTaps = `taps`: the step loop is 77 instructions for 8
// taps and 143 for 16 (sm_90 SASS, one 8-column dy chunk); a unit's groups split the chunks of each 64-column piece.
__host__ __device__ inline int64_t taps_cost(int kernel_h, int kw_pad, int taps, int64_t dy_width) {
  const int units = kernel_h * (kw_pad / taps), groups = thread_groups(units);
  const int64_t passes = (units + kBlockedThreads - 1) / kBlockedThreads;
  const int64_t full_pieces = dy_width / kPieceW, last_chunks = (dy_width % kPieceW + kDyChunk - 1) / kDyChunk;
  const int64_t full_chunks = kPieceW / kDyChunk;
  const int64_t steps = full_pieces * ((full_chunks + groups - 1) / groups) + (last_chunks + groups - 1) / groups;
  return passes * steps * (taps == 16 ? 143 : 77);
}

__host__ __device__ inline BlockedLayout blocked_layout(int kernel_h, int kernel_w, bool vectors, int shift,
                                                        int64_t dy_width) {
  BlockedLayout l{vectors, shift, shifted_filter_columns(kernel_w, shift), 8, 0, 0};
  if (l.kw_pad % 16 == 0 && taps_cost(kernel_h, l.kw_pad, 16, dy_width) < taps_cost(kernel_h, l.kw_pad, 8, dy_width)) {
    l.taps_per_thread = 16;
  }
  const int64_t sums = int64_t{kBlockedThreads} * l.taps_per_thread;  // the groups' sums, once the strips are done
  // x rows an odd number of 16-byte units apart (bank-conflict free), unless only unpadded rows fit.
  for (const int pad : {4, 0}) {
    l.x_pitch = kPieceW + l.kw_pad + pad;
    const int64_t strips = int64_t{kStripRows} * kPieceW + int64_t{kStripRows + kernel_h - 1} * l.x_pitch;
    l.shared_bytes = static_cast<int64_t>(sizeof(float)) * (strips > sums ? strips : sums);
    if (l.shared_bytes <= kBlockedSharedLimit) break;
  }
  return l;
}

// The layout of a launch: x's alignment decides the shift (every strip starts at -pad_left plus a multiple of 64).
template <typename T>
BlockedLayout blocked_layout(const WeightGradArgs& a) {
  const bool vectors = rows_are_vectors<T>(a.input);
  return blocked_layout(a.conv.kernel_h, a.conv.kernel_w, vectors, vector_shift<T>(-int64_t{a.conv.pad_left}, vectors),
                        a.grad_output.w);
}

// Whether the strips fit for this storage type and kernel size whatever the alignment and map: with the type's
// largest shift and the sums of 16 taps per thread.
template <typename T>
bool blocked_fits(int kernel_h, int kernel_w) {
  const BlockedLayout widest = blocked_layout(kernel_h, kernel_w, true, kVectorElements<T> - 1, kPieceW);
  const int64_t sums_bytes = int64_t{kBlockedThreads} * 16 * sizeof(float);
  return kernel_h <= 1024 && kernel_w <= 1024 && widest.shared_bytes <= kBlockedSharedLimit &&
         sums_bytes <= kBlockedSharedLimit;
}

// `count` floats from 16-byte aligned shared memory into registers.
template <int kCount>
__device__ __forceinline__ void load_floats(const float* source, float (&target)[kCount]) {
#pragma unroll
  for (int v = 0; v < kCount / 4; ++v) {
    const float4 value = reinterpret_cast<const float4*>(source)[v];
    target[4 * v] = value.x, target[4 * v + 1] = value.y, target[4 * v + 2] = value.z, target[4 * v + 3] = value.w;
  }
}

template <typename T, int kTaps>
__global__ void __launch_bounds__(kBlockedThreads, 4) weight_grad_blocked_partials(WeightGradArgs a,
                                                                                 int64_t rows_per_split,
                                                                                 BlockedLayout layout) {
  float* const shared = dynamic_shared<float>();
  const Geometry& g = a.conv;
  const int kh = g.kernel_h, kw = g.kernel_w, kw_pad = layout.kw_pad, taps = kh * kw;
  const int x_pitch = layout.x_pitch;
  float* dy_strip = shared;                         // kStripRows x kPieceW
  float* x_strip = shared + kStripRows * kPieceW;   // (kStripRows + kh - 1) x x_pitch
  const Map& dy = a.grad_output;
  const int64_t o = block_index() % dy.c, split = block_index() / dy.c, c = o / g.multiplier;
  const int64_t total_rows = dy.n * dy.h, first_row = split * rows_per_split;
  const int64_t end_row = first_row + rows_per_split < total_rows ? first_row + rows_per_split : total_rows;
  float* partial = a.workspace + (split * dy.c + o) * (taps + 1);
  const int tid = thread_index();

  // Units of (kernel row, kTaps taps), one per thread; where there are few, groups of threads repeat them, each
  // group taking every groups-th column chunk. A unit's groups are adjacent threads, so a warp spans few kernel rows.
  const int units = kh * (kw_pad / kTaps), groups = thread_groups(units);
  float bias = 0.f;  // this thread's share of the bias grad
  for (int unit_base = 0; unit_base < units; unit_base += kBlockedThreads) {
    const int group = tid % groups;
    const int unit = unit_base + tid / groups;  // past `units` (idle) only in the last pass
    const bool active = unit < units;
    const int r = active ? unit / (kw_pad / kTaps) : 0;
    const int q0 = active ? unit % (kw_pad / kTaps) * kTaps : 0;
    float acc[kTaps] = {};

    for (int64_t flat = first_row; flat < end_row;) {
      const int64_t n = flat / dy.h, oh0 = flat % dy.h;
      int64_t rows = end_row - flat < dy.h - oh0 ? end_row - flat : dy.h - oh0;  // stay within one image
      rows = rows < kStripRows ? rows : kStripRows;
      for (int64_t col0 = 0; col0 < dy.w; col0 += kPieceW) {
        const int width = static_cast<int>(dy.w - col0 < kPieceW ? dy.w - col0 : kPieceW);
        block_sync();  // the previous strip is no longer read
        for (int i = tid; i < kStripRows * kPieceW; i += kBlockedThreads) {
          const int row = i / kPieceW, col = i % kPieceW;
          dy_strip[i] = row < rows && col < width
                            ? to_float(static_cast<const T*>(dy.data)[offset(dy, n, o, oh0 + row, col0 + col)])
                            : 0.f;
        }
        stage_rows<FloatTile<T>, kBlockedThreads / 32>(x_strip, x_pitch, kStripRows + kh - 1, kPieceW + kw_pad,
                                                       a.input, n, c, oh0 - g.pad_top, col0 - g.pad_left - layout.shift,
                                                       layout.vectors, tid / 32, tid % 32);
        block_sync();
        if (active) {
          // Only the strip rows whose x row (oh0 - pad_top + i + r) lies inside the map: the others are zero.
          const int64_t x_row0 = oh0 - g.pad_top + r;
          const int i_begin = static_cast<int>(x_row0 < 0 ? (-x_row0 < rows ? -x_row0 : rows) : 0);
          const int i_end = static_cast<int>(a.input.h - x_row0 < rows ? a.input.h - x_row0 : rows);
          for (int i = i_begin; i < i_end; ++i) {
            const float* dy_row = dy_strip + i * kPieceW;
            const float* x_row = x_strip + (i + r) * x_pitch + q0;
            for (int w0 = group * kDyChunk; w0 < width; w0 += groups * kDyChunk) {
              float dy_values[kDyChunk], x_values[kDyChunk + kTaps];
              load_floats(dy_row + w0, dy_values);
              load_floats(x_row + w0, x_values);
#pragma unroll
              for (int t = 0; t < kTaps; ++t)
#pragma unroll
                for (int j = 0; j < kDyChunk; ++j) acc[t] = fmaf(dy_values[j], x_values[j + t], acc[t]);
            }
          }
        }
        if (unit_base == 0) {  // each thread its share of dy, in a fixed order; zeros pad the strip
          for (int i = tid; i < rows * kPieceW; i += kBlockedThreads) bias += dy_strip[i];
        }
      }
      flat += rows;
    }

    // Add the groups' sums in group order (deterministic), then write this pass's taps.
    block_sync();
    float* sums = shared;  // groups x units x kTaps floats (blocked_layout sizes shared memory for them)
    if (active) {
      for (int t = 0; t < kTaps; ++t) sums[(group * units + unit - unit_base) * kTaps + t] = acc[t];
    }
    block_sync();
    if (active && group == 0) {
      for (int other = 1; other < groups; ++other) {
        for (int t = 0; t < kTaps; ++t) acc[t] += sums[(other * units + unit - unit_base) * kTaps + t];
      }
      for (int t = 0; t < kTaps; ++t) {
        const int q = q0 + t - layout.shift;
        if (q >= 0 && q < kw) partial[r * kw + q] = acc[t];
      }
    }
  }
  // The threads' bias sums, added in thread order.
  block_sync();
  shared[tid] = bias;
  block_sync();
  if (tid == 0) {
    for (int other = 1; other < kBlockedThreads; ++other) bias += shared[other];
    partial[taps] = bias;
  }
}

// The blocked partials kernel for a layout's taps per thread.
template <typename T>
inline auto blocked_partials_kernel(const BlockedLayout& layout) {
  return layout.taps_per_thread == 16 ? weight_grad_blocked_partials<T, 16> : weight_grad_blocked_partials<T, 8>;
}

// dy rows per split: the N*OH rows cut into `splits` ranges.
inline int64_t rows_per_split(const WeightGradArgs& a) { return cdiv(a.grad_output.n * a.grad_output.h, a.splits); }

// Adds the splits in a fixed order and writes dW (and db) in the storage type; kThreads per block, one (o, tap) each.
template <typename T>
__global__ void weight_grad_reduce(WeightGradArgs a) {
  const int taps = a.conv.kernel_h * a.conv.kernel_w;
  const int64_t index = block_index() * kThreads + thread_index();
  const int64_t channels = a.grad_output.c;
  if (index >= channels * (taps + 1)) return;
  float sum = 0.f;
  for (int64_t split = 0; split < a.splits; ++split) sum += a.workspace[split * channels * (taps + 1) + index];
  const int64_t o = index / (taps + 1), tap = index % (taps + 1);
  if (tap < taps) {
    static_cast<T*>(a.grad_weight)[o * taps + tap] = from_float<T>(sum);
  } else if (a.grad_bias) {
    static_cast<T*>(a.grad_bias)[o] = from_float<T>(sum);
  }
}

}  // namespace direct_weight_grad
}  // namespace lkconv
