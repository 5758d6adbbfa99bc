// Host emulations of csrc/primitives.cuh, so the kernels' own source runs on a CPU.
//
// Every CUDA thread of a block is a std::thread. block_sync is a barrier over the block; ldmatrix and mma.sync are
// warp-collective: each lane publishes its operands, the warp meets at a barrier, each lane computes its own result
// fragment from all 32 lanes' operands with the documented PTX fragment layouts, and the warp meets again before the
// exchange slots are reused. ldmatrix also checks that every row address is 16-byte aligned and inside the block's
// shared memory, which a GPU would only report under compute-sanitizer.
#pragma once

#define LKCONV_PRIMITIVES_CUH  // the kernel's include of the real primitives becomes a no-op

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)  // a code-generation hint only nvcc knows
#endif

namespace lkconv {
namespace emulation {

struct WarpExchange {
  const void* rows[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
};

// One block being emulated: its index, shared memory and barriers.
struct Block {
  int64_t index = 0;
  std::vector<unsigned char> shared;
  std::unique_ptr<std::barrier<>> all_threads;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<WarpExchange> exchange;
};

inline thread_local Block* current_block = nullptr;
inline thread_local int current_thread = 0;

// Stops the emulator with exit code 3, naming the block and thread where a kernel is running (the host's own checks
// run outside any block).
[[noreturn]] inline void fail(const char* what) {
  if (current_block == nullptr) {
    std::fprintf(stderr, "emulation: %s\n", what);
  } else {
    std::fprintf(stderr, "emulation: %s (block %lld, thread %d)\n", what,
                 static_cast<long long>(current_block->index), current_thread);
  }
  std::exit(3);
}

inline int lane() { return current_thread % 32; }
inline WarpExchange& exchange() { return current_block->exchange[current_thread / 32]; }
inline void warp_sync() { current_block->warps[current_thread / 32]->arrive_and_wait(); }

template <typename T>
float decode(uint32_t bits);
template <>
inline float decode<float>(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
template <>
inline float decode<__nv_bfloat16>(uint32_t bits) {
  const uint32_t widened = bits << 16;
  float value;
  std::memcpy(&value, &widened, sizeof value);
  return value;
}
template <>
inline float decode<__half>(uint32_t bits) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}

// Element `half` (0 = low 16 bits) of a packed register.
inline uint32_t half_of(uint32_t word, int half) { return (word >> (16 * half)) & 0xffffu; }

}  // namespace emulation

inline int thread_index() { return emulation::current_thread; }
inline int64_t block_index() { return emulation::current_block->index; }
inline void block_sync() { emulation::current_block->all_threads->arrive_and_wait(); }

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(emulation::current_block->shared.data());
}

inline void load_matrix_x4(uint32_t (&fragment)[4], const void* row) {
  using namespace emulation;
  const auto* begin = current_block->shared.data();
  const auto* address = static_cast<const unsigned char*>(row);
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) fail("ldmatrix row address is not 16-byte aligned");
  if (address < begin || address + 16 > begin + current_block->shared.size()) {
    fail("ldmatrix row lies outside the block's shared memory");
  }
  exchange().rows[lane()] = row;
  warp_sync();
  for (int m = 0; m < 4; ++m) {
    const auto* source = static_cast<const uint16_t*>(exchange().rows[8 * m + lane() / 4]);
    fragment[m] = source[2 * (lane() % 4)] | (uint32_t{source[2 * (lane() % 4) + 1]} << 16);
  }
  warp_sync();
}

// cvt.rna.tf32.f32: keep 10 mantissa bits, rounding to nearest with ties away from zero (finite values).
inline uint32_t to_tf32(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u) return bits;  // inf and NaN pass through
  return (bits + 0x1000u) & 0xffffe000u;
}

// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16" and "for mma.m16n8k8"), lane = 4 group + quad.
// m16n8k16, 16-bit elements, two per register (low half first):
//   A a0..a3: rows group, group + 8 (a1, a3) and k 2 quad + {0, 1}, + 8 (a2, a3);   B b0, b1: column group,
//   k 2 quad + {0, 1}, + 8 (b1).
// m16n8k8 TF32, one element per register:
//   A a0..a3: rows group, group + 8 (a1, a3) and k quad, + 4 (a2, a3);   B b0, b1: column group, k quad, + 4 (b1).
// C/D c0..c3 (both): rows group, group + 8 (c2, c3), columns 2 quad + {0, 1}.
template <typename T>
void mma_sync(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace emulation;
  constexpr bool kTf32 = std::is_same_v<T, float>;
  constexpr int kK = kTf32 ? 8 : 16, kPerRegister = kTf32 ? 1 : 2;
  WarpExchange& x = exchange();
  std::memcpy(x.a[lane()], a, sizeof x.a[0]);
  x.b[lane()][0] = b0;
  x.b[lane()][1] = b1;
  warp_sync();
  // Element (row, k) of A and (k, col) of B from the lanes that hold them.
  const auto element = [](uint32_t word, int k) {
    return decode<T>(kTf32 ? word : half_of(word, k % kPerRegister));
  };
  const auto a_at = [&](int row, int k) {
    const int within = k % (kK / 2);  // k inside its half of the k range
    return element(x.a[(row % 8) * 4 + within / kPerRegister][row / 8 + 2 * (k / (kK / 2))], within);
  };
  const auto b_at = [&](int k, int col) {
    const int within = k % (kK / 2);
    return element(x.b[col * 4 + within / kPerRegister][k / (kK / 2)], within);
  };
  const int group = lane() / 4, quad = lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = group + 8 * (e / 2), col = 2 * quad + e % 2;
    float sum = d[e];
    for (int k = 0; k < kK; ++k) sum += a_at(row, k) * b_at(k, col);
    d[e] = sum;
  }
  warp_sync();
}

}  // namespace lkconv
