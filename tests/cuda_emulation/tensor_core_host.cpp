// Runs csrc/tensor_core.cuh's kernel on the host, block after block, each with one std::thread per CUDA thread.
//
// Usage: tensor_core_host IN OUT. IN holds 26 int64 (dtype, kernel_h, kernel_w, multiplier, origin_h, origin_w,
// flip, has_bias, then for src and dst each: n, c, h, w, four element strides, span), then the src span, the dst
// span, the (C*m, 1, kh, kw) weight and the optional bias as raw 16-bit elements. OUT receives the dst span. Every
// buffer is allocated with its exact span, so AddressSanitizer (the test builds with it) reports any access outside
// a tensor, as compute-sanitizer would on a GPU.

#include "emulated_primitives.h"  // first: it stands in for csrc/mma_primitives.cuh

#include <cstdio>
#include <fstream>
#include <thread>

#include "tensor_core.cuh"

namespace {

using lkconv::DType;
using lkconv::Map;
using lkconv::UnitStrideArgs;

std::vector<uint16_t> read_elements(std::ifstream& in, int64_t count) {
  std::vector<uint16_t> values(static_cast<size_t>(count));
  in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(count * 2));
  if (!in) lkconv::emulation::fail("input file too short");
  return values;
}

Map map_from(const int64_t* fields, void* data) {
  return {data, fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], fields[6], fields[7]};
}

template <typename T, int MT>
void run(const UnitStrideArgs& args) {
  using namespace lkconv;
  const tensor_core::Tiling t =
      tensor_core::plan(MT, args.kernel_h, args.kernel_w, args.dst.n * args.dst.c, args.dst.h, args.dst.w);
  if (t.shared_bytes > tensor_core::kSharedLimit) emulation::fail("the tiles do not fit in shared memory");
  for (int64_t b = 0; b < t.blocks; ++b) {
    emulation::Block block;
    block.index = b;
    block.shared.assign(static_cast<size_t>(t.shared_bytes), 0xa5);  // garbage, as on a GPU
    block.all_threads = std::make_unique<std::barrier<>>(tensor_core::kThreads);
    for (int w = 0; w < tensor_core::kThreads / 32; ++w) block.warps.push_back(std::make_unique<std::barrier<>>(32));
    block.exchange.resize(tensor_core::kThreads / 32);
    std::vector<std::thread> threads;
    for (int i = 0; i < tensor_core::kThreads; ++i) {
      threads.emplace_back([&block, &args, &t, i] {
        emulation::current_block = &block;
        emulation::current_thread = i;
        tensor_core::conv_kernel<T, MT>(args, t);
      });
    }
    for (auto& thread : threads) thread.join();
  }
}

template <typename T>
void run_for_height(const UnitStrideArgs& args) {
  lkconv::tensor_core::m_tiles_for(args.dst.h) == 2 ? run<T, 2>(args) : run<T, 1>(args);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  int64_t h[26];
  in.read(reinterpret_cast<char*>(h), sizeof h);
  std::vector<uint16_t> src = read_elements(in, h[16]);
  std::vector<uint16_t> dst = read_elements(in, h[25]);
  const int64_t filters = h[6] ? h[9] : h[18];  // C*m: the src channels of the input grad, the dst ones of the forward
  std::vector<uint16_t> weight = read_elements(in, filters * h[1] * h[2]);
  std::vector<uint16_t> bias = h[7] ? read_elements(in, filters) : std::vector<uint16_t>();

  UnitStrideArgs args{static_cast<DType>(h[0]), map_from(h + 8, src.data()), map_from(h + 17, dst.data()),
                      weight.data(), h[7] ? bias.data() : nullptr, static_cast<int>(h[1]), static_cast<int>(h[2]),
                      h[3], h[4], h[5], h[6] != 0};
  switch (args.dtype) {
    case DType::Float16: run_for_height<__half>(args); break;
    case DType::BFloat16: run_for_height<__nv_bfloat16>(args); break;
    case DType::Float32: lkconv::emulation::fail("the tensor-core kernel takes fp16 or bf16");
  }
  std::ofstream out(argv[2], std::ios::binary);
  out.write(reinterpret_cast<const char*>(dst.data()), static_cast<std::streamsize>(dst.size() * 2));
  return out ? 0 : 4;
}
