// Forward and input-grad kernels on CUDA cores, fp32 accumulation, exact in fp32.
//
// Tiled kernels stage one input tile (with its halo) and the channel's filter in shared memory; each thread keeps
// ROWS outputs of one column in registers, so every filter tap read from shared memory feeds ROWS FMAs, and taps
// whose rows or columns fall wholly in the padding are skipped for the block. When the tile would not fit in
// shared memory (very large kernels with stride or dilation) a general kernel computes one output per thread
// straight from global memory. Any stride, dilation, padding, depth multiplier and element strides.

#include "unit_stride.h"
#include "common.cuh"

namespace lkconv {
namespace {

constexpr int kTileW = 32;          // output columns per block: one warp wide, so global reads coalesce
constexpr int kTileH = 16;          // output rows per block
constexpr int kRows = 4;            // output rows per thread
constexpr int kThreads = kTileW * (kTileH / kRows);
constexpr int kSharedLimit = 48 * 1024;  // what a block may use without opting in to more

struct Tile {
  int64_t plane;      // n * channels + c of the map written
  int64_t row0, col0; // first output row and column of the tile
};

__device__ __forceinline__ Tile tile_of_block(int64_t tiles_h, int64_t tiles_w) {
  const int64_t block = blockIdx.x;
  const int64_t per_plane = tiles_h * tiles_w;
  const int64_t within = block % per_plane;
  return {block / per_plane, (within / tiles_w) * kTileH, (within % tiles_w) * kTileW};
}

// Writes one thread's column of kRows results (rows row0.., column col) of plane (n, c), inside the map only.
template <typename T>
__device__ __forceinline__ void store_column(const Map& m, int64_t n, int64_t c, int64_t row0, int64_t col,
                                             const float (&acc)[kRows]) {
  if (col >= m.w) return;
  T* out = static_cast<T*>(m.data);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (row0 + i < m.h) out[offset(m, n, c, row0 + i, col)] = from_float<T>(acc[i]);
  }
}

// The (n, c, h, w) of flat element `index` of a map, for one-element-per-thread kernels.
struct Position {
  int64_t n, c, h, w;
};

__device__ __forceinline__ Position position_of(int64_t index, const Map& m) {
  return {index / (m.w * m.h * m.c), (index / (m.w * m.h)) % m.c, (index / m.w) % m.h, index % m.w};
}

// Forward: y[n, o, oh, ow] = b[o] + sum_{r,q} x[n, o/m, oh*sh - pt + r*dh, ow*sw - pl + q*dw] * w[o, r, q].
template <typename T>
__global__ void __launch_bounds__(kThreads) forward_tiled(ForwardArgs a, int64_t tiles_h, int64_t tiles_w,
                                                          int in_tile_h, int in_tile_w) {
  extern __shared__ float shared[];
  const Geometry& g = a.conv;
  const int taps = g.kernel_h * g.kernel_w;
  float* filter = shared;
  float* tile = shared + taps;

  const Tile t = tile_of_block(tiles_h, tiles_w);
  const int64_t n = t.plane / a.output.c, o = t.plane % a.output.c, c = o / g.multiplier;
  const int64_t in_row0 = t.row0 * g.stride_h - g.pad_top, in_col0 = t.col0 * g.stride_w - g.pad_left;
  const int tid = threadIdx.y * kTileW + threadIdx.x;

  const T* weight = static_cast<const T*>(a.weight) + o * taps;
  for (int i = tid; i < taps; i += kThreads) filter[i] = to_float(weight[i]);
  for (int i = tid; i < in_tile_h * in_tile_w; i += kThreads) {
    tile[i] = load_or_zero<T>(a.input, n, c, in_row0 + i / in_tile_w, in_col0 + i % in_tile_w);
  }
  __syncthreads();

  float acc[kRows];
  const float bias = a.bias ? to_float(static_cast<const T*>(a.bias)[o]) : 0.f;
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = bias;

  const int row = threadIdx.y * kRows, col = threadIdx.x;
  for (int r = 0; r < g.kernel_h; ++r) {
    // Rows of the tile this kernel row reads; skip the kernel row when all of them are padding.
    const int64_t first = in_row0 + r * g.dilation_h, last = first + (kTileH - 1) * g.stride_h;
    if (last < 0 || first >= a.input.h) continue;
    for (int q = 0; q < g.kernel_w; ++q) {
      const int64_t left = in_col0 + q * g.dilation_w, right = left + (kTileW - 1) * g.stride_w;
      if (right < 0 || left >= a.input.w) continue;
      const float w = filter[r * g.kernel_w + q];
      const float* source = tile + (row * g.stride_h + r * g.dilation_h) * in_tile_w + col * g.stride_w +
                            q * g.dilation_w;
#pragma unroll
      for (int i = 0; i < kRows; ++i) acc[i] = fmaf(w, source[i * g.stride_h * in_tile_w], acc[i]);
    }
  }

  store_column<T>(a.output, n, o, t.row0 + row, t.col0 + col, acc);
}

template <typename T>
__global__ void forward_general(ForwardArgs a, int64_t total) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const Geometry& g = a.conv;
  const auto [n, o, oh, ow] = position_of(index, a.output);
  const int64_t c = o / g.multiplier;
  const T* weight = static_cast<const T*>(a.weight) + o * g.kernel_h * g.kernel_w;
  float acc = a.bias ? to_float(static_cast<const T*>(a.bias)[o]) : 0.f;
  for (int r = 0; r < g.kernel_h; ++r) {
    const int64_t ih = oh * g.stride_h - g.pad_top + r * g.dilation_h;
    if (ih < 0 || ih >= a.input.h) continue;
    for (int q = 0; q < g.kernel_w; ++q) {
      const int64_t iw = ow * g.stride_w - g.pad_left + q * g.dilation_w;
      acc = fmaf(to_float(weight[r * g.kernel_w + q]), load_or_zero<T>(a.input, n, c, ih, iw), acc);
    }
  }
  static_cast<T*>(a.output.data)[offset(a.output, n, o, oh, ow)] = from_float<T>(acc);
}

