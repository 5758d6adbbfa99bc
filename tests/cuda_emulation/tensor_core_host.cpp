// Runs the tensor-core kernels of csrc/ (tensor_core.cuh, tensor_core_whole_map.cuh, tensor_core_weight_grad.cuh,
// tensor_core_whole_map_weight_grad.cuh) on the host, block after block, each block with one std::thread per CUDA
// thread (host_harness.h).
//
// Usage: tensor_core_host conv|weight_grad IN OUT. IN starts with int64 fields, then the raw tensors (a map's span,
// or its segments: host_harness.h; fp32 runs the TF32 path, fp16 and bf16 their own):
//   conv:        dtype, kernel_h, kernel_w, multiplier, origin_h, origin_w, flip, has_bias, whole_map (the form:
//                0 rows, 1 whole map), src map, dst map; then the src span, the dst span, the (C*m, 1, kh, kw)
//                weight and the optional bias.
//                OUT receives the dst span as the kernel left it.
//   weight_grad: dtype, kernel_h, kernel_w, multiplier, pad_top, pad_left, splits, whole_map (the form: 0 rows,
//                1 the Gram-matrix form, which takes the splits weight_grad.cu gives it), grad_output map, input
//                map; then both spans. The partials kernel runs, then weight_grad_reduce. OUT receives the splits
//                used (int64), the fp32 workspace (splits x C*m x (kh*kw + 1), NaN past the splits used), then
//                grad_weight (C*m, 1, kh, kw) and grad_bias (C*m,) in the storage type.

#include "host_harness.h"  // first: its primitives stand in for csrc/primitives.cuh

#include <cmath>

#include "tensor_core.cuh"
#include "tensor_core_weight_grad.cuh"
#include "tensor_core_whole_map.cuh"
#include "tensor_core_whole_map_weight_grad.cuh"

