"""Row-form block-wise implicit GEMM for the depthwise forward and input-grad passes (ARCHITECTURE.md §4.2).

A program owns one destination channel, BLOCK_M destination rows (batch and height flattened) and BLOCK_W
destination columns. For each kernel row r it multiplies the matching source rows (BLOCK_M x BLOCK_J source
columns) by a banded Toeplitz block B_r[j, t] = w[r, tap(j, t)] gathered from the filter on the fly, so every
loaded element feeds BLOCK_W (or BLOCK_M) multiply-adds on the tensor cores.

The forward pass reads x and writes y. The input grad (TRANSPOSED) reads dy and writes dx through the same tap
relation, which covers stride, dilation and depth multipliers without rotating or dilating anything in memory.
Kernel rows and source columns that only ever meet padding are skipped.

At stride 1 and dilation 1 the tap is (source column - destination column) plus a constant, so B_r's columns are
runs of one filter row. With SHIFTED the backend hands in the filter rows zero-padded and in 8 copies shifted by
0..7 elements (triton_backend.shifted_filter_rows); every run of 8 Toeplitz entries is then one aligned 16-byte
vector, which Triton copies asynchronously into shared memory like the source tile, instead of a masked gather of
single elements.
"""

import triton
import triton.language as tl

from .common import (destination_block, mma, reachable_band, shifted_filter_offsets, source_row, toeplitz_taps, vector_run,
                     vector_strides)


@triton.jit
def depthwise_rows_kernel(
    src_ptr, weight_ptr, bias_ptr, dst_ptr,
    batch, dst_height, dst_width, src_height, src_width,
    kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, multiplier,
    src_stride_n, src_stride_c, src_stride_h, src_stride_w,
    w_stride_c, w_stride_h, w_stride_w,
    dst_stride_n, dst_stride_c, dst_stride_h, dst_stride_w,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, OPERANDS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr, ALIGN: tl.constexpr,
    SHIFTED: tl.constexpr,
):
    # Channel slowest, so neighbouring programs share the filter and the halo rows in L2.
    pid = tl.program_id(0)
    total_rows = batch * dst_height
    col_blocks = tl.cdiv(dst_width, BLOCK_W)
    blocks_per_channel = tl.cdiv(total_rows, BLOCK_M) * col_blocks
    channel = pid // blocks_per_channel
    row_block = (pid % blocks_per_channel) // col_blocks
    col_block = pid % col_blocks

    row_ok, image, dst_row, cols, col_ok = destination_block(
        row_block, col_block, total_rows, dst_height, dst_width, BLOCK_M, BLOCK_W)

    # The kernel rows and source columns this block can reach; everything else is padding.
    r_begin, r_end, c_begin, c_end = reachable_band(
        dst_row, row_ok, cols, col_ok, dst_height, dst_width, src_height, src_width, kernel_h, kernel_w,
        stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, TRANSPOSED)
    source_channels = multiplier if TRANSPOSED else 1

    # Whole-vector source loads (common.py): the widened columns meet no tap, so the Toeplitz operand is zero there.
    if ALIGN > 1:
        c_begin, c_end = vector_run(c_begin, c_end, src_width, ALIGN)
        src_stride_n, src_stride_c, src_stride_h = vector_strides(src_stride_n, src_stride_c, src_stride_h, ALIGN)
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    # The input grad of a depth multiplier m sums the m output channels fed by one input channel.
    for k in range(0, source_channels):
        if TRANSPOSED:
            src_channel = channel * multiplier + k
            w_channel = src_channel
        else:
            src_channel = channel // multiplier
            w_channel = channel
        src_row_base = image * src_stride_n + src_channel.to(tl.int64) * src_stride_c
        w_base = weight_ptr + w_channel.to(tl.int64) * w_stride_c
        for c0 in range(c_begin, c_end, BLOCK_J):
            if ALIGN > 1:
                c0 = tl.multiple_of(c0, ALIGN)
            src_cols = c0 + tl.arange(0, BLOCK_J)
            src_col_ok = src_cols < c_end
            if SHIFTED:
                tap_offsets = shifted_filter_offsets(c0, col_block, pad_left, kernel_w, w_stride_w, TRANSPOSED,
                                                     BLOCK_W, BLOCK_J)
            else:
                tap, tap_ok = toeplitz_taps(src_cols, cols, pad_left, stride_w, dilation_w, kernel_w, TRANSPOSED)
                tap_offsets = tap * w_stride_w
            src_col_offsets = src_cols * src_stride_w
            for r in range(r_begin, r_end):
                src_row, src_row_ok = source_row(dst_row, row_ok, r, src_height, stride_h, pad_top, dilation_h,
                                                 TRANSPOSED)
                src_offsets = (src_row_base + src_row.to(tl.int64) * src_stride_h)[:, None] + src_col_offsets[None, :]
                a = tl.load(src_ptr + src_offsets, mask=src_row_ok[:, None] & src_col_ok[None, :], other=0.0)
                if SHIFTED:  # zero-padded: no mask
                    b = tl.load(w_base + r * w_stride_h + tap_offsets)
                else:
                    b = tl.load(w_base + r * w_stride_h + tap_offsets, mask=tap_ok, other=0.0)
                acc = mma(a, b, acc, PRECISION, OPERANDS_FP32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + channel).to(tl.float32)
    dst_offsets = (image * dst_stride_n + channel.to(tl.int64) * dst_stride_c
                   + dst_row.to(tl.int64) * dst_stride_h)[:, None] + (cols * dst_stride_w)[None, :]
    tl.store(dst_ptr + dst_offsets, acc.to(dst_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
