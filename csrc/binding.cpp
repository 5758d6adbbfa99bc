// The torch binding of the CUDA kernels: ops in the `lkconv` namespace, implemented for CUDA tensors.
//
// The Python `cuda` backend allocates every output (and the weight-grad workspace) and calls these ops, which
// check their arguments, set the device, take the device's current stream and launch. Only c10/ATen core headers
// are used, so the extension builds against a CPU-only torch too; on such a build the ops exist but no CUDA
// tensor can reach them.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "depthwise.h"

namespace {

using at::Tensor;

lkconv::DType dtype_of(c10::ScalarType type, const char* name) {
  switch (type) {
    case at::kFloat: return lkconv::DType::Float32;
    case at::kHalf: return lkconv::DType::Float16;
    case at::kBFloat16: return lkconv::DType::BFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16; got ", type);
  }
}

lkconv::Map map_of(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (N, C, H, W); got ", t.dim(), "-D");
  return {t.data_ptr(), t.size(0), t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2),
          t.stride(3)};
}

void check_like(const Tensor& t, const Tensor& reference, const char* name) {
  TORCH_CHECK(t.device() == reference.device(), name, " must be on ", reference.device(), "; got ", t.device());
  TORCH_CHECK(t.scalar_type() == reference.scalar_type(), name, " must have dtype ", reference.scalar_type(),
              "; got ", t.scalar_type());
}

// The kernels keep kernel sizes, strides, paddings and dilations in 32-bit ints.
constexpr int64_t kMaxGeometry = (int64_t{1} << 30);

void check_pair(c10::IntArrayRef values, size_t length, int64_t minimum, const char* name) {
  TORCH_CHECK(values.size() == length, name, " must have ", length, " entries; got ", values.size());
  for (int64_t v : values) {
    TORCH_CHECK(v >= minimum && v <= kMaxGeometry, name, " entries must be in [", minimum, ", 2^30]; got ", values);
  }
}

// The conv geometry from the weight (C*m, 1, kh, kw) and the int lists the Python ops pass.
lkconv::Geometry geometry(const Tensor& weight, const char* name, int64_t channels, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1, name, " must have shape (C*m, 1, kh, kw); got ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), name, " must be contiguous; got strides ", weight.strides());
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1 && weight.size(2) * weight.size(3) <= kMaxGeometry, name,
              " kernel sizes must be >= 1 with an area (kh * kw) <= 2^30; got ", weight.sizes());
  TORCH_CHECK(channels > 0 && weight.size(0) > 0 && weight.size(0) % channels == 0, name,
              ".size(0) must be a positive multiple of the ", channels, " input channels; got ", weight.size(0));
  check_pair(stride, 2, 1, "stride");
  check_pair(padding, 4, 0, "padding");
  check_pair(dilation, 2, 1, "dilation");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(dilation[i] * (weight.size(2 + i) - 1) <= kMaxGeometry, "dilation * (kernel size - 1) must be <= 2^30 "
                "(the kernels index taps in 32 bits); got dilation ", dilation, " with kernel ", weight.sizes());
  }
  return {weight.size(0) / channels, static_cast<int>(weight.size(2)), static_cast<int>(weight.size(3)),
          static_cast<int>(stride[0]), static_cast<int>(stride[1]), static_cast<int>(padding[0]),
          static_cast<int>(padding[1]), static_cast<int>(dilation[0]), static_cast<int>(dilation[1])};
}

int64_t out_size(int64_t size, int64_t kernel, int64_t stride, int64_t before, int64_t after, int64_t dilation) {
  return (size + before + after - dilation * (kernel - 1) - 1) / stride + 1;
}

// (input (N, C, H, W), output (N, C*m, OH, OW)) must agree with the geometry, padding (top, left, bottom, right).
void check_shapes(const Tensor& input, const Tensor& output, const Tensor& weight, c10::IntArrayRef stride,
                  c10::IntArrayRef padding, c10::IntArrayRef dilation, const char* input_name,
                  const char* output_name) {
  const std::vector<int64_t> expected = {
      input.size(0), weight.size(0),
      out_size(input.size(2), weight.size(2), stride[0], padding[0], padding[2], dilation[0]),
      out_size(input.size(3), weight.size(3), stride[1], padding[1], padding[3], dilation[1])};
  TORCH_CHECK(output.sizes() == c10::IntArrayRef(expected), output_name, " must have shape ", expected, " for ",
              input_name, " of shape ", input.sizes(), "; got ", output.sizes());
  // The launchers divide by map widths and heights (tile rows per map row, for one).
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0 && expected[2] > 0 && expected[3] > 0, input_name,
              " and ", output_name, " must have heights and widths >= 1; got ", input.sizes(), " and ", expected);
}

