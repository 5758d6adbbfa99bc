// What every host emulator in tests/cuda_emulation shares: reading the input file the Python tests write (int64
// fields, then raw tensors, each allocated with its exact span so AddressSanitizer sees any access outside it),
// running a grid block after block with one std::thread per CUDA thread, and writing the results back.
//
// Every tensor is given as n, c, h, w, four element strides and its span (elements from the first to the last one).
#pragma once

#include "emulated_primitives.h"  // first: it stands in for csrc/primitives.cuh

#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "depthwise.h"
#include "direct_weight_grad.cuh"

namespace lkconv {
namespace emulation {

inline constexpr int kMapFields = 9;

inline std::vector<int64_t> read_fields(std::ifstream& in, int count) {
  std::vector<int64_t> fields(static_cast<size_t>(count));
  in.read(reinterpret_cast<char*>(fields.data()), static_cast<std::streamsize>(count * sizeof(int64_t)));
  if (!in) fail("input file too short");
  return fields;
}

inline int64_t element_bytes(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

// `count` elements of `dtype`, in a buffer of exactly their size.
inline std::vector<unsigned char> read_elements(std::ifstream& in, DType dtype, int64_t count) {
  std::vector<unsigned char> bytes(static_cast<size_t>(count * element_bytes(dtype)));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!in) fail("input file too short");
  return bytes;
}

inline Map map_from(const int64_t* fields, void* data) {
  return {data, fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], fields[6], fields[7]};
}

// Runs `kernel` (one CUDA thread's body) over `blocks` blocks of `threads` threads with `shared_bytes` of shared
// memory, filled with garbage as on a GPU.
inline void emulate_grid(int64_t blocks, int threads, int64_t shared_bytes, const std::function<void()>& kernel) {
  for (int64_t b = 0; b < blocks; ++b) {
    Block block;
    block.index = b;
    block.shared.assign(static_cast<size_t>(shared_bytes), 0xa5);
    block.all_threads = std::make_unique<std::barrier<>>(threads);
    for (int w = 0; w < threads / 32; ++w) block.warps.push_back(std::make_unique<std::barrier<>>(32));
    block.exchange.resize(static_cast<size_t>(threads / 32));
    std::vector<std::thread> running;
    for (int i = 0; i < threads; ++i) {
      running.emplace_back([&block, &kernel, i] {
        current_block = &block;
        current_thread = i;
        kernel();
      });
    }
    for (auto& thread : running) thread.join();
  }
}

template <typename Body>
void with_type(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::Float16: body.template operator()<__half>(); break;
    case DType::BFloat16: body.template operator()<__nv_bfloat16>(); break;
    case DType::Float32: body.template operator()<float>(); break;
  }
}

// weight_grad.cu's second launch: the ordered reduce of the partials into grad_weight and grad_bias.
template <typename T>
void run_reduce(const WeightGradArgs& args) {
  namespace dw = direct_weight_grad;
  const int64_t outputs = args.grad_output.c * (int64_t{args.conv.kernel_h} * args.conv.kernel_w + 1);
  emulate_grid(cdiv(outputs, dw::kThreads), dw::kThreads, 0, [&] { dw::weight_grad_reduce<T>(args); });
}

// What a weight-grad mode writes: the splits the launch used (int64), the fp32 workspace of partial sums, then
// grad_weight and grad_bias as weight_grad_reduce left them.
inline bool write_weight_grad(const char* path, int64_t splits_used, const std::vector<float>& workspace,
                              const std::vector<unsigned char>& grad_weight,
                              const std::vector<unsigned char>& grad_bias) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&splits_used), sizeof splits_used);
  out.write(reinterpret_cast<const char*>(workspace.data()),
            static_cast<std::streamsize>(workspace.size() * sizeof(float)));
  out.write(reinterpret_cast<const char*>(grad_weight.data()), static_cast<std::streamsize>(grad_weight.size()));
  out.write(reinterpret_cast<const char*>(grad_bias.data()), static_cast<std::streamsize>(grad_bias.size()));
  return static_cast<bool>(out);
}

inline bool write_all(const char* path, const void* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  return static_cast<bool>(out);
}

}  // namespace emulation
}  // namespace lkconv
