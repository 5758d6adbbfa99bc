"""The `triton` backend: launches the lkconv.kernels implicit-GEMM kernels with block sizes per shape class.

Everything shape-dependent is decided here on the host with integer arithmetic, and cached per shape class:
which kernel form runs (row band or whole map), its block sizes, and how the weight-grad reduction is split.
The GPU configurations come from three small tables, so the ahead-of-time compile test (kernel_configs) and the
dispatcher can never disagree.
"""

import contextlib
import functools
import os
import sys
import threading
from typing import NamedTuple, Optional, Sequence

import torch

from ..arguments import layout_strides, output_memory_format, output_size
from .gpu import conv_allows_tf32, unsupported_gpu_reason

name = "triton"

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
VECTOR_BYTES = 16  # the widest global load a thread issues


class RowsConfig(NamedTuple):
    block_m: int
    block_w: int
    block_j: int
    num_warps: int = 4
    num_stages: int = 2


class RowsChannelsLastConfig(NamedTuple):
    block_c: int
    block_m: int
    block_w: int
    block_j: int
    num_warps: int = 4
    num_stages: int = 2


class WholeMapConfig(NamedTuple):
    block_n: int
    block_p: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


class WeightGradConfig(NamedTuple):
    block_r: int
    block_q: int
    block_rows: int
    block_iw: int
    num_warps: int = 4
    num_stages: int = 2


class WeightGradChannelsLastConfig(NamedTuple):
    block_c: int
    block_r: int
    block_q: int
    block_rows: int
    block_iw: int
    num_warps: int = 4
    num_stages: int = 2


