// Runs the CUDA-core kernels of csrc/ (blocked.cuh, direct_conv.cuh, direct_weight_grad.cuh) on the host, block after
// block, each block with one std::thread per CUDA thread (host_harness.h), launched as conv.cu, blocked.cu and
// weight_grad.cu launch them.
//
// Usage: cuda_core_host forward|input_grad|weight_grad IN OUT. IN starts with 12 int64 fields: dtype, kernel_h,
// kernel_w, multiplier, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, `extra` and the form; then two
// maps and the raw tensors (a map's span, or its segments: host_harness.h):
//   forward:     extra = has_bias; form 0 blocked, 1 tiled, 2 general. Maps: input, output. Tensors: the input,
//                the output, the (C*m, 1, kh, kw) weight, the optional bias. OUT: the output span as the
//                kernel left it.
//   input_grad:  extra unused; forms as the forward. Maps: grad_output, grad_input. Tensors: both spans and the
//                weight. OUT: the grad_input span.
//   weight_grad: extra = splits; form 0 blocked, 1 per tap. Maps: grad_output, input. Tensors: both spans. The
//                partials kernel runs, then weight_grad_reduce. OUT: the splits used (int64), the fp32 workspace
//                (splits x C*m x (kh*kw + 1)), then grad_weight (C*m, 1, kh, kw) and grad_bias (C*m,) in the
//                storage type.

#include "host_harness.h"  // first: its primitives stand in for csrc/primitives.cuh

#include <cmath>

#include "blocked.cuh"
#include "direct_conv.cuh"
#include "direct_weight_grad.cuh"
#include "unit_stride.h"

namespace {

using lkconv::DType;
using lkconv::Geometry;
using namespace lkconv::emulation;

constexpr int kFields = 12;
enum Form { kBlocked = 0, kTiled = 1, kGeneral = 2, kPerTap = 1 };

Geometry geometry_from(const std::vector<int64_t>& h) {
  return {h[3], static_cast<int>(h[1]), static_cast<int>(h[2]), static_cast<int>(h[4]), static_cast<int>(h[5]),
          static_cast<int>(h[6]), static_cast<int>(h[7]), static_cast<int>(h[8]), static_cast<int>(h[9])};
}

// blocked_conv's launch: 4 x 8 threads for maps up to 32 wide, else 8 x 8.
template <typename T, int TX, int TY>
void run_blocked_with(const lkconv::UnitStrideArgs& args) {
  namespace b = lkconv::blocked;
  const b::Tiling t = b::plan<T, TX, TY>(args);
  if (t.shared_bytes > b::kSharedLimit) fail("the blocked kernel's tile does not fit in shared memory");
  emulate_grid(t.blocks, TX * TY, t.shared_bytes, [&] { b::conv_kernel<T, TX, TY>(args, t); });
}

template <typename T>
void run_blocked(const lkconv::UnitStrideArgs& args) {
  lkconv::blocked::narrow(args.dst.w) ? run_blocked_with<T, 4, 8>(args) : run_blocked_with<T, 8, 8>(args);
}

template <typename T>
void run_tiled(const lkconv::direct_conv::Correlation& c) {
  namespace dc = lkconv::direct_conv;
  const dc::Tiling t = dc::plan(c);
  if (!dc::fits(t)) fail("the tiled kernel's source tile does not fit in shared memory");
  emulate_grid(t.blocks, dc::kThreads, t.shared_bytes, [&] { dc::tiled_kernel<T>(c, t); });
}

// The general kernels: one output per thread, kGeneralThreads per block.
template <typename Args>
void run_general(const Args& args, int64_t total, void (*kernel)(Args, int64_t)) {
  namespace dc = lkconv::direct_conv;
  emulate_grid(lkconv::cdiv(total, dc::kGeneralThreads), dc::kGeneralThreads, 0, [&] { kernel(args, total); });
}

bool unit(const Geometry& g) { return lkconv::unit_stride_and_dilation(g); }

// What every mode reads first: the fields, then both maps' storage.
struct Request {
  explicit Request(std::ifstream& in)
      : fields(read_fields(in, kFields + 2 * kMapFields)),
        dtype(static_cast<DType>(fields[0])),
        conv(geometry_from(fields)),
        first(in, dtype, fields.data() + kFields),
        second(in, dtype, fields.data() + kFields + kMapFields),
        first_map(map_from(fields.data() + kFields, first.data())),
        second_map(map_from(fields.data() + kFields + kMapFields, second.data())) {}

