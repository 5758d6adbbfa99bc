// Device helpers shared by the kernels: fp32 arithmetic on every storage type, int64 element offsets.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>  // fmaf where the kernels are compiled for the host (tests/cuda_emulation)

#include "depthwise.h"

namespace lkconv {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ int64_t offset(const Map& m, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * m.stride_n + c * m.stride_c + h * m.stride_h + w * m.stride_w;
}

// Reads element (n, c, h, w) as float, or 0 outside the map (the conv's zero padding).
template <typename T>
__device__ __forceinline__ float load_or_zero(const Map& m, int64_t n, int64_t c, int64_t h, int64_t w) {
  if (h < 0 || h >= m.h || w < 0 || w >= m.w) return 0.f;
  return to_float(static_cast<const T*>(m.data)[offset(m, n, c, h, w)]);
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls `body.template operator()<T>()` with the storage type of `dtype`.
template <typename Body>
int dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::Float32: return body.template operator()<float>();
    case DType::Float16: return body.template operator()<__half>();
    case DType::BFloat16: return body.template operator()<__nv_bfloat16>();
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace lkconv
