"""Work and floors of a depthwise conv pass: useful FLOPs (taps that land inside the image), minimum bytes, and
the H100 roofline floor they imply (REFERENCE.md §4)."""

import math
from typing import NamedTuple, Optional

import torch

# H100 SXM peaks from REFERENCE.md §4. On another GPU the "% of floor" columns still compare to these.
PEAK_FP32_FMA = 67e12
PEAK_TF32 = 495e12
PEAK_16BIT_TENSOR_CORE = 989e12
HBM_BYTES_PER_S = 3.35e12
# REFERENCE.md §4's bf16 tensor-core floors (with the Toeplitz form's waste) per pass, in ms, for the shapes it lists:
# issue 5's 40% goal is stated against these. (input shape, K) -> ms.
REFERENCE_16BIT_FLOORS_MS = {
    ((64, 384, 64, 64), 31): 0.24,
    ((64, 128, 56, 56), 31): 0.061,
    ((64, 256, 28, 28), 29): 0.020,
    ((64, 512, 14, 14), 27): 0.0025,
    ((64, 1024, 7, 7), 13): 0.0003,
}
FLOORS_NOTE = ("H100 SXM peaks (REFERENCE.md §4): fp32 FMA 67, TF32 495, bf16/fp16 tensor core 989 TFLOP/s, HBM "
               "3.35 TB/s. floor = max(useful FLOPs / peak, minimum bytes / HBM); the 16-bit floor counts no Toeplitz "
               "waste, so it is stricter than REFERENCE §4's bf16 column, which '% §4 16-bit' uses for the shapes §4 "
               "lists (or the memory floor, where that is larger). '% memory' is the memory floor's fraction alone. "
               "On another GPU the fractions still use these H100 peaks.")

PASSES = ("forward", "input_grad", "weight_grad", "fwd_bwd")


class ConvCase(NamedTuple):
    """One depthwise conv: input (N, C, H, W), a kh x kw kernel with 'same' padding (k // 2), stride 1."""

    shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    dtype: torch.dtype

    @property
    def padding(self) -> tuple[int, int]:
        return self.kernel[0] // 2, self.kernel[1] // 2

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        n, c, h, w = self.shape
        (kh, kw), (ph, pw) = self.kernel, self.padding
        return n, c, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} K={self.kernel[0]}x{self.kernel[1]} {self.dtype_name}"


def useful_taps_per_axis(size: int, kernel: int, padding: int) -> int:
    """Sum over output positions of the kernel taps that land inside the image, along one axis (stride 1).

    A 2-D conv's useful multiply-adds per map are the product of the two axes' sums, because a tap (r, q) is
    inside the image exactly when r is inside along H and q is inside along W.
    """
    outputs = size + 2 * padding - kernel + 1
    total = 0
    for o in range(max(outputs, 0)):
        first = max(0, padding - o)
        last = min(kernel - 1, size - 1 - o + padding)
        total += max(0, last - first + 1)
    return total


def useful_flops(case: ConvCase, pass_name: str) -> int:
    """2 x useful multiply-adds; forward, input grad and weight grad each do the same products, fwd_bwd all three."""
    n, c, h, w = case.shape
    per_pass = 2 * n * c * useful_taps_per_axis(h, case.kernel[0], case.padding[0]) * useful_taps_per_axis(
        w, case.kernel[1], case.padding[1])
    return per_pass * (3 if pass_name == "fwd_bwd" else 1)


def minimum_bytes(case: ConvCase, pass_name: str) -> int:
    """Bytes a pass must move at least once: its two big tensors in or out, plus the weight."""
    element = torch.finfo(case.dtype).bits // 8
    maps = math.prod(case.shape) + math.prod(case.output_shape)
    weight = case.shape[1] * case.kernel[0] * case.kernel[1]
    return element * (maps + weight) * (3 if pass_name == "fwd_bwd" else 1)


class Floor(NamedTuple):
    """A pass's lower bound in ms: the compute floor and the memory floor; the larger binds."""
    compute_ms: float
    memory_ms: float

    @property
    def ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


def floor(case: ConvCase, pass_name: str, tf32: bool) -> Floor:
    """The H100 roofline floor of a pass: fp32 on FMA units (or TF32 tensor cores when allowed), 16-bit on tensor
    cores."""
    if case.dtype == torch.float32:
        peak = PEAK_TF32 if tf32 else PEAK_FP32_FMA
    else:
        peak = PEAK_16BIT_TENSOR_CORE
    return Floor(useful_flops(case, pass_name) / peak * 1e3, minimum_bytes(case, pass_name) / HBM_BYTES_PER_S * 1e3)


def reference_16bit_floor_ms(case: ConvCase, pass_name: str) -> Optional[float]:
    """REFERENCE.md §4's bf16 tensor-core floor of a 16-bit pass on a shape it lists (fwd_bwd: three passes' worth),
    else None."""
    if case.dtype == torch.float32 or case.kernel[0] != case.kernel[1]:
        return None
    per_pass = REFERENCE_16BIT_FLOORS_MS.get((tuple(case.shape), case.kernel[0]))
    return None if per_pass is None else per_pass * (3 if pass_name == "fwd_bwd" else 1)
