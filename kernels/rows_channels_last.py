"""Row-form implicit GEMM for channels_last maps: the forward and input grad of rows.py, BLOCK_C channels at a time.

In a channels_last map a row's neighbours lie C elements apart, so the per-channel kernel of rows.py would fetch a
whole 32-byte sector for every element it loads. Here a program owns BLOCK_C neighbouring channels (64 bytes of
each pixel on a GPU), BLOCK_M destination rows and BLOCK_W destination columns, loads the source along the channels, and
runs one batched tl.dot per kernel row: for each channel, source rows (BLOCK_M x BLOCK_J) times that channel's
Toeplitz band (BLOCK_J x BLOCK_W). The filter comes in as (kh, kw, C), so the band is gathered along channels too.

Depth multiplier 1 only (the channel of source, filter and destination are the same); rows.py covers the rest.
"""

import triton
import triton.language as tl

from .common import destination_block, mma, reachable_band, source_row, toeplitz_taps


@triton.jit
def depthwise_rows_channels_last_kernel(
    src_ptr, weight_ptr, bias_ptr, dst_ptr,
    batch, channels, dst_height, dst_width, src_height, src_width,
    kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w,
    src_stride_n, src_stride_h, src_stride_w,
    w_stride_h, w_stride_w,
    dst_stride_n, dst_stride_h, dst_stride_w,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, OPERANDS_FP32: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # Channel blocks fastest: programs running side by side read the other channels of the same pixels.
    pid = tl.program_id(0)
    channel_blocks = tl.cdiv(channels, BLOCK_C)
    col_blocks = tl.cdiv(dst_width, BLOCK_W)
    channel_block = pid % channel_blocks
    col_block = (pid // channel_blocks) % col_blocks
    row_block = pid // (channel_blocks * col_blocks)

    channel = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = (channel < channels)[:, None, None]
    row_ok, image, dst_row, cols, col_ok = destination_block(
        row_block, col_block, batch * dst_height, dst_height, dst_width, BLOCK_M, BLOCK_W)

    r_begin, r_end, c_begin, c_end = reachable_band(
        dst_row, row_ok, cols, col_ok, dst_height, dst_width, src_height, src_width, kernel_h, kernel_w,
        stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, TRANSPOSED)

    acc = tl.zeros((BLOCK_C, BLOCK_M, BLOCK_W), dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_J):
        src_cols = c0 + tl.arange(0, BLOCK_J)
        src_col_ok = src_cols < c_end
        tap, tap_ok = toeplitz_taps(src_cols, cols, pad_left, stride_w, dilation_w, kernel_w, TRANSPOSED)
        band_offsets = (tap * w_stride_w)[None, :, :] + channel[:, None, None]
        band_mask = tap_ok[None, :, :] & channel_ok
        col_offsets = (src_cols * src_stride_w)[None, None, :] + channel[:, None, None]
        col_mask = src_col_ok[None, None, :] & channel_ok
        for r in range(r_begin, r_end):
            src_row, src_row_ok = source_row(dst_row, row_ok, r, src_height, stride_h, pad_top, dilation_h, TRANSPOSED)
            row_offsets = image * src_stride_n + src_row.to(tl.int64) * src_stride_h
            a = tl.load(src_ptr + row_offsets[None, :, None] + col_offsets,
                        mask=src_row_ok[None, :, None] & col_mask, other=0.0)
            b = tl.load(weight_ptr + r * w_stride_h + band_offsets, mask=band_mask, other=0.0)
            acc = mma(a, b, acc, PRECISION, OPERANDS_FP32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + channel, mask=channel < channels, other=0.0).to(tl.float32)[:, None, None]
    dst_offsets = (image * dst_stride_n + dst_row.to(tl.int64) * dst_stride_h)[None, :, None] \
        + (cols * dst_stride_w)[None, None, :] + channel[:, None, None]
    tl.store(dst_ptr + dst_offsets, acc.to(dst_ptr.dtype.element_ty),
             mask=channel_ok & row_ok[None, :, None] & col_ok[None, None, :])