  std::vector<int64_t> fields;
  DType dtype;
  Geometry conv;
  MapStorage first, second;
  lkconv::Map first_map, second_map;
};

int forward(std::ifstream& in, const char* out_path) {
  Request r(in);
  const std::vector<int64_t>& h = r.fields;
  const DType dtype = r.dtype;
  const bool has_bias = h[10] != 0;
  const int64_t filters = r.second_map.c;
  std::vector<unsigned char> weight = read_elements(in, dtype, filters * h[1] * h[2]);
  std::vector<unsigned char> bias = has_bias ? read_elements(in, dtype, filters) : std::vector<unsigned char>();
  const lkconv::ForwardArgs args{dtype, false, r.conv, r.first_map, r.second_map, weight.data(),
                                 has_bias ? bias.data() : nullptr};
  with_type(dtype, [&]<typename T>() {
    switch (h[11]) {
      case kBlocked:
        if (!unit(args.conv)) fail("the blocked kernel runs at stride 1 and dilation 1 only");
        run_blocked<T>(lkconv::forward_unit_stride(args));
        break;
      case kTiled: run_tiled<T>(lkconv::direct_conv::forward_correlation(args)); break;
      default: run_general(args, lkconv::direct_conv::numel(args.output), lkconv::direct_conv::forward_general<T>);
    }
  });
  return r.second.write(out_path) ? 0 : 4;
}

int input_grad(std::ifstream& in, const char* out_path) {
  Request r(in);
  const std::vector<int64_t>& h = r.fields;
  const DType dtype = r.dtype;
  std::vector<unsigned char> weight = read_elements(in, dtype, r.first_map.c * h[1] * h[2]);
  const lkconv::InputGradArgs args{dtype, false, r.conv, r.first_map, r.second_map, weight.data()};
  with_type(dtype, [&]<typename T>() {
    switch (h[11]) {
      case kBlocked:
        if (!unit(args.conv)) fail("the blocked kernel runs at stride 1 and dilation 1 only");
        run_blocked<T>(lkconv::input_grad_unit_stride(args));
        break;
      case kTiled:
        if (args.conv.stride_h != 1 || args.conv.stride_w != 1) fail("the tiled input grad runs at stride 1 only");
        run_tiled<T>(lkconv::direct_conv::input_grad_correlation(args));
        break;
      default:
        run_general(args, lkconv::direct_conv::numel(args.grad_input), lkconv::direct_conv::input_grad_general<T>);
    }
  });
  return r.second.write(out_path) ? 0 : 4;
}

int weight_grad(std::ifstream& in, const char* out_path) {
  namespace dw = lkconv::direct_weight_grad;
  Request r(in);
  const std::vector<int64_t>& h = r.fields;
  const DType dtype = r.dtype;
  const int64_t channels = r.first_map.c, taps = h[1] * h[2], splits = h[10];
  std::vector<float> workspace(static_cast<size_t>(splits * channels * (taps + 1)), std::nanf(""));
  std::vector<unsigned char> grad_weight(static_cast<size_t>(channels * taps * element_bytes(dtype)), 0xa5);
  std::vector<unsigned char> grad_bias(static_cast<size_t>(channels * element_bytes(dtype)), 0xa5);
  const lkconv::WeightGradArgs args{dtype, false, r.conv, r.first_map, r.second_map, workspace.data(), splits,
                                    grad_weight.data(), grad_bias.data()};
  const int64_t blocks = channels * splits;
  with_type(dtype, [&]<typename T>() {
    if (h[11] == kBlocked) {
      if (!unit(args.conv)) fail("the blocked weight grad runs at stride 1 and dilation 1 only");
      if (!dw::blocked_fits<T>(args.conv.kernel_h, args.conv.kernel_w)) {
        fail("the blocked weight grad's strips do not fit in shared memory");
      }
      const dw::BlockedLayout layout = dw::blocked_layout<T>(args);
      emulate_grid(blocks, dw::kBlockedThreads, layout.shared_bytes,
                   [&] { dw::blocked_partials_kernel<T>(layout)(args, dw::rows_per_split(args), layout); });
    } else {
      emulate_grid(blocks, dw::kThreads, dw::kRowChunkBytes,
                   [&] { dw::weight_grad_partials<T>(args, dw::rows_per_split(args)); });
    }
    run_reduce<T>(args);
  });
  return write_weight_grad(out_path, args.splits, workspace, grad_weight, grad_bias) ? 0 : 4;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 4 ? argv[1] : "";
  if (mode != "forward" && mode != "input_grad" && mode != "weight_grad") {
    std::fprintf(stderr, "usage: %s forward|input_grad|weight_grad IN OUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[2], std::ios::binary);
  if (mode == "forward") return forward(in, argv[3]);
  return mode == "input_grad" ? input_grad(in, argv[3]) : weight_grad(in, argv[3]);
}
