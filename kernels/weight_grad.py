"""Depthwise weight (and bias) grad as a small GEMM with a long, deterministic reduction (ARCHITECTURE.md §4.2).

For one output row (n, oh) the weight grad is dW[r, q] += sum_iw X[r, iw] * D[iw, q], where X holds the input
rows that kernel row r reads and D[iw, q] = dy[n, oh, (iw + pad - q * dilation) / stride] is the output-grad
row expanded as a Hankel matrix. Stacking BLOCK_ROWS output rows along the reduction axis turns this into one
tl.dot of (BLOCK_R x BLOCK_ROWS*BLOCK_IW) by (BLOCK_ROWS*BLOCK_IW x BLOCK_Q).

A program owns one channel, one tile of kernel taps and one split of the N*OH output rows, and writes fp32
partials; the caller sums the splits in a fixed order. No atomics, so the result is bit-identical run to run.
The programs holding the first tap tile also sum dy for the bias grad.
"""

import triton
import triton.language as tl

from .common import input_columns_reached, mma, output_index, split_count, split_rows, vector_run, vector_strides


@triton.jit
def depthwise_weight_grad_kernel(
    grad_out_ptr, input_ptr, weight_partial_ptr, bias_partial_ptr,
    batch, out_channels, out_height, out_width, in_height, in_width,
    kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, multiplier,
    rows_per_split,
    grad_out_stride_n, grad_out_stride_c, grad_out_stride_h, grad_out_stride_w,
    in_stride_n, in_stride_c, in_stride_h, in_stride_w,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, OPERANDS_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_IW: tl.constexpr,
    ALIGN: tl.constexpr,
):
    pid = tl.program_id(0)
    total_rows = batch * out_height
    r_blocks = tl.cdiv(kernel_h, BLOCK_R)
    q_blocks = tl.cdiv(kernel_w, BLOCK_Q)
    splits = split_count(total_rows, rows_per_split)
    tiles_per_channel = splits * r_blocks * q_blocks
    channel = pid // tiles_per_channel
    split = (pid % tiles_per_channel) // (r_blocks * q_blocks)
    r_block = (pid % (r_blocks * q_blocks)) // q_blocks
    q_block = pid % q_blocks

    taps_h = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    taps_w = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_begin, row_end = split_rows(split, rows_per_split, total_rows)
    iw_begin, iw_end = input_columns_reached(q_block, BLOCK_Q, kernel_w, out_width, in_width, stride_w, pad_left,
                                             dilation_w)
    # Whole-vector input loads (common.py): the widened columns meet no tap, so the Hankel operand is zero there.
    if ALIGN > 1:
        iw_begin, iw_end = vector_run(iw_begin, iw_end, in_width, ALIGN)
        in_stride_n, in_stride_c, in_stride_h = vector_strides(in_stride_n, in_stride_c, in_stride_h, ALIGN)

    # The reduction axis holds BLOCK_ROWS output rows side by side, BLOCK_IW input columns each.
    lane = tl.arange(0, BLOCK_ROWS * BLOCK_IW)
    lane_row = lane // BLOCK_IW
    lane_col = lane % BLOCK_IW
    in_channel_offset = (channel // multiplier).to(tl.int64) * in_stride_c
    grad_out_channel_offset = channel.to(tl.int64) * grad_out_stride_c

    acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=tl.float32)
    for row0 in range(row_begin, row_end, BLOCK_ROWS):
        rows = row0 + lane_row
        rows_ok = rows < row_end
        image = (rows // out_height).to(tl.int64)
        out_row = rows % out_height
        grad_out_row_base = image * grad_out_stride_n + grad_out_channel_offset + out_row.to(tl.int64) * grad_out_stride_h
        in_rows = out_row[None, :] * stride_h - pad_top + taps_h[:, None] * dilation_h
        in_rows_ok = rows_ok[None, :] & (in_rows >= 0) & (in_rows < in_height)
        in_row_offsets = (image * in_stride_n + in_channel_offset)[None, :] + in_rows.to(tl.int64) * in_stride_h
        for iw0 in range(iw_begin, iw_end, BLOCK_IW):
            if ALIGN > 1:
                iw0 = tl.multiple_of(iw0, ALIGN)
            in_cols = iw0 + lane_col
            in_cols_ok = in_cols < iw_end
            a = tl.load(input_ptr + in_row_offsets + (in_cols * in_stride_w)[None, :],
                        mask=in_rows_ok & in_cols_ok[None, :], other=0.0)
            out_cols, out_cols_ok = output_index(in_cols[:, None], taps_w[None, :], pad_left, stride_w, dilation_w,
                                                 out_width)
            b_ok = (rows_ok & in_cols_ok)[:, None] & out_cols_ok
            b = tl.load(grad_out_ptr + grad_out_row_base[:, None] + out_cols * grad_out_stride_w, mask=b_ok, other=0.0)
            acc = mma(a, b, acc, PRECISION, OPERANDS_FP32)

    partial_offsets = ((split * out_channels + channel).to(tl.int64) * kernel_h + taps_h[:, None]) * kernel_w \
        + taps_w[None, :]
    tl.store(weight_partial_ptr + partial_offsets, acc,
             mask=(taps_h < kernel_h)[:, None] & (taps_w < kernel_w)[None, :])

    if HAS_BIAS:
        if (r_block == 0) & (q_block == 0):
            total = tl.zeros((BLOCK_ROWS * BLOCK_IW,), dtype=tl.float32)
            for row0 in range(row_begin, row_end, BLOCK_ROWS):
                rows = row0 + lane_row
                rows_ok = rows < row_end
                image = (rows // out_height).to(tl.int64)
                grad_out_row_base = image * grad_out_stride_n + grad_out_channel_offset + (rows % out_height).to(tl.int64) * grad_out_stride_h
                for ow0 in range(0, out_width, BLOCK_IW):
                    out_cols = ow0 + lane_col
                    g = tl.load(grad_out_ptr + grad_out_row_base + out_cols * grad_out_stride_w,
                                mask=rows_ok & (out_cols < out_width), other=0.0)
                    total += g.to(tl.float32)
            tl.store(bias_partial_ptr + split * out_channels + channel, tl.sum(total, axis=0))