namespace {

using lkconv::DType;
using namespace lkconv::emulation;

// The row-form launch tensor_core.cu makes: rows per warp from the map height.
template <typename T>
void run_rows(const lkconv::UnitStrideArgs& args) {
  namespace tc = lkconv::tensor_core;
  const int m_tiles = tc::m_tiles_for<T>(args.dst.h);
  const tc::Tiling t =
      tc::plan<T>(m_tiles, args.kernel_h, args.kernel_w, args.dst.n * args.dst.c, args.dst.h, args.dst.w);
  if (t.shared_bytes > tc::kSharedLimit) fail("the tiles do not fit in shared memory");
  emulate_grid(t.blocks, tc::kThreads, t.shared_bytes, [&] {
    if constexpr (tc::kMaxMTiles<T> == 2) {
      if (m_tiles == 2) return tc::conv_kernel<T, 2>(args, t);
    }
    tc::conv_kernel<T, 1>(args, t);
  });
}

// The whole-map launch tensor_core.cu makes: images per warp from the batch.
template <typename T>
void run_whole_map(const lkconv::UnitStrideArgs& args) {
  namespace wm = lkconv::tensor_core_whole_map;
  const int m_tiles = wm::m_tiles_for(args.dst.n);
  const wm::Tiling t =
      wm::plan<T>(m_tiles, args.dst.n, args.dst.c, args.src.h, args.src.w, args.dst.h, args.dst.w);
  if (t.shared_bytes > wm::kSharedLimit) fail("the operands do not fit in shared memory");
  emulate_grid(t.blocks, wm::kThreads, t.shared_bytes, [&] {
    m_tiles == 2 ? wm::conv_kernel<T, 2>(args, t) : wm::conv_kernel<T, 1>(args, t);
  });
}

// The launch weight_grad.cu makes for the row form's partial sums.
template <typename T>
void run_weight_grad_rows(const lkconv::WeightGradArgs& args) {
  namespace wg = lkconv::tensor_core_weight_grad;
  const wg::Tiling t = wg::plan(args.conv.kernel_h, args.conv.kernel_w, args.grad_output.n * args.grad_output.h,
                                args.splits);
  emulate_grid(args.grad_output.c * args.splits * t.tap_tiles, wg::kThreads, wg::Layout<T>::kSharedBytes,
               [&] { wg::partials_kernel<T>(args, t); });
}

// The launch weight_grad.cu makes for the Gram-matrix form's partial sums (with the splits it uses).
template <typename T>
void run_weight_grad_whole_map(const lkconv::WeightGradArgs& args) {
  namespace wm = lkconv::tensor_core_whole_map_weight_grad;
  const lkconv::Map &dy = args.grad_output, &x = args.input;
  if (!wm::rows_fit(x.w, dy.w)) fail("map rows wider than a tile");
  const wm::Tiling t = wm::plan<T>(args.conv.kernel_h, args.conv.kernel_w, x.n, args.splits, x.h, x.w, dy.h, dy.w);
  if (t.shared_bytes > wm::kSharedLimit) fail("the operands do not fit in shared memory");
  emulate_grid(dy.c * args.splits, wm::kThreads, t.shared_bytes, [&] { wm::partials_kernel<T>(args, t); });
}

int conv(std::ifstream& in, const char* out_path) {
  const std::vector<int64_t> h = read_fields(in, 9 + 2 * kMapFields);
  const int64_t* src_fields = h.data() + 9;
  const int64_t* dst_fields = src_fields + kMapFields;
  const auto dtype = static_cast<DType>(h[0]);
  MapStorage src(in, dtype, src_fields), dst(in, dtype, dst_fields);
  const int64_t filters = h[6] ? src_fields[1] : dst_fields[1];  // C*m: the input grad's src, the forward's dst
  std::vector<unsigned char> weight = read_elements(in, dtype, filters * h[1] * h[2]);
  std::vector<unsigned char> bias = h[7] ? read_elements(in, dtype, filters) : std::vector<unsigned char>();
  const lkconv::UnitStrideArgs args{dtype, map_from(src_fields, src.data()),
                                    map_from(dst_fields, dst.data()), weight.data(), h[7] ? bias.data() : nullptr,
                                    static_cast<int>(h[1]), static_cast<int>(h[2]), h[3], h[4], h[5], h[6] != 0};
  with_type(args.dtype, [&]<typename T>() { h[8] ? run_whole_map<T>(args) : run_rows<T>(args); });
  return dst.write(out_path) ? 0 : 4;
}

int weight_grad(std::ifstream& in, const char* out_path) {
  const std::vector<int64_t> h = read_fields(in, 8 + 2 * kMapFields);
  const int64_t* dy_fields = h.data() + 8;
  const int64_t* x_fields = dy_fields + kMapFields;
  const auto dtype = static_cast<DType>(h[0]);
  MapStorage dy(in, dtype, dy_fields), x(in, dtype, x_fields);
  const int kernel_h = static_cast<int>(h[1]), kernel_w = static_cast<int>(h[2]);
  const int64_t splits = h[6], channels = dy_fields[1], taps = int64_t{kernel_h} * kernel_w;
  std::vector<float> workspace(static_cast<size_t>(splits * channels * (taps + 1)), std::nanf(""));
  std::vector<unsigned char> grad_weight(static_cast<size_t>(channels * taps * element_bytes(dtype)), 0xa5);
  std::vector<unsigned char> grad_bias(static_cast<size_t>(channels * element_bytes(dtype)), 0xa5);
  const lkconv::Geometry conv{h[3], kernel_h, kernel_w, 1, 1, static_cast<int>(h[4]), static_cast<int>(h[5]), 1, 1};
  lkconv::WeightGradArgs args{dtype, true, conv, map_from(dy_fields, dy.data()), map_from(x_fields, x.data()),
                              workspace.data(), splits, grad_weight.data(), grad_bias.data()};
  with_type(args.dtype, [&]<typename T>() {
    if (h[7]) {
      args.splits = lkconv::tensor_core_whole_map_weight_grad::splits_for<T>(args.input.n, splits);
      run_weight_grad_whole_map<T>(args);
    } else {
      run_weight_grad_rows<T>(args);
    }
    run_reduce<T>(args);
  });
  return write_weight_grad(out_path, args.splits, workspace, grad_weight, grad_bias) ? 0 : 4;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 4 ? argv[1] : "";
  if (mode != "conv" && mode != "weight_grad") {
    std::fprintf(stderr, "usage: %s conv|weight_grad IN OUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[2], std::ios::binary);
  return mode == "conv" ? conv(in, argv[3]) : weight_grad(in, argv[3]);
}
