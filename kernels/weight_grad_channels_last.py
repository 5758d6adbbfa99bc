"""The weight (and bias) grad of weight_grad.py for channels_last maps, BLOCK_C channels at a time.

A program owns BLOCK_C neighbouring channels, one tile of kernel taps and one split of the N*OH output rows. Both
operands are loaded along the channels (contiguous in channels_last), and each step is one batched tl.dot: per
channel, the input rows that the tap rows read (BLOCK_R x BLOCK_ROWS*BLOCK_IW) times the Hankel-expanded output
grad (BLOCK_ROWS*BLOCK_IW x BLOCK_Q). It writes the same fp32 partials as weight_grad.py, summed by the caller in a
fixed order: no atomics, bit-identical run to run. Depth multiplier 1 only.
"""

import triton
import triton.language as tl

from .common import input_columns_reached, mma, output_index, split_rows


@triton.jit
def depthwise_weight_grad_channels_last_kernel(
    grad_out_ptr, input_ptr, weight_partial_ptr, bias_partial_ptr,
    batch, channels, out_height, out_width, in_height, in_width,
    kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w,
    rows_per_split,
    grad_out_stride_n, grad_out_stride_h, grad_out_stride_w,
    in_stride_n, in_stride_h, in_stride_w,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, OPERANDS_FP32: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_IW: tl.constexpr,
):
    # Channel blocks fastest: programs running side by side read the other channels of the same pixels.
    pid = tl.program_id(0)
    channel_blocks = tl.cdiv(channels, BLOCK_C)
    r_blocks = tl.cdiv(kernel_h, BLOCK_R)
    q_blocks = tl.cdiv(kernel_w, BLOCK_Q)
    channel_block = pid % channel_blocks
    tile = pid // channel_blocks
    q_block = tile % q_blocks
    r_block = (tile // q_blocks) % r_blocks
    split = tile // (q_blocks * r_blocks)

    channel = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < channels
    taps_h = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    taps_w = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    total_rows = batch * out_height
    row_begin, row_end = split_rows(split, rows_per_split, total_rows)
    iw_begin, iw_end = input_columns_reached(q_block, BLOCK_Q, kernel_w, out_width, in_width, stride_w, pad_left,
                                             dilation_w)

    # The reduction axis holds BLOCK_ROWS output rows side by side, BLOCK_IW input columns each.
    lane = tl.arange(0, BLOCK_ROWS * BLOCK_IW)
    lane_row = lane // BLOCK_IW
    lane_col = lane % BLOCK_IW
    acc = tl.zeros((BLOCK_C, BLOCK_R, BLOCK_Q), dtype=tl.float32)
    for row0 in range(row_begin, row_end, BLOCK_ROWS):
        rows = row0 + lane_row
        rows_ok = rows < row_end
        image = (rows // out_height).to(tl.int64)
        out_row = rows % out_height
        grad_out_row_base = image * grad_out_stride_n + out_row.to(tl.int64) * grad_out_stride_h
        in_rows = out_row[None, :] * stride_h - pad_top + taps_h[:, None] * dilation_h
        in_rows_ok = rows_ok[None, :] & (in_rows >= 0) & (in_rows < in_height)
        in_row_offsets = image[None, :] * in_stride_n + in_rows.to(tl.int64) * in_stride_h
        for iw0 in range(iw_begin, iw_end, BLOCK_IW):
            in_cols = iw0 + lane_col
            in_cols_ok = in_cols < iw_end
            a_offsets = in_row_offsets + (in_cols * in_stride_w)[None, :]
            a = tl.load(input_ptr + a_offsets[None, :, :] + channel[:, None, None],
                        mask=channel_ok[:, None, None] & (in_rows_ok & in_cols_ok[None, :])[None, :, :], other=0.0)
            out_cols, out_cols_ok = output_index(in_cols[:, None], taps_w[None, :], pad_left, stride_w, dilation_w,
                                                 out_width)
            b_offsets = grad_out_row_base[:, None] + out_cols * grad_out_stride_w
            b_ok = (rows_ok & in_cols_ok)[:, None] & out_cols_ok
            b = tl.load(grad_out_ptr + b_offsets[None, :, :] + channel[:, None, None],
                        mask=channel_ok[:, None, None] & b_ok[None, :, :], other=0.0)
            acc = mma(a, b, acc, PRECISION, OPERANDS_FP32)

    partial_offsets = (((split * channels + channel).to(tl.int64)[:, None, None] * kernel_h + taps_h[None, :, None])
                       * kernel_w + taps_w[None, None, :])
    tl.store(weight_partial_ptr + partial_offsets, acc,
             mask=channel_ok[:, None, None] & (taps_h < kernel_h)[None, :, None] & (taps_w < kernel_w)[None, None, :])

    if HAS_BIAS:
        if (r_block == 0) & (q_block == 0):
            total = tl.zeros((BLOCK_C, BLOCK_ROWS * BLOCK_IW), dtype=tl.float32)
            for row0 in range(row_begin, row_end, BLOCK_ROWS):
                rows = row0 + lane_row
                rows_ok = rows < row_end
                image = (rows // out_height).to(tl.int64)
                grad_out_row_base = image * grad_out_stride_n + (rows % out_height).to(tl.int64) * grad_out_stride_h
                for ow0 in range(0, out_width, BLOCK_IW):
                    out_cols = ow0 + lane_col
                    g = tl.load(grad_out_ptr + (grad_out_row_base + out_cols * grad_out_stride_w)[None, :]
                                + channel[:, None],
                                mask=channel_ok[:, None] & (rows_ok & (out_cols < out_width))[None, :], other=0.0)
                    total += g.to(tl.float32)
            tl.store(bias_partial_ptr + split * channels + channel, tl.sum(total, axis=1), mask=channel_ok)