// The data of an optional per-channel vector (bias, grad_bias), checked against `like` and the channel count; null
// when absent.
void* channel_vector(const std::optional<Tensor>& t, const Tensor& like, int64_t channels, const char* name) {
  if (!t.has_value()) return nullptr;
  check_like(*t, like, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels && t->is_contiguous(), name, " must be a contiguous (",
              channels, ",) tensor; got ", t->sizes());
  return t->data_ptr();
}

void* current_stream(const Tensor& t) {
  return c10::impl::getDeviceGuardImpl(t.device().type())->getStream(t.device()).native_handle();
}

// A launch's error as an exception: a sticky one (the context is broken, by this or an earlier kernel) as PyTorch
// raises CUDA errors, torch.AcceleratorError, which `auto` lets through instead of falling back.
void check_launch(int code, const char* op) {
  if (code == 0) return;
  const std::string message = std::string("lkconv::") + op + ": CUDA launch failed: " + lkconv::error_string(code);
  if (lkconv::is_sticky_error(code)) {
    throw c10::AcceleratorError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, code, message);
  }
  TORCH_CHECK(false, message);
}

void forward(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, c10::IntArrayRef stride,
             c10::IntArrayRef padding, c10::IntArrayRef dilation, bool allow_tf32, const Tensor& output) {
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor; got ", input.device());
  check_like(weight, input, "weight");
  check_like(output, input, "output");
  lkconv::ForwardArgs args{dtype_of(input.scalar_type(), "input"), allow_tf32,
                           geometry(weight, "weight", input.size(1), stride, padding, dilation),
                           map_of(input, "input"), map_of(output, "output"), weight.data_ptr(),
                           channel_vector(bias, input, weight.size(0), "bias")};
  check_shapes(input, output, weight, stride, padding, dilation, "input", "output");
  c10::DeviceGuard guard(input.device());
  check_launch(lkconv::forward(args, current_stream(input)), "cuda_forward");
}

void input_grad(const Tensor& grad_output, const Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding,
                c10::IntArrayRef dilation, bool allow_tf32, const Tensor& grad_input) {
  TORCH_CHECK(grad_output.is_cuda(), "grad_output must be a CUDA tensor; got ", grad_output.device());
  check_like(weight, grad_output, "weight");
  check_like(grad_input, grad_output, "grad_input");
  lkconv::InputGradArgs args{dtype_of(grad_output.scalar_type(), "grad_output"), allow_tf32,
                             geometry(weight, "weight", grad_input.size(1), stride, padding, dilation),
                             map_of(grad_output, "grad_output"), map_of(grad_input, "grad_input"), weight.data_ptr()};
  check_shapes(grad_input, grad_output, weight, stride, padding, dilation, "grad_input", "grad_output");
  c10::DeviceGuard guard(grad_output.device());
  check_launch(lkconv::input_grad(args, current_stream(grad_output)), "cuda_input_grad");
}

void weight_grad(const Tensor& grad_output, const Tensor& input, c10::IntArrayRef stride, c10::IntArrayRef padding,
                 c10::IntArrayRef dilation, bool allow_tf32, const Tensor& workspace, const Tensor& grad_weight,
                 const std::optional<Tensor>& grad_bias) {
  TORCH_CHECK(grad_output.is_cuda(), "grad_output must be a CUDA tensor; got ", grad_output.device());
  check_like(input, grad_output, "input");
  check_like(grad_weight, grad_output, "grad_weight");
  TORCH_CHECK(workspace.device() == grad_output.device() && workspace.scalar_type() == at::kFloat &&
                  workspace.is_contiguous(),
              "workspace must be a contiguous float32 tensor on ", grad_output.device(), "; got ",
              workspace.scalar_type(), " on ", workspace.device(), workspace.is_contiguous() ? "" : ", not contiguous");
  lkconv::WeightGradArgs args{dtype_of(grad_output.scalar_type(), "grad_output"), allow_tf32,
                              geometry(grad_weight, "grad_weight", input.size(1), stride, padding, dilation),
                              map_of(grad_output, "grad_output"), map_of(input, "input"),
                              workspace.data_ptr<float>(), 0, grad_weight.data_ptr(), nullptr};
  check_shapes(input, grad_output, grad_weight, stride, padding, dilation, "input", "grad_output");
  const int64_t per_split = grad_weight.size(0) * (grad_weight.size(2) * grad_weight.size(3) + 1);
  TORCH_CHECK(workspace.numel() > 0 && workspace.numel() % per_split == 0, "workspace must hold a positive multiple "
              "of ", per_split, " floats (C*m * (kh*kw + 1) per split); got ", workspace.numel());
  args.splits = workspace.numel() / per_split;
  TORCH_CHECK(args.splits <= 65535, "workspace holds ", args.splits, " splits; at most 65535 are supported");
  args.grad_bias = channel_vector(grad_bias, grad_output, grad_weight.size(0), "grad_bias");
  c10::DeviceGuard guard(grad_output.device());
  check_launch(lkconv::weight_grad(args, current_stream(grad_output)), "cuda_weight_grad");
}

