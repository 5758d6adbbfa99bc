// What every host emulator in tests/cuda_emulation shares: reading the input file the Python tests write (int64
// fields, then raw tensors, each allocated with its exact span so AddressSanitizer sees any access outside it),
// running a grid block after block with one std::thread per CUDA thread, and writing the results back.
//
// Every map is given as n, c, h, w, four element strides, its span (elements from the first to the last one) and a
// segment count. With no segments its whole span follows in the file. Otherwise (a map whose images lie 2^31
// elements apart, to test int64 offsets) a table of (first element, elements) pairs follows, then those elements
// only: they are placed in a reservation of the whole span whose other pages fault on any access.
#pragma once

#include "emulated_primitives.h"  // first: it stands in for csrc/primitives.cuh

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "depthwise.h"
#include "direct_weight_grad.cuh"

namespace lkconv {
namespace emulation {

inline constexpr int kMapFields = 10;

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

// A map's storage as the file gives it (see the top of this file): its whole span, or its segments placed in a
// reservation of the span (PROT_NONE but for the pages the segments touch).
class MapStorage {
 public:
  MapStorage(std::ifstream& in, DType dtype, const int64_t* fields) : bytes_(element_bytes(dtype)) {
    const int64_t span = fields[8], segments = fields[9];
    if (segments == 0) {
      dense_ = read_elements(in, dtype, span);
      return;
    }
    segments_ = read_fields(in, static_cast<int>(2 * segments));
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t reserved = (static_cast<size_t>(span * bytes_) + page - 1) / page * page;
    void* base = mmap(nullptr, reserved, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) fail("cannot reserve the span of a map with segments");
    reservation_.reset(static_cast<unsigned char*>(base), [reserved](unsigned char* p) { munmap(p, reserved); });
    for (size_t i = 0; i < segments_.size(); i += 2) {
      const size_t begin = static_cast<size_t>(segments_[i] * bytes_);
      const size_t end = begin + static_cast<size_t>(segments_[i + 1] * bytes_);
      if (segments_[i] < 0 || segments_[i + 1] < 0 || end > reserved) fail("a segment lies outside its map's span");
      const size_t first_page = begin / page * page, last_page = (end + page - 1) / page * page;
      if (mprotect(reservation_.get() + first_page, last_page - first_page, PROT_READ | PROT_WRITE) != 0) {
        fail("cannot map a segment's pages");
      }
      in.read(reinterpret_cast<char*>(reservation_.get() + begin), static_cast<std::streamsize>(end - begin));
      if (!in) fail("input file too short");
    }
  }

  unsigned char* data() { return reservation_ ? reservation_.get() : dense_.data(); }

  // What the kernel left in the map: the whole span, or the segments in order.
  bool write(const char* path) const {
    std::ofstream out(path, std::ios::binary);
    if (!reservation_) {
      out.write(reinterpret_cast<const char*>(dense_.data()), static_cast<std::streamsize>(dense_.size()));
    }
    for (size_t i = 0; i < segments_.size(); i += 2) {
      out.write(reinterpret_cast<const char*>(reservation_.get() + segments_[i] * bytes_),
                static_cast<std::streamsize>(segments_[i + 1] * bytes_));
    }
    return static_cast<bool>(out);
  }

 private:
  int64_t bytes_;
  std::vector<unsigned char> dense_;
  std::vector<int64_t> segments_;  // (first element, elements) pairs
  std::shared_ptr<unsigned char> reservation_;
};

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

}  // namespace emulation
}  // namespace lkconv
