"""Small Triton helpers shared by the depthwise kernels: the tensor-core product, the filter-tap lookup, the band of
kernel rows and source columns a row-form block reaches, the shifted filter rows' offsets, and the widening of
column runs to whole vectors."""

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


@triton.jit
def output_index(in_index, tap, begin_pad, stride, dilation, out_size):
    """Which output index a filter tap joins to input index `in_index` along one axis (the weight grad's Hankel
    operand), and whether it exists: out = (in + begin_pad - tap * dilation) / stride, exactly, inside the map."""
    numerator = in_index + begin_pad - tap * dilation
    out_index = numerator // stride
    valid = (numerator >= 0) & (numerator % stride == 0) & (out_index < out_size)
    return out_index, valid


@triton.jit
def split_count(total_rows, rows_per_split):
    """How many weight-grad splits divide total_rows (>= 1), as the host's row_splits does; tl.cdiv would add
    rows_per_split - 1 first, which passes 2**31 for the largest batches."""
    return (total_rows - 1) // rows_per_split + 1


@triton.jit
def split_rows(split, rows_per_split, total_rows):
    """The output rows [begin, end) a weight-grad split sums. The host makes every split's begin fall below
    total_rows (< 2**31), but begin + rows_per_split may pass 2**31, where int32 wraps."""
    begin = split * rows_per_split
    return begin, begin + tl.minimum(rows_per_split, total_rows - begin)


@triton.jit
def input_columns_reached(q_block, BLOCK_Q: tl.constexpr, kernel_w, out_width, in_width, stride_w, pad_left,
                          dilation_w):
    """The input columns [begin, end) that a tile of BLOCK_Q kernel columns meets over the whole output row."""
    last_tap_w = tl.minimum(q_block * BLOCK_Q + BLOCK_Q, kernel_w) - 1
    begin = tl.maximum(q_block * BLOCK_Q * dilation_w - pad_left, 0)
    end = tl.minimum((out_width - 1) * stride_w + last_tap_w * dilation_w - pad_left + 1, in_width)
    return begin, end


@triton.jit
def destination_block(row_block, col_block, total_rows, dst_height, dst_width, BLOCK_M: tl.constexpr,
                      BLOCK_W: tl.constexpr):
    """A row-form block's destination rows (batch and height flattened: which are real, their image and row) and
    columns (which are real)."""
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < total_rows
    cols = col_block * BLOCK_W + tl.arange(0, BLOCK_W)
    return row_ok, (rows // dst_height).to(tl.int64), rows % dst_height, cols, cols < dst_width


@triton.jit
def reachable_band(dst_row, row_ok, cols, col_ok, dst_height, dst_width, src_height, src_width, kernel_h, kernel_w,
                   stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, TRANSPOSED: tl.constexpr):
    """The kernel rows [r_begin, r_end) and source columns [c_begin, c_end) that a row-form block's destination rows
    and columns (those marked ok) can reach; everything else meets only padding."""
    first_row = tl.min(tl.where(row_ok, dst_row, dst_height), axis=0)
    last_row = tl.max(tl.where(row_ok, dst_row, 0), axis=0)
    first_col = tl.min(tl.where(col_ok, cols, dst_width), axis=0)
    last_col = tl.max(tl.where(col_ok, cols, 0), axis=0)
    if TRANSPOSED:
        # dst = input rows/cols, src = output rows/cols: in + pad - tap * dilation = out * stride.
        low = first_row + pad_top - (src_height - 1) * stride_h
        r_begin = tl.where(low > 0, (low + dilation_h - 1) // dilation_h, 0)
        r_end = tl.minimum((last_row + pad_top) // dilation_h + 1, kernel_h)
        low = first_col + pad_left - (kernel_w - 1) * dilation_w
        c_begin = tl.where(low > 0, (low + stride_w - 1) // stride_w, 0)
        c_end = tl.minimum((last_col + pad_left) // stride_w + 1, src_width)
    else:
        low = pad_top - last_row * stride_h
        r_begin = tl.where(low > 0, (low + dilation_h - 1) // dilation_h, 0)
        high = src_height - 1 + pad_top - first_row * stride_h
        r_end = tl.where(high >= 0, tl.minimum(high // dilation_h + 1, kernel_h), 0)
        c_begin = tl.maximum(first_col * stride_w - pad_left, 0)
        c_end = tl.minimum(last_col * stride_w - pad_left + (kernel_w - 1) * dilation_w + 1, src_width)
    return r_begin, r_end, c_begin, c_end


@triton.jit
def source_row(dst_row, row_ok, r, src_height, stride_h, pad_top, dilation_h, TRANSPOSED: tl.constexpr):
    """The source row that kernel row r joins to each destination row, and whether it exists."""
    if TRANSPOSED:
        numerator = dst_row + pad_top - r * dilation_h
        src_row = numerator // stride_h
        src_row_ok = row_ok & (numerator >= 0) & (numerator % stride_h == 0) & (src_row < src_height)
    else:
        src_row = dst_row * stride_h + r * dilation_h - pad_top
        src_row_ok = row_ok & (src_row >= 0) & (src_row < src_height)
    return src_row, src_row_ok


@triton.jit
def toeplitz_taps(src_cols, cols, pad_left, stride_w, dilation_w, kernel_w, TRANSPOSED: tl.constexpr):
    """The filter column joining each source column (rows of the result) to each destination column, and whether
    one does: the Toeplitz band of a row-form block."""
    if TRANSPOSED:
        tap, tap_ok = filter_tap(cols[None, :], src_cols[:, None], pad_left, stride_w, dilation_w, kernel_w)
    else:
        tap, tap_ok = filter_tap(src_cols[:, None], cols[None, :], pad_left, stride_w, dilation_w, kernel_w)
    return tap, tap_ok


# The shifted filter rows (SHIFTED, stride 1 and dilation 1): row r of a filter, flipped for the input grad, sits at
# entry SHIFTED_ORIGIN + BLOCK_W of a zero-padded row, and copy s of that row starts s entries later, `shift_stride`
# elements after copy s - 1 (a multiple of 16). The backend builds them (triton_backend.shifted_filter_rows).
SHIFTED_COPIES = tl.constexpr(8)
SHIFTED_ORIGIN = tl.constexpr(8)


@triton.jit
def shifted_filter_offsets(c0, col_block, pad_left, kernel_w, shift_stride, TRANSPOSED: tl.constexpr,
                           BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr):
    """Offsets of the Toeplitz block B[j, t] (source columns c0 + j, destination columns col_block * BLOCK_W + t)
    in a filter row's shifted copies: entry e = base + j - t of the padded row, read from copy e mod 8 at e rounded
    down to a multiple of 8, so that runs of 8 rows of B are contiguous and 8-aligned."""
    if TRANSPOSED:
        # tap = dst + pad - src, i.e. (kernel_w - 1 - tap) of the flipped row = src - dst + kernel_w - 1 - pad.
        base = c0 - col_block * BLOCK_W + kernel_w - 1 - pad_left
    else:
        base = c0 + pad_left - col_block * BLOCK_W  # tap = src + pad - dst
    first = base + SHIFTED_ORIGIN + BLOCK_W - tl.arange(0, BLOCK_W)  # entry of B[0, t]
    shift = first % SHIFTED_COPIES
    column = tl.multiple_of(shift * shift_stride + first - shift, SHIFTED_COPIES)
    return column[None, :] + tl.arange(0, BLOCK_J)[:, None]


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
