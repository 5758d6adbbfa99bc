// Weight and bias grad, deterministic: the N*OH reduction is cut into `splits` fixed row ranges, each block writes
// fp32 partial sums for one output channel and range, and a second kernel adds the ranges in order. No atomics,
// so repeated runs give bit-identical results.
//
// dW[o, r, q] = sum_{n, oh, ow} dy[n, o, oh, ow] * x[n, o/m, oh*sh - pt + r*dh, ow*sw - pl + q*dw]
// db[o]       = sum_{n, oh, ow} dy[n, o, oh, ow]   (handled as one extra "tap" whose input is 1)

#include "common.cuh"

namespace lkconv {
namespace {

constexpr int kThreads = 256;
constexpr int kTapsPerThread = 16;  // taps a thread accumulates in registers per pass: 4096 taps, a 63x63 kernel
constexpr int kRowChunk = 1024;     // dy row elements staged in shared memory at a time

template <typename T>
__global__ void __launch_bounds__(kThreads) weight_grad_partials(WeightGradArgs a, int64_t rows_per_split) {
  __shared__ float row[kRowChunk];
  const Geometry& g = a.conv;
  const int taps = g.kernel_h * g.kernel_w;
  const int64_t o = blockIdx.x, split = blockIdx.y, c = o / g.multiplier;
  const int64_t total_rows = a.grad_output.n * a.grad_output.h;
  const int64_t first_row = split * rows_per_split;
  const int64_t end_row = first_row + rows_per_split < total_rows ? first_row + rows_per_split : total_rows;
  float* partial = a.workspace + (split * a.grad_output.c + o) * (taps + 1);

  // Taps are dealt out in groups of kThreads * kTapsPerThread; tap index `taps` is the bias.
  for (int group = 0; group <= taps; group += kThreads * kTapsPerThread) {
    float acc[kTapsPerThread];
#pragma unroll
    for (int s = 0; s < kTapsPerThread; ++s) acc[s] = 0.f;

    for (int64_t flat = first_row; flat < end_row; ++flat) {
      const int64_t n = flat / a.grad_output.h, oh = flat % a.grad_output.h;
      for (int64_t col0 = 0; col0 < a.grad_output.w; col0 += kRowChunk) {
        const int width = static_cast<int>(a.grad_output.w - col0 < kRowChunk ? a.grad_output.w - col0 : kRowChunk);
        __syncthreads();  // the previous chunk is no longer read
        for (int i = threadIdx.x; i < width; i += kThreads) {
          row[i] = to_float(static_cast<const T*>(a.grad_output.data)[offset(a.grad_output, n, o, oh, col0 + i)]);
        }
        __syncthreads();
#pragma unroll
        for (int s = 0; s < kTapsPerThread; ++s) {
          const int tap = group + s * kThreads + threadIdx.x;
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
      const int tap = group + s * kThreads + threadIdx.x;
      if (tap <= taps) partial[tap] = acc[s];
    }
  }
}

// Adds the splits in a fixed order and writes dW (and db) in the storage type.
template <typename T>
__global__ void weight_grad_reduce(WeightGradArgs a) {
  const int taps = a.conv.kernel_h * a.conv.kernel_w;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
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

}  // namespace

int weight_grad(const WeightGradArgs& args, void* stream) {
  const int64_t channels = args.grad_output.c;
  if (channels == 0) return 0;
  if (args.splits < 1) return static_cast<int>(cudaErrorInvalidValue);
  const int taps = args.conv.kernel_h * args.conv.kernel_w;
  const int64_t rows_per_split = cdiv(args.grad_output.n * args.grad_output.h, args.splits);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(args.dtype, [&]<typename T>() {
    weight_grad_partials<T><<<dim3(channels, args.splits), kThreads, 0, s>>>(args, rows_per_split);
    if (cudaError_t error = cudaGetLastError(); error != cudaSuccess) return static_cast<int>(error);
    weight_grad_reduce<T><<<cdiv(channels * (taps + 1), 256), 256, 0, s>>>(args);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace lkconv