// Input grad at stride 1: dx[n, c, ih, iw] = sum_{j<m} sum_{r,q} dy[n, c*m+j, ih + pt - r*dh, iw + pl - q*dw] *
// w[c*m+j, r, q], a correlation of dy with the flipped filter. The tile is the dy window every output reads.
template <typename T>
__global__ void __launch_bounds__(kThreads) input_grad_tiled(InputGradArgs a, int64_t tiles_h, int64_t tiles_w,
                                                             int in_tile_h, int in_tile_w) {
  extern __shared__ float shared[];
  const Geometry& g = a.conv;
  const int taps = g.kernel_h * g.kernel_w;
  float* filter = shared;
  float* tile = shared + taps;

  const Tile t = tile_of_block(tiles_h, tiles_w);
  const int64_t n = t.plane / a.grad_input.c, c = t.plane % a.grad_input.c;
  const int64_t dy_row0 = t.row0 + g.pad_top - (g.kernel_h - 1) * g.dilation_h;
  const int64_t dy_col0 = t.col0 + g.pad_left - (g.kernel_w - 1) * g.dilation_w;
  const int tid = threadIdx.y * kTileW + threadIdx.x;
  const int row = threadIdx.y * kRows, col = threadIdx.x;

  float acc[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = 0.f;

  for (int64_t j = 0; j < g.multiplier; ++j) {
    const int64_t o = c * g.multiplier + j;
    __syncthreads();  // the previous output channel's tile is no longer read
    const T* weight = static_cast<const T*>(a.weight) + o * taps;
    for (int i = tid; i < taps; i += kThreads) filter[i] = to_float(weight[i]);
    for (int i = tid; i < in_tile_h * in_tile_w; i += kThreads) {
      tile[i] = load_or_zero<T>(a.grad_output, n, o, dy_row0 + i / in_tile_w, dy_col0 + i % in_tile_w);
    }
    __syncthreads();
    for (int r = 0; r < g.kernel_h; ++r) {
      const int64_t first = dy_row0 + (g.kernel_h - 1 - r) * g.dilation_h, last = first + kTileH - 1;
      if (last < 0 || first >= a.grad_output.h) continue;
      for (int q = 0; q < g.kernel_w; ++q) {
        const int64_t left = dy_col0 + (g.kernel_w - 1 - q) * g.dilation_w, right = left + kTileW - 1;
        if (right < 0 || left >= a.grad_output.w) continue;
        const float w = filter[r * g.kernel_w + q];
        const float* source = tile + (row + (g.kernel_h - 1 - r) * g.dilation_h) * in_tile_w + col +
                              (g.kernel_w - 1 - q) * g.dilation_w;
#pragma unroll
        for (int i = 0; i < kRows; ++i) acc[i] = fmaf(w, source[i * in_tile_w], acc[i]);
      }
    }
  }

  store_column<T>(a.grad_input, n, c, t.row0 + row, t.col0 + col, acc);
}

// Input grad for any stride: each input element gathers the outputs whose window covered it.
template <typename T>
__global__ void input_grad_general(InputGradArgs a, int64_t total) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const Geometry& g = a.conv;
  const Map& dy = a.grad_output;
  const auto [n, c, ih, iw] = position_of(index, a.grad_input);
  float acc = 0.f;
  for (int64_t j = 0; j < g.multiplier; ++j) {
    const int64_t o = c * g.multiplier + j;
    const T* weight = static_cast<const T*>(a.weight) + o * g.kernel_h * g.kernel_w;
    for (int r = 0; r < g.kernel_h; ++r) {
      const int64_t rows = ih + g.pad_top - r * g.dilation_h;  // oh * stride_h when this tap reaches ih
      if (rows < 0 || rows % g.stride_h != 0 || rows / g.stride_h >= dy.h) continue;
      for (int q = 0; q < g.kernel_w; ++q) {
        const int64_t cols = iw + g.pad_left - q * g.dilation_w;
        if (cols < 0 || cols % g.stride_w != 0 || cols / g.stride_w >= dy.w) continue;
        acc = fmaf(to_float(weight[r * g.kernel_w + q]),
                   load_or_zero<T>(dy, n, o, rows / g.stride_h, cols / g.stride_w), acc);
      }
    }
  }
  static_cast<T*>(a.grad_input.data)[offset(a.grad_input, n, c, ih, iw)] = from_float<T>(acc);
}