# GPU configurations, keyed by what selects them. Block sizes and warps keep ptxas register spills at a few dozen
# bytes at most (tests/compile_kernels.py reports registers and spills per configuration); speed tuning on a GPU
# is still owed.
GPU_ROWS = {(block_w, block_j): RowsConfig(64, block_w, block_j) for block_w in (16, 32) for block_j in (32, 64)}
# channels_last: 64 bytes of channels per pixel (two sectors of one cache line), so by element size.
CHANNEL_BYTES = 64
GPU_ROWS_CHANNELS_LAST = {size: RowsChannelsLastConfig(CHANNEL_BYTES // size, 32, 16, 32, num_warps=8) for size in (2, 4)}
GPU_WEIGHT_GRAD_CHANNELS_LAST = {
    (size, block_q): WeightGradChannelsLastConfig(CHANNEL_BYTES // size, 16, block_q, 2, 16, num_warps=8)
    for size in (2, 4) for block_q in (16, 32)
}
GPU_WHOLE_MAP = {block_n: WholeMapConfig(block_n, 64, 32, num_warps=8) for block_n in (16, 64)}
GPU_WEIGHT_GRAD = {
    (block_r, block_q, block_iw): WeightGradConfig(block_r, block_q, 128 // block_iw, block_iw, num_warps=8)
    for block_r in (16, 32) for block_q in (16, 32) for block_iw in (16, 32)
}


def kernel_configs() -> dict[str, list]:
    """Every GPU configuration the dispatcher can pick, per kernel (for ahead-of-time compile checks)."""
    return {
        "rows": list(GPU_ROWS.values()),
        "rows_channels_last": list(GPU_ROWS_CHANNELS_LAST.values()),
        "whole_map": list(GPU_WHOLE_MAP.values()),
        "weight_grad": list(GPU_WEIGHT_GRAD.values()),
        "weight_grad_channels_last": list(GPU_WEIGHT_GRAD_CHANNELS_LAST.values()),
    }


# --- availability ------------------------------------------------------------------------------------------------

# What Triton takes for "on" in TRITON_INTERPRET (its getenv_bool, case-insensitive): lkconv must agree with it.
_TRUE = ("1", "true", "yes", "on", "y")


def interpreting() -> bool:
    """True when the kernels run in Triton's interpreter. Triton reads TRITON_INTERPRET when a kernel is decorated,
    so once lkconv.kernels is imported (by lkconv or by the user) its kernels say; before, the variable does."""
    kernels = sys.modules.get("lkconv.kernels")
    if kernels is not None and hasattr(kernels, "depthwise_rows_kernel"):
        return type(kernels.depthwise_rows_kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


@functools.lru_cache(maxsize=None)
def _kernels():
    # Imported on first use: TRITON_INTERPRET is read when the kernels are decorated, and fixed from then on.
    from lkconv import kernels

    return kernels


@functools.lru_cache(maxsize=None)
def _import_failure() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error}); install it with pip install 'triton>=3.6'"
    return None


def unavailable_reason() -> Optional[str]:
    """Why the triton backend cannot run here (no triton, no GPU and no interpreter), or None."""
    if (reason := _import_failure()) is not None:
        return reason
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA GPU is visible (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly, for testing)"
    return None


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the triton kernels cannot run tensors of this device and dtype, or None."""
    if dtype not in DTYPES:
        return f"the triton kernels take float16, bfloat16 and float32 tensors, not {dtype}"
    if interpreting():
        return None
    if device.type != "cuda":
        return f"triton runs on CUDA tensors (or any tensor under TRITON_INTERPRET=1); got a {device.type} tensor"
    return unsupported_gpu_reason(device.index if device.index is not None else torch.cuda.current_device(), "triton")


def _dot_options(dtype: torch.dtype) -> tuple[str, bool]:
    """(tl.dot input_precision, widen operands to fp32) for a tensor dtype."""
    if dtype == torch.float32:
        return ("tf32" if conv_allows_tf32() else "ieee"), False
    return "tf32", interpreting() and dtype == torch.bfloat16


def _dot_label(dtype: torch.dtype) -> str:
    """How the kernels' tl.dot multiplies for `dtype`, as explain reports it."""
    if dtype == torch.float32:
        return f"{_dot_options(dtype)[0]} fp32 dot"
    return f"{str(dtype).removeprefix('torch.')} tensor-core dot, fp32 accumulation"


# --- plans: which kernel and blocks, per shape class ------------------------------------------------------------


def _next_pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << max(0, int(n) - 1).bit_length()))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ConvPass(NamedTuple):
    """A forward-shaped pass: `src` maps of (src_h, src_w) into `dst` maps of (dst_h, dst_w).

    The forward reads x and writes y; the input grad (transposed) reads dy and writes dx. `align` is the source's
    vector_align and `pad_left` the conv's left padding: together they fix where each run of source columns starts.
    `channel_block` is how many channels a row-form program takes at once from channels_last maps, 0 where it
    takes one.
    """

    transposed: bool
    batch: int
    dst_h: int
    dst_w: int
    src_h: int
    src_w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad_left: int
    align: int
    channel_block: int = 0


class ConvPlan(NamedTuple):
    form: str  # "rows", "rows_shifted_filter", "rows_channels_last" or "whole_map"
    config: NamedTuple


def _source_span(p: ConvPass, block_w: int) -> int:
    """Source columns one block of `block_w` destination columns reads, its run widened to whole vectors of
    `p.align` at both ends as the kernel widens it: the widest over the blocks of an unclipped (wide) map."""
    reach = (p.kernel[1] - 1) * p.dilation[1]
    if p.transposed and p.stride[1] * p.align > 64:
        # Runs repeat only after align x stride blocks: bound the span instead (any block size is correct; this
        # only sizes it), as the columns reached plus a partial vector at each end.
        return (block_w - 1 + reach) // p.stride[1] + 1 + 2 * (p.align - 1)
    widest = 0
    # Where a run starts, modulo align, repeats after align blocks in the forward, align x stride in the input grad.
    for block in range(1, 1 + p.align * (p.stride[1] if p.transposed else 1)):
        first, last = block * block_w, block * block_w + block_w - 1
        if p.transposed:
            begin = -(-(first + p.pad_left - reach) // p.stride[1])
            end = (last + p.pad_left) // p.stride[1] + 1
        else:
            begin = first * p.stride[1] - p.pad_left
            end = last * p.stride[1] - p.pad_left + reach + 1
        widest = max(widest, _cdiv(end, p.align) * p.align - begin // p.align * p.align)
    return widest


def _kernel_rows_reached(p: ConvPass) -> int:
    """Kernel rows one destination row multiplies at most (the rest fall in the padding)."""
    if p.transposed:
        return min(p.kernel[0], _cdiv(p.src_h * p.stride[0], p.dilation[0]))
    return min(p.kernel[0], _cdiv(p.src_h, p.dilation[0]))


def _rows_config(p: ConvPass, interpret: bool) -> RowsConfig:
    if interpret:
        # The interpreter pays per operation, not per element: few, large programs.
        block_w = _next_pow2(p.dst_w, 16, 64)
        return RowsConfig(_next_pow2(p.batch * p.dst_h, 16, 128), block_w, _next_pow2(_source_span(p, block_w), 16, 256))
    block_w = 32 if p.dst_w > 16 else 16
    return GPU_ROWS[block_w, 64 if _source_span(p, block_w) > 32 else 32]


def _rows_channels_last_config(p: ConvPass, interpret: bool) -> RowsChannelsLastConfig:
    if interpret:
        block_w = _next_pow2(p.dst_w, 16, 64)
        return RowsChannelsLastConfig(p.channel_block, _next_pow2(p.batch * p.dst_h, 16, 64), block_w,
                                      _next_pow2(_source_span(p, block_w), 16, 128))
    return GPU_ROWS_CHANNELS_LAST[CHANNEL_BYTES // p.channel_block]


def channel_block(shape, strides, other_shape, other_strides, multiplier: int, element_size: int,
                  interpret: bool) -> int:
    """Channels per program for the channels_last kernels, or 0 where the per-channel kernels run: both maps a pass
    reads or writes must have unit channel stride (channels_last) and every channel and column offset within a row
    below 2**31 (the row kernel adds them in int32), the map more than one channel, and the depth multiplier 1."""
    if strides[1] != 1 or other_strides[1] != 1 or multiplier != 1 or shape[1] < 2:
        return 0
    if (max((shape[3] - 1) * strides[3] + shape[1], (other_shape[3] - 1) * other_strides[3] + other_shape[1])
            > _INT32_LIMIT):
        return 0
    return _next_pow2(shape[1], 1, 16) if interpret else CHANNEL_BYTES // element_size


def _whole_map_config(p: ConvPass, interpret: bool) -> WholeMapConfig:
    if interpret:
        return WholeMapConfig(
            _next_pow2(p.batch, 16, 64), _next_pow2(p.dst_h * p.dst_w, 16, 256), _next_pow2(p.src_h * p.src_w, 16, 256)
        )
    return GPU_WHOLE_MAP[64 if p.batch > 16 else 16]


@functools.lru_cache(maxsize=4096)
def plan_conv(p: ConvPass, interpret: bool) -> ConvPlan:
    """Rows or whole map, whichever multiplies less (padding of each block included), with its blocks; channels_last
    maps (a channel block) always take the channel-block rows kernel."""
    if p.batch == 0:  # an empty batch launches nothing; plan as for one image, so that explain can say what runs
        p = p._replace(batch=1)
    if p.channel_block:
        # Predicted faster than the per-channel whole-map form too, which reads a channels_last map a line per element
        # (benchmarks/NOTES.md, Triton version 3).
        return ConvPlan("rows_channels_last", _rows_channels_last_config(p, interpret))
    rows = _rows_config(p, interpret)
    dst_rows = p.batch * p.dst_h
    rows_cost = (
        _kernel_rows_reached(p) * _cdiv(_source_span(p, rows.block_w), rows.block_j) * rows.block_j
        * _cdiv(dst_rows, rows.block_m) * rows.block_m / dst_rows
    )
    src_pixels = p.src_h * p.src_w
    if src_pixels <= 4096 and p.dst_h * p.dst_w < COUNT_LIMIT:  # the whole-map kernel counts pixels in 32 bits
        whole = _whole_map_config(p, interpret)
        whole_cost = _cdiv(src_pixels, whole.block_k) * whole.block_k * _cdiv(p.batch, whole.block_n) * whole.block_n / p.batch
        if whole_cost < rows_cost:
            return ConvPlan("whole_map", whole)
    if p.stride == (1, 1) and p.dilation == (1, 1) and (interpret or _shifted_filter_pays(p, rows)):
        return ConvPlan("rows_shifted_filter", rows)
    return ConvPlan("rows", rows)


# The shifted filter rows are rebuilt for every call (a cache could not see a weight updated inside a replayed CUDA
# graph), so the row kernel takes them where it reads at least this many Toeplitz entries per entry built. At 32 the
# rows hold no more entries than the source map for kernels up to 32 rows, and building them costs a few percent of
# the time they save (benchmarks/NOTES.md, Triton version 4).
SHIFTED_MIN_READS_PER_ENTRY = 32


def _shifted_filter_pays(p: ConvPass, config: RowsConfig) -> bool:
    """Whether the row kernel's reads of B outweigh building the shifted rows: per channel and kernel row it reads
    (batch * dst_h / BLOCK_M) * (dst_w / BLOCK_W) blocks of BLOCK_J x BLOCK_W entries, and `copies` rows of `length`
    entries are built (batch 12 and up at 64x64 with K=31)."""
    reads = p.batch * p.dst_h * p.dst_w * config.block_j / config.block_m
    copies, _, length = _shifted_rows_layout(config.block_w, config.block_j, p.kernel[1], p.align)
    return reads >= SHIFTED_MIN_READS_PER_ENTRY * copies * length


def _shifted_rows_layout(block_w: int, block_j: int, kernel_w: int, align: int) -> tuple[int, int, int]:
    """(copies, start, length) of the shifted filter rows (kernels/common.py): filter entry 0 sits at `start` =
    SHIFTED_ORIGIN + block_w of each zero-padded row. `length` covers every entry a block reads: its source runs
    start up to `align` - 1 columns early and reach block_w + kernel_w + align columns past a block's first
    destination column."""
    from lkconv.kernels import common  # not _kernels(): benchmarks.triton_launches stands in for that to record

    start = common.SHIFTED_ORIGIN.value + block_w
    return common.SHIFTED_COPIES.value, start, _cdiv(start + block_w + kernel_w + 2 * align + block_j, 16) * 16


def shifted_filter_rows(weight: torch.Tensor, flip: bool, block_w: int, block_j: int, align: int) -> torch.Tensor:
    """(C*m, kh, copies, length) for the row kernel's SHIFTED form: each filter row (flipped left-right for the input
    grad) zero-padded (_shifted_rows_layout), in copies shifted by 0, 1, ... entries."""
    channels, _, kernel_h, kernel_w = weight.shape
    copies, start, length = _shifted_rows_layout(block_w, block_j, kernel_w, align)
    padded = weight.new_zeros(channels, kernel_h, length + copies)
    padded[:, :, start:start + kernel_w] = weight[:, 0].flip(-1) if flip else weight[:, 0]
    return torch.stack([padded[:, :, s:s + length] for s in range(copies)], dim=2)


@functools.lru_cache(maxsize=4096)
def weight_grad_config(kernel: tuple[int, int], in_width: int, total_rows: int, interpret: bool) -> WeightGradConfig:
    """The weight grad's tap and row blocks for a kernel size, input width and row count."""
    if interpret:
        block_iw = _next_pow2(in_width, 16, 64)
        return WeightGradConfig(
            _next_pow2(kernel[0], 16, 64), _next_pow2(kernel[1], 16, 64), _next_pow2(total_rows, 1, 256 // block_iw), block_iw
        )
    return GPU_WEIGHT_GRAD[16 if kernel[0] <= 16 else 32, 16 if kernel[1] <= 16 else 32, 32 if in_width > 16 else 16]


@functools.lru_cache(maxsize=4096)
def weight_grad_channels_last_config(kernel: tuple[int, int], in_width: int, total_rows: int, block_c: int,
                                     interpret: bool) -> WeightGradChannelsLastConfig:
    """The forward's channel block (`block_c`, which on a GPU fixes the element size) with 16 tap rows."""
    if interpret:
        block_iw = _next_pow2(in_width, 16, 64)
        return WeightGradChannelsLastConfig(block_c, _next_pow2(kernel[0], 16, 64), _next_pow2(kernel[1], 16, 64),
                                            _next_pow2(total_rows, 1, 128 // block_iw), block_iw)
    return GPU_WEIGHT_GRAD_CHANNELS_LAST[CHANNEL_BYTES // block_c, 16 if kernel[1] <= 16 else 32]


def vector_align(shape: Sequence[int], strides: Sequence[int], element_size: int, data_ptr: int = 0) -> int:
    """How many elements of a (N, C, H, W) map's rows the kernels may treat as one vector (at most 16 bytes).

    The kernels widen every run of columns they load to start and end on a multiple of it, so it must divide the
    row width, the data pointer and each stride that multiplies a non-zero index, and columns must be contiguous.
    NCHW maps whose widths are multiples of 8 (bf16/fp16) or 4 (fp32) get whole 16-byte loads; channels_last
    maps get 1.
    """
    if shape[3] > 1 and strides[3] != 1:
        return 1
    align = VECTOR_BYTES // element_size
    used_strides = [stride for size, stride in zip(shape[:3], strides[:3]) if size > 1]
    while align > 1 and (shape[3] % align or data_ptr % (align * element_size)
                         or any(stride % align for stride in used_strides)):
        align //= 2
    return align


def _map_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """A map's strides as the kernels take them: 0 for a size-1 dimension, whose index is always 0. Then every
    stride vector_align vouches for is a multiple of it, and none of them is the 1 Triton would make a constant."""
    (n, c, h, w), (sn, sc, sh, sw) = tensor.shape, tensor.stride()
    return (sn if n > 1 else 0, sc if c > 1 else 0, sh if h > 1 else 0, sw if w > 1 else 0)


@functools.lru_cache(maxsize=4096)
def _cached_vector_align(shape, strides, element_size: int, pointer_offset: int) -> int:
    return vector_align(shape, strides, element_size, pointer_offset)


def _tensor_align(tensor: torch.Tensor, strides: tuple[int, ...]) -> int:
    """vector_align of a map with its `_map_strides`, cached per shape (only the pointer's offset within 16 bytes
    matters: every vector is at most 16 bytes)."""
    return _cached_vector_align(tensor.shape, strides, tensor.element_size(), tensor.data_ptr() % VECTOR_BYTES)


def _forward_pass(input_shape, out_hw, kernel, stride, dilation, pad_left, align, block) -> ConvPass:
    return ConvPass(False, input_shape[0], out_hw[0], out_hw[1], input_shape[2], input_shape[3],
                    tuple(kernel), tuple(stride), tuple(dilation), pad_left, align, block)


def _input_grad_pass(grad_shape, input_hw, kernel, stride, dilation, pad_left, align, block) -> ConvPass:
    return ConvPass(True, grad_shape[0], input_hw[0], input_hw[1], grad_shape[2], grad_shape[3],
                    tuple(kernel), tuple(stride), tuple(dilation), pad_left, align, block)


def describe(pass_name: str, input, weight, output_hw, stride, padding, dilation) -> str:
    """The kernel, block sizes, vector width and dot precision that `pass_name` would launch, in words.

    The input grad's dy is taken to be a fresh tensor in the output's layout, as autograd hands it in.
    """
    kernel = tuple(weight.shape[2:])
    interpret = interpreting()
    block_for = functools.partial(channel_block, multiplier=weight.shape[0] // input.shape[1],
                                  element_size=input.element_size(), interpret=interpret)
    output_shape = (input.shape[0], weight.shape[0], *output_hw)
    # dy as autograd hands it in: a fresh tensor in the output's layout; dx then takes dy's layout.
    grad_output = torch.empty(output_shape, dtype=input.dtype, device="meta",
                              memory_format=_output_format(input, output_shape))
    output_strides = grad_output.stride()
    if pass_name == "weight_grad":
        total_rows = input.shape[0] * output_hw[0]
        if block := block_for(input.shape, _map_strides(input), output_shape, output_strides):
            config = weight_grad_channels_last_config(kernel, input.shape[3], total_rows, block, interpret)
            loads = _channels_label(config.block_c, input)
            name = "weight_grad_channels_last"
        else:
            config = weight_grad_config(kernel, input.shape[3], total_rows, interpret)
            loads, name = _vectors_label(_tensor_align(input, _map_strides(input)), input), "weight_grad"
        return f"{name} (deterministic split reduction) {config}, {loads}, {_dot_label(input.dtype)}"
    if pass_name == "forward":
        strides = _map_strides(input)
        align = _tensor_align(input, strides)
        block = block_for(input.shape, strides, output_shape, output_strides)
        p = _forward_pass(input.shape, output_hw, kernel, stride, dilation, padding[1], align, block)
    else:
        align = vector_align(output_shape, output_strides, input.element_size())
        grad_input_strides = layout_strides(input.shape, _output_format(grad_output, input.shape))
        block = block_for(output_shape, output_strides, input.shape, grad_input_strides)
        p = _input_grad_pass(output_shape, input.shape[2:], kernel, stride, dilation, padding[1], align, block)
    plan = plan_conv(p, interpret)
    if plan.form in ("rows", "rows_shifted_filter"):
        loads = f", {_vectors_label(align, input)}"
    elif plan.form == "rows_channels_last":
        loads = f", {_channels_label(plan.config.block_c, input)}"
    else:
        loads = ""
    return f"{plan.form} {plan.config}{loads}, {_dot_label(input.dtype)}"


def _vectors_label(align: int, like: torch.Tensor) -> str:
    return f"{align * like.element_size()}-byte source loads"


def _channels_label(block_c: int, input: torch.Tensor) -> str:
    """What a channels_last kernel loads of each pixel: its channel block, or all channels where there are fewer."""
    return f"{min(block_c, input.shape[1]) * input.element_size()}-byte source loads along channels"

# --- launches ------------------------------------------------------------------------------------------------------

_INT32_LIMIT = 2**31


# The kernels count a batch's map rows (N x height, of the input or the output), a padded row's columns and a
# whole-map channel's output pixels in int32, with room for a block (at most 1024) added to the last index.
COUNT_LIMIT = _INT32_LIMIT - 1024


def beyond_count_limit(batch: int, kernel, stride, padding, dilation, input_hw) -> Optional[str]:
    """Why the kernels cannot count this call's map rows or padded columns in 32 bits, or None. For such a call
    `backends` asks cuda (which counts in 64 bits) where it is usable, else PyTorch."""
    out_h = output_size(input_hw[0], kernel[0], stride[0], padding[0], padding[2], dilation[0])
    rows = batch * max(input_hw[0], out_h)
    if rows >= COUNT_LIMIT:
        return (f"the batch's maps have {rows} rows (N x height), beyond the 2**31 - 1024 the triton kernels count "
                "in 32 bits")
    columns = input_hw[1] + padding[1] + padding[3]
    if columns >= COUNT_LIMIT:
        return (f"the padded map is {columns} columns wide, beyond the 2**31 - 1024 the triton kernels count in 32 "
                "bits")
    return None


# The kernels index within a map row (and within a filter) in int32, while image, channel and row offsets are int64.
# Only exotic views (a row spanning 2**31 elements) need these copies.
def _int32_safe_map(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if (tensor.shape[3] - 1) * tensor.stride(3) < _INT32_LIMIT else tensor.contiguous()


def _int32_safe_filter(weight: torch.Tensor) -> torch.Tensor:
    shape, strides = weight.shape, weight.stride()
    fits = (shape[2] - 1) * strides[2] + (shape[3] - 1) * strides[3] < _INT32_LIMIT
    return weight if fits else weight.contiguous()


def new_buffer(shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Uninitialised memory for a kernel to fill completely (tests swap in NaN-filled buffers to prove it)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


class _LaunchingOn:
    """Makes a GPU current (triton then launches there, on its current stream) and holds that GPU's launch lock.
    Triton 3.6 can hand a second thread a kernel whose first launch is still loading it (its launcher is set before
    its function, and loading releases the GIL), and that launch fails; under `auto` the shape class would go to
    PyTorch for good. Taking turns costs each launch its host time only (tens of µs); the kernels still overlap."""

    locks: dict[int, threading.Lock] = {}  # per GPU index

    def __init__(self, index: int):
        self.device = torch.cuda.device(index)
        self.lock = self.locks.setdefault(index, threading.Lock())

    def __enter__(self) -> None:
        self.device.__enter__()
        self.lock.acquire()

    def __exit__(self, *exception) -> None:
        self.lock.release()
        self.device.__exit__(*exception)


_ON_THE_HOST = contextlib.nullcontext()  # the interpreter's launches: no device, no lock


def _launching_on(tensor: torch.Tensor):
    """The context a launch on `tensor`'s device runs in (_LaunchingOn for a GPU)."""
    if not tensor.is_cuda:
        return _ON_THE_HOST
    return _LaunchingOn(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())


def _launch_conv(p: ConvPass, src, weight, bias, dst, padding, multiplier, src_strides):
    plan = plan_conv(p, interpreting())
    kernels = _kernels()
    precision, operands_fp32 = _dot_options(src.dtype)
    c = plan.config
    shifted = plan.form == "rows_shifted_filter"
    if shifted:
        # Channel, kernel row and copy strides stand in for the filter's channel, row and column strides.
        filter_operand = shifted_filter_rows(weight, p.transposed, c.block_w, c.block_j, p.align)
        filter_strides = filter_operand.stride()[:3]
    else:
        filter_operand, filter_strides = weight, (weight.stride(0), weight.stride(2), weight.stride(3))
    args = (
        src, filter_operand, bias if bias is not None else filter_operand, dst,
        p.batch, p.dst_h, p.dst_w, p.src_h, p.src_w,
        p.kernel[0], p.kernel[1], p.stride[0], p.stride[1], padding[0], padding[1], p.dilation[0], p.dilation[1],
        multiplier,
        *src_strides, *filter_strides, *dst.stride(),
    )
    flags = dict(TRANSPOSED=p.transposed, HAS_BIAS=bias is not None, PRECISION=precision, OPERANDS_FP32=operands_fp32)
    with _launching_on(dst):
        if plan.form in ("rows", "rows_shifted_filter"):
            grid = (dst.shape[1] * _cdiv(p.batch * p.dst_h, c.block_m) * _cdiv(p.dst_w, c.block_w),)
            kernels.depthwise_rows_kernel[grid](
                *args, **flags, BLOCK_M=c.block_m, BLOCK_W=c.block_w, BLOCK_J=c.block_j, ALIGN=p.align,
                SHIFTED=shifted, num_warps=c.num_warps, num_stages=c.num_stages,
            )
        elif plan.form == "rows_channels_last":
            # The filter as (kh, kw, C), so that the Toeplitz band is gathered along channels too (a tiny copy).
            band_filter = weight[:, 0].permute(1, 2, 0).contiguous()
            grid = (_cdiv(dst.shape[1], c.block_c) * _cdiv(p.batch * p.dst_h, c.block_m) * _cdiv(p.dst_w, c.block_w),)
            kernels.depthwise_rows_channels_last_kernel[grid](
                src, band_filter, bias if bias is not None else band_filter, dst,
                p.batch, dst.shape[1], p.dst_h, p.dst_w, p.src_h, p.src_w,
                p.kernel[0], p.kernel[1], p.stride[0], p.stride[1], padding[0], padding[1], p.dilation[0], p.dilation[1],
                src.stride(0), src.stride(2), src.stride(3), band_filter.stride(0), band_filter.stride(1),
                dst.stride(0), dst.stride(2), dst.stride(3),
                **flags, BLOCK_C=c.block_c, BLOCK_M=c.block_m, BLOCK_W=c.block_w, BLOCK_J=c.block_j,
                num_warps=c.num_warps, num_stages=c.num_stages,
            )
        elif plan.form == "whole_map":
            grid = (dst.shape[1] * _cdiv(p.batch, c.block_n) * _cdiv(p.dst_h * p.dst_w, c.block_p),)
            kernels.depthwise_whole_map_kernel[grid](
                *args, **flags, BLOCK_N=c.block_n, BLOCK_P=c.block_p, BLOCK_K=c.block_k,
                num_warps=c.num_warps, num_stages=c.num_stages,
            )
        else:
            raise ValueError(f"unknown kernel form {plan.form!r}")
    return dst


def _output_format(like: torch.Tensor, shape) -> torch.memory_format:
    """The op's output layout, unless a channels_last row would span 2**31 elements (then NCHW; the op restores it)."""
    memory_format = output_memory_format(like)
    if memory_format == torch.channels_last and (shape[3] - 1) * shape[1] >= _INT32_LIMIT:
        return torch.contiguous_format
    return memory_format


def forward(input, weight, bias, stride, padding, dilation):
    """y = depthwise conv of `input`, with the kernel form and blocks that plan_conv picks."""
    batch, channels = input.shape[:2]
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_hw = tuple(
        output_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], padding[2 + i], dilation[i])
        for i in range(2)
    )
    shape = (batch, out_channels, *out_hw)
    output = new_buffer(shape, input.dtype, input.device, _output_format(input, shape))
    if output.numel() == 0:
        return output
    input = _int32_safe_map(input)
    strides = _map_strides(input)
    block = channel_block(input.shape, strides, output.shape, output.stride(), out_channels // channels,
                          input.element_size(), interpreting())
    p = _forward_pass(input.shape, out_hw, (kernel_h, kernel_w), stride, dilation, padding[1],
                      _tensor_align(input, strides), block)
    # The kernel reads bias[channel] at unit stride; autograd may hand in an expanded (stride-0) bias.
    bias = bias.contiguous() if bias is not None else None
    return _launch_conv(p, input, _int32_safe_filter(weight), bias, output, padding, out_channels // channels, strides)


def input_grad(grad_output, weight, input_shape, stride, padding, dilation):
    """dx for an input of `input_shape`: the same kernels run transposed, reading dy and writing dx."""
    batch, channels, height, width = input_shape
    shape = (batch, channels, height, width)
    grad_input = new_buffer(shape, grad_output.dtype, grad_output.device, _output_format(grad_output, shape))
    if grad_input.numel() == 0:
        return grad_input
    grad_output = _int32_safe_map(grad_output)
    strides = _map_strides(grad_output)
    block = channel_block(grad_output.shape, strides, grad_input.shape, grad_input.stride(),
                          weight.shape[0] // channels, grad_output.element_size(), interpreting())
    p = _input_grad_pass(grad_output.shape, (height, width), weight.shape[2:], stride, dilation, padding[1],
                         _tensor_align(grad_output, strides), block)
    return _launch_conv(p, grad_output, _int32_safe_filter(weight), None, grad_input, padding,
                        weight.shape[0] // channels, strides)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def row_splits(total_rows: int, splits: int, block_rows: int) -> tuple[int, int]:
    """(splits, rows per split) for the weight grad's N*OH output rows: whole row blocks per split, and no split
    left empty, so each begins below total_rows (kernels/common.py split_rows)."""
    splits = max(1, min(splits, _cdiv(total_rows, block_rows)))
    rows_per_split = _cdiv(_cdiv(total_rows, splits), block_rows) * block_rows
    return _cdiv(total_rows, rows_per_split), rows_per_split


def weight_grad(grad_output, input, kernel_size, stride, padding, dilation, with_bias, splits: Optional[int] = None):
    """Weight grad (and bias grad) from fixed-order fp32 partials: bit-identical run to run.

    `splits` (how many partial sums divide the N*OH rows) fills the GPU with 4 programs per SM unless given.
    channels_last maps (both x and dy) with depth multiplier 1 take the channel-block kernel.
    """
    batch, channels = input.shape[:2]
    out_channels, out_h, out_w = grad_output.shape[1:]
    kernel_h, kernel_w = kernel_size
    total_rows = batch * out_h
    if total_rows == 0:
        grad_weight = grad_output.new_zeros(out_channels, 1, kernel_h, kernel_w)
        return grad_weight, grad_output.new_zeros(out_channels if with_bias else 0)
    grad_output, input = _int32_safe_map(grad_output), _int32_safe_map(input)
    input_strides = _map_strides(input)
    block = channel_block(input.shape, input_strides, grad_output.shape, _map_strides(grad_output),
                          out_channels // channels, input.element_size(), interpreting())
    if block:
        c = weight_grad_channels_last_config(tuple(kernel_size), input.shape[3], total_rows, block, interpreting())
        channel_programs = _cdiv(out_channels, c.block_c)
    else:
        c = weight_grad_config(tuple(kernel_size), input.shape[3], total_rows, interpreting())
        channel_programs = out_channels
    tiles = channel_programs * _cdiv(kernel_h, c.block_r) * _cdiv(kernel_w, c.block_q)
    if splits is None:
        # Decided by how the kernels run, not where the tensors are, so that launches recorded on a CPU
        # (benchmarks/triton_launches.py) are the ones a GPU makes.
        splits = 1 if interpreting() else _cdiv(4 * _multiprocessors(input.device.index or 0), tiles)
    splits, rows_per_split = row_splits(total_rows, splits, c.block_rows)

    weight_partials = new_buffer((splits, out_channels, kernel_h, kernel_w), torch.float32, input.device)
    bias_partials = new_buffer((splits, out_channels) if with_bias else (0,), torch.float32, input.device)
    precision, operands_fp32 = _dot_options(input.dtype)
    shape_args = (batch, out_channels, out_h, out_w, input.shape[2], input.shape[3], kernel_h, kernel_w,
                  stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    flags = dict(HAS_BIAS=with_bias, PRECISION=precision, OPERANDS_FP32=operands_fp32, BLOCK_R=c.block_r,
                 BLOCK_Q=c.block_q, BLOCK_ROWS=c.block_rows, BLOCK_IW=c.block_iw, num_warps=c.num_warps,
                 num_stages=c.num_stages)
    with _launching_on(input):
        if block:
            _kernels().depthwise_weight_grad_channels_last_kernel[(tiles * splits,)](
                grad_output, input, weight_partials, bias_partials, *shape_args, rows_per_split,
                grad_output.stride(0), grad_output.stride(2), grad_output.stride(3),
                input.stride(0), input.stride(2), input.stride(3), **flags, BLOCK_C=c.block_c,
            )
        else:
            _kernels().depthwise_weight_grad_kernel[(tiles * splits,)](
                grad_output, input, weight_partials, bias_partials, *shape_args, out_channels // channels,
                rows_per_split, *grad_output.stride(), *input_strides, **flags, ALIGN=_tensor_align(input, input_strides),
            )
    # Sum the splits in a fixed order (nothing to sum when there is one).
    grad_weight = (weight_partials[0] if splits == 1 else weight_partials.sum(0)).unsqueeze(1).to(input.dtype)
    grad_bias = (bias_partials[0] if splits == 1 else bias_partials.sum(0)).to(input.dtype) if with_bias \
        else grad_output.new_empty(0)
    return grad_weight, grad_bias
