"""Small Triton helpers shared by the depthwise kernels: the tensor-core product, the filter-tap lookup, and the
widening of column runs to whole vectors."""

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, OPERANDS_FP32: tl.constexpr):
    """acc += a @ b with fp32 accumulation.

    PRECISION is tl.dot's input_precision for fp32 operands ("ieee" exact, "tf32" where PyTorch allows it).
    OPERANDS_FP32 widens 16-bit operands first; only the Triton interpreter needs it, because it multiplies
    bfloat16 bit patterns as integers. bf16/fp16 products are exact in fp32, so the result is unchanged.
    """
    if OPERANDS_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def filter_tap(in_index, out_index, begin_pad, stride, dilation, kernel_size):
    """Which filter tap joins input index `in_index` to output index `out_index` along one axis.

    in = out * stride + tap * dilation - begin_pad, so tap = (in + begin_pad - out * stride) / dilation.
    Returns the tap and whether it exists (non-negative, divisible by the dilation, inside the kernel).
    """
    numerator = in_index + begin_pad - out_index * stride
    tap = numerator // dilation
    valid = (numerator >= 0) & (numerator % dilation == 0) & (tap < kernel_size)
    return tap, valid


# ALIGN > 1 is the backend's promise (vector_align) that a map's columns are contiguous and that its width, data
# pointer and image, channel and row strides are multiples of ALIGN elements. Runs of columns widened to start and
# end on multiples of ALIGN then load as whole vectors (16 bytes at most); the extra columns stay inside the row.


@triton.jit
def vector_run(begin, end, width, ALIGN: tl.constexpr):
    """The column run [begin, end) widened to whole vectors of ALIGN elements, still inside a row of `width`."""
    return begin // ALIGN * ALIGN, tl.multiple_of(tl.minimum(tl.cdiv(end, ALIGN) * ALIGN, width), ALIGN)


@triton.jit
def vector_strides(stride_n, stride_c, stride_h, ALIGN: tl.constexpr):
    """The strides rounded down to multiples of ALIGN: no change (the backend vouches for them), but the compiler can
    now see the multiple, which tl.multiple_of cannot tell it about a kernel argument."""
    return stride_n // ALIGN * ALIGN, stride_c // ALIGN * ALIGN, stride_h // ALIGN * ALIGN