// Sizes in int64: huge dilations or kernels must pick the general kernel, not overflow into a small tile.
int64_t shared_bytes(const Geometry& g, int64_t tile_h, int64_t tile_w) {
  return static_cast<int64_t>(sizeof(float)) * (static_cast<int64_t>(g.kernel_h) * g.kernel_w + tile_h * tile_w);
}

int64_t numel(const Map& m) { return m.n * m.c * m.h * m.w; }

// Shared-memory tile extents (rows, columns) of each tiled kernel.
int64_t forward_tile_h(const Geometry& g) {
  return int64_t{kTileH - 1} * g.stride_h + int64_t{g.kernel_h - 1} * g.dilation_h + 1;
}
int64_t forward_tile_w(const Geometry& g) {
  return int64_t{kTileW - 1} * g.stride_w + int64_t{g.kernel_w - 1} * g.dilation_w + 1;
}
int64_t input_grad_tile_h(const Geometry& g) { return kTileH + int64_t{g.kernel_h - 1} * g.dilation_h; }
int64_t input_grad_tile_w(const Geometry& g) { return kTileW + int64_t{g.kernel_w - 1} * g.dilation_w; }

bool is_blocked(const Geometry& g) { return unit_stride_and_dilation(g) && blocked_fits(g.kernel_h, g.kernel_w); }

bool is_tensor_core(DType dtype, bool allow_tf32, const Geometry& g) {
  return tensor_cores_allowed(dtype, allow_tf32) && unit_stride_and_dilation(g) &&
         tensor_core_fits(dtype, g.kernel_h, g.kernel_w);
}

bool forward_is_tiled(const Geometry& g) {
  return shared_bytes(g, forward_tile_h(g), forward_tile_w(g)) <= kSharedLimit;
}

bool input_grad_is_tiled(const Geometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 &&
         shared_bytes(g, input_grad_tile_h(g), input_grad_tile_w(g)) <= kSharedLimit;
}

}  // namespace

