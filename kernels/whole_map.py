"""Whole-map implicit GEMM for depthwise convs whose kernel covers (most of) the map (ARCHITECTURE.md §4.2).

When the map is small next to the kernel (RepLKNet stage 3: 14x14 with K=27; stage 4: 7x7 with K=13) every
output pixel sees nearly every input pixel, so per channel the conv is one dense GEMM:
Y[n, :] = X[n, :] @ T_c with T_c[in_pixel, out_pixel] = w[tap]. A program owns one destination channel,
BLOCK_N images and BLOCK_P destination pixels, and builds T_c blockwise from the filter; no multiply is wasted
on a band edge. The forward reads x and writes y; the input grad (TRANSPOSED) reads dy and writes dx.
"""

import triton
import triton.language as tl

from .common import filter_tap, mma


@triton.jit
def depthwise_whole_map_kernel(
    src_ptr, weight_ptr, bias_ptr, dst_ptr,
    batch, dst_height, dst_width, src_height, src_width,
    kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, multiplier,
    src_stride_n, src_stride_c, src_stride_h, src_stride_w,
    w_stride_c, w_stride_h, w_stride_w,
    dst_stride_n, dst_stride_c, dst_stride_h, dst_stride_w,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, OPERANDS_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    dst_pixels = dst_height * dst_width
    src_pixels = src_height * src_width
    pixel_blocks = tl.cdiv(dst_pixels, BLOCK_P)
    blocks_per_channel = tl.cdiv(batch, BLOCK_N) * pixel_blocks
    channel = pid // blocks_per_channel
    image_block = (pid % blocks_per_channel) // pixel_blocks
    pixel_block = pid % pixel_blocks

    images = image_block * BLOCK_N + tl.arange(0, BLOCK_N)
    image_ok = images < batch
    pixels = pixel_block * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = pixels < dst_pixels
    dst_row = pixels // dst_width
    dst_col = pixels % dst_width
    if TRANSPOSED:
        source_channels = multiplier
    else:
        source_channels = 1

    acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    for k in range(0, source_channels):
        if TRANSPOSED:
            src_channel = channel * multiplier + k
            w_channel = src_channel
        else:
            src_channel = channel // multiplier
            w_channel = channel
        src_base = images.to(tl.int64) * src_stride_n + src_channel.to(tl.int64) * src_stride_c
        w_base = weight_ptr + w_channel.to(tl.int64) * w_stride_c
        for k0 in range(0, src_pixels, BLOCK_K):
            src_pixel = k0 + tl.arange(0, BLOCK_K)
            src_ok = src_pixel < src_pixels
            src_row = src_pixel // src_width
            src_col = src_pixel % src_width
            src_offsets = src_row.to(tl.int64) * src_stride_h + src_col * src_stride_w
            a = tl.load(src_ptr + src_base[:, None] + src_offsets[None, :],
                        mask=image_ok[:, None] & src_ok[None, :], other=0.0)
            if TRANSPOSED:
                tap_h, ok_h = filter_tap(dst_row[None, :], src_row[:, None], pad_top, stride_h, dilation_h, kernel_h)
                tap_w, ok_w = filter_tap(dst_col[None, :], src_col[:, None], pad_left, stride_w, dilation_w, kernel_w)
            else:
                tap_h, ok_h = filter_tap(src_row[:, None], dst_row[None, :], pad_top, stride_h, dilation_h, kernel_h)
                tap_w, ok_w = filter_tap(src_col[:, None], dst_col[None, :], pad_left, stride_w, dilation_w, kernel_w)
            b = tl.load(w_base + tap_h * w_stride_h + tap_w * w_stride_w, mask=ok_h & ok_w, other=0.0)
            acc = mma(a, b, acc, PRECISION, OPERANDS_FP32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + channel).to(tl.float32)
    dst_offsets = (images.to(tl.int64) * dst_stride_n + channel.to(tl.int64) * dst_stride_c)[:, None] \
        + (dst_row.to(tl.int64) * dst_stride_h + dst_col * dst_stride_w)[None, :]
    tl.store(dst_ptr + dst_offsets, acc.to(dst_ptr.dtype.element_ty), mask=image_ok[:, None] & pixel_ok[None, :])
