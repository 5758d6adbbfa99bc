// The hardware operations every kernel uses, one small function each: thread and block indices, the block barrier,
// dynamic shared memory, and for the tensor-core kernels ldmatrix, the TF32 rounding and mma.sync.
//
// They sit apart behind a classic include guard so that tests/cuda_emulation can define LKCONV_PRIMITIVES_CUH
// first and supply host emulations, which runs the kernels' own source on a CPU (no GPU needed to test their
// indexing).
#ifndef LKCONV_PRIMITIVES_CUH
#define LKCONV_PRIMITIVES_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lkconv {

__device__ __forceinline__ int thread_index() { return static_cast<int>(threadIdx.x); }
__device__ __forceinline__ int64_t block_index() { return blockIdx.x; }
__device__ __forceinline__ void block_sync() { __syncthreads(); }

template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char dynamic_shared_bytes[];
  return reinterpret_cast<T*>(dynamic_shared_bytes);
}

// ldmatrix .x4: lane i gives the shared address of row i % 8 of 8x8 matrix i / 8 (16 bytes, 16-byte aligned); each
// lane receives, per matrix, the two 16-bit elements of row lane / 4 at columns 2 (lane % 4) and 2 (lane % 4) + 1.
__device__ __forceinline__ void load_matrix_x4(uint32_t (&fragment)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(address));
#else
  __trap();  // the backend refuses GPUs older than sm_80
#endif
}

// The fp32 value rounded to TF32 (10 mantissa bits, to nearest, ties away from zero), as mma's TF32 operands take it.
__device__ __forceinline__ uint32_t to_tf32(float value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(value));
  return bits;
#else
  __trap();
#endif
}

// d += A * B in fp32 on one warp: mma.sync.m16n8k16 for fp16/bf16 (A 16x16, B 16x8), m16n8k8 TF32 for float (A
// 16x8, B 8x8). A's four registers and B's two hold the PTX fragments of the storage type.
template <typename T>
__device__ __forceinline__ void mma_sync(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define LKCONV_MMA(shape_and_types)                                                                              \
  asm volatile("mma.sync.aligned." shape_and_types " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "             \
               "{%0, %1, %2, %3};\n"                                                                             \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
#else
#define LKCONV_MMA(shape_and_types) __trap()  // the backend refuses GPUs older than sm_80
#endif

template <>
__device__ __forceinline__ void mma_sync<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  LKCONV_MMA("m16n8k16.row.col.f32.bf16.bf16.f32");
}

template <>
__device__ __forceinline__ void mma_sync<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  LKCONV_MMA("m16n8k16.row.col.f32.f16.f16.f32");
}

template <>
__device__ __forceinline__ void mma_sync<float>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  LKCONV_MMA("m16n8k8.row.col.f32.tf32.tf32.f32");
}

#undef LKCONV_MMA

}  // namespace lkconv

#endif  // LKCONV_PRIMITIVES_CUH