const char* kernel_name(Pass pass, DType dtype, bool allow_tf32, const Geometry& conv, const MapSizes& sizes) {
  const bool tf32 = dtype == DType::Float32;
  switch (pass) {
    case Pass::Forward:
      if (is_tensor_core(dtype, allow_tf32, conv)) {
        const UnitStrideSizes unit{sizes.batch, sizes.in_h, sizes.in_w, sizes.out_h, sizes.out_w};
        if (runs_whole_map(dtype, conv.kernel_h, conv.kernel_w, unit)) {
          return tf32 ? "forward_tensor_core_whole_map (tf32)" : "forward_tensor_core_whole_map";
        }
        return tf32 ? "forward_tensor_core (tf32)" : "forward_tensor_core";
      }
      return is_blocked(conv) ? "forward_blocked" : (forward_is_tiled(conv) ? "forward_tiled" : "forward_general");
    case Pass::InputGrad:
      if (is_tensor_core(dtype, allow_tf32, conv)) {  // dy is the source, dx the destination
        const UnitStrideSizes unit{sizes.batch, sizes.out_h, sizes.out_w, sizes.in_h, sizes.in_w};
        if (runs_whole_map(dtype, conv.kernel_h, conv.kernel_w, unit)) {
          return tf32 ? "input_grad_tensor_core_whole_map (tf32)" : "input_grad_tensor_core_whole_map";
        }
        return tf32 ? "input_grad_tensor_core (tf32)" : "input_grad_tensor_core";
      }
      return is_blocked(conv) ? "input_grad_blocked"
                              : (input_grad_is_tiled(conv) ? "input_grad_tiled" : "input_grad_general");
    case Pass::WeightGrad:
      if (weight_grad_is_whole_map(dtype, allow_tf32, conv, sizes)) {
        return tf32 ? "weight_grad_tensor_core_whole_map_partials (tf32) + weight_grad_reduce"
                    : "weight_grad_tensor_core_whole_map_partials + weight_grad_reduce";
      }
      if (weight_grad_is_tensor_core(dtype, allow_tf32, conv)) {
        return tf32 ? "weight_grad_tensor_core_partials (tf32) + weight_grad_reduce"
                    : "weight_grad_tensor_core_partials + weight_grad_reduce";
      }
      return weight_grad_is_blocked(conv) ? "weight_grad_blocked_partials + weight_grad_reduce"
                                          : "weight_grad_partials + weight_grad_reduce";
  }
  return "unknown";
}

int forward(const ForwardArgs& args, void* stream) {
  const int64_t total = numel(args.output);
  if (total == 0) return 0;
  const Geometry& g = args.conv;
  if (unit_stride_and_dilation(g)) {
    const UnitStrideArgs unit{args.dtype, args.input, args.output, args.weight, args.bias, g.kernel_h, g.kernel_w,
                              g.multiplier, -int64_t{g.pad_top}, -int64_t{g.pad_left}, false};
    if (is_tensor_core(args.dtype, args.allow_tf32, g)) return tensor_core_conv(unit, stream);
    if (is_blocked(g)) return blocked_conv(unit, stream);
  }
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(args.dtype, [&]<typename T>() {
    if (forward_is_tiled(g)) {
      const int tile_h = static_cast<int>(forward_tile_h(g)), tile_w = static_cast<int>(forward_tile_w(g));
      const int64_t tiles_h = cdiv(args.output.h, kTileH), tiles_w = cdiv(args.output.w, kTileW);
      const int64_t blocks = args.output.n * args.output.c * tiles_h * tiles_w;
      const int shared = static_cast<int>(shared_bytes(g, tile_h, tile_w));
      forward_tiled<T><<<blocks, dim3(kTileW, kTileH / kRows), shared, s>>>(args, tiles_h, tiles_w, tile_h, tile_w);
    } else {
      forward_general<T><<<cdiv(total, 256), 256, 0, s>>>(args, total);
    }
    return static_cast<int>(cudaGetLastError());
  });
}

int input_grad(const InputGradArgs& args, void* stream) {
  const int64_t total = numel(args.grad_input);
  if (total == 0) return 0;
  const Geometry& g = args.conv;
  if (unit_stride_and_dilation(g)) {  // dx = dy correlated with the rotated filter, padded by (k - 1 - p)
    const UnitStrideArgs unit{args.dtype, args.grad_output, args.grad_input, args.weight, nullptr, g.kernel_h,
                              g.kernel_w, g.multiplier, int64_t{g.pad_top} - (g.kernel_h - 1),
                              int64_t{g.pad_left} - (g.kernel_w - 1), true};
    if (is_tensor_core(args.dtype, args.allow_tf32, g)) return tensor_core_conv(unit, stream);
    if (is_blocked(g)) return blocked_conv(unit, stream);
  }
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(args.dtype, [&]<typename T>() {
    if (input_grad_is_tiled(g)) {
      const int tile_h = static_cast<int>(input_grad_tile_h(g)), tile_w = static_cast<int>(input_grad_tile_w(g));
      const int64_t tiles_h = cdiv(args.grad_input.h, kTileH), tiles_w = cdiv(args.grad_input.w, kTileW);
      const int64_t blocks = args.grad_input.n * args.grad_input.c * tiles_h * tiles_w;
      const int shared = static_cast<int>(shared_bytes(g, tile_h, tile_w));
      input_grad_tiled<T><<<blocks, dim3(kTileW, kTileH / kRows), shared, s>>>(args, tiles_h, tiles_w, tile_h,
                                                                                 tile_w);
    } else {
      input_grad_general<T><<<cdiv(total, 256), 256, 0, s>>>(args, total);
    }
    return static_cast<int>(cudaGetLastError());
  });
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace lkconv