std::string kernel_name(const std::string& pass_name, c10::ScalarType dtype, bool allow_tf32,
                        c10::IntArrayRef input_size, c10::IntArrayRef output_size, c10::IntArrayRef kernel,
                        c10::IntArrayRef stride, c10::IntArrayRef dilation) {
  const lkconv::DType type = dtype_of(dtype, "dtype");
  TORCH_CHECK(input_size.size() == 4, "input_size must be (N, C, H, W); got ", input_size);
  TORCH_CHECK(input_size[0] >= 0 && input_size[1] >= 0 && input_size[2] >= 1 && input_size[3] >= 1,
              "input_size must have N, C >= 0 and H, W >= 1; got ", input_size);
  TORCH_CHECK(output_size.size() == 2 && output_size[0] > 0 && output_size[1] > 0,
              "output_size must be (OH, OW), both positive; got ", output_size);
  check_pair(kernel, 2, 1, "kernel");
  TORCH_CHECK(kernel[0] * kernel[1] <= kMaxGeometry, "kernel area (kh * kw) must be <= 2^30; got ", kernel);
  check_pair(stride, 2, 1, "stride");
  check_pair(dilation, 2, 1, "dilation");
  const lkconv::Geometry conv{1, static_cast<int>(kernel[0]), static_cast<int>(kernel[1]), static_cast<int>(stride[0]),
                              static_cast<int>(stride[1]), 0, 0, static_cast<int>(dilation[0]),
                              static_cast<int>(dilation[1])};
  const lkconv::MapSizes sizes{input_size[0], input_size[2], input_size[3], output_size[0], output_size[1]};
  if (pass_name == "forward") return lkconv::kernel_name(lkconv::Pass::Forward, type, allow_tf32, conv, sizes);
  if (pass_name == "input_grad") return lkconv::kernel_name(lkconv::Pass::InputGrad, type, allow_tf32, conv, sizes);
  if (pass_name == "weight_grad") return lkconv::kernel_name(lkconv::Pass::WeightGrad, type, allow_tf32, conv, sizes);
  TORCH_CHECK(false, "pass_name must be forward, input_grad or weight_grad; got '", pass_name, "'");
}

std::vector<int64_t> cuda_versions() { return {lkconv::runtime_version(), lkconv::driver_version()}; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(lkconv, m) {
  // allow_tf32: fp32 may run on tensor cores as TF32 (the Python backend passes PyTorch's conv TF32 setting).
  m.def("cuda_forward(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
        "bool allow_tf32, Tensor(a!) output) -> ()");
  m.def("cuda_input_grad(Tensor grad_output, Tensor weight, int[] stride, int[] padding, int[] dilation, "
        "bool allow_tf32, Tensor(a!) grad_input) -> ()");
  m.def("cuda_weight_grad(Tensor grad_output, Tensor input, int[] stride, int[] padding, int[] dilation, "
        "bool allow_tf32, Tensor(a!) workspace, Tensor(b!) grad_weight, Tensor(c!)? grad_bias) -> ()");
  m.def("cuda_kernel_name(str pass_name, ScalarType dtype, bool allow_tf32, int[] input_size, int[] output_size, "
        "int[] kernel, int[] stride, int[] dilation) -> str",
        &kernel_name);
  // (the CUDA runtime lkconv._C links, the newest the driver supports), as CUDA writes them: 13000 for 13.0.
  m.def("cuda_versions() -> int[]", &cuda_versions);
}

TORCH_LIBRARY_IMPL(lkconv, CUDA, m) {
  m.impl("cuda_forward", &forward);
  m.impl("cuda_input_grad", &input_grad);
  m.impl("cuda_weight_grad", &weight_grad);
}

// `import lkconv._C` loads this library, which registers the ops above; the module itself is empty.
extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lkconv's CUDA kernels (ops in torch.ops.lkconv)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
