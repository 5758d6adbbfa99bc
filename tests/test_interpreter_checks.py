"""The interpreter's launch checks (conftest's checked_triton_launches) catch what they exist for: each tiny kernel
here breaks one promise that only a GPU would otherwise expose."""

import pytest
import torch
import triton
import triton.language as tl

from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="checks the Triton interpreter's launch hooks (CPU only)")


@triton.jit
def _copy(src_ptr, dst_ptr, n, HINT: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """dst[:n] = src[:n] in blocks of BLOCK, one block per program; HINT claims each block start is a multiple of
    HINT; MASKED=False drops the bounds mask."""
    start = tl.program_id(0) * BLOCK
    if HINT > 1:
        start = tl.multiple_of(start, HINT)
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < n if MASKED else offsets >= 0
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def _sum_into_first(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    """Every program stores its block's sum at dst[0]: a race between programs on a GPU."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr, tl.sum(tl.load(src_ptr + offsets), axis=0))


def test_a_correct_launch_passes():
    src = torch.randn(40)
    dst = torch.empty(40)
    _copy[(3,)](src, dst, 40, HINT=16, MASKED=True, BLOCK=16)
    assert torch.equal(dst, src)


def test_a_false_alignment_hint_fails():
    src = torch.randn(40)
    with pytest.raises(Exception, match=r"tl.multiple_of\(32\) is false"):
        _copy[(3,)](src, torch.empty(40), 40, HINT=32, MASKED=True, BLOCK=16)


def test_an_access_past_the_tensors_fails():
    src = torch.randn(40)
    with pytest.raises(Exception, match="outside every tensor of the launch"):
        _copy[(3,)](src, torch.empty(40), 40, HINT=1, MASKED=False, BLOCK=16)


def test_an_access_past_a_view_inside_its_storage_fails():
    storage = torch.randn(64)
    with pytest.raises(Exception, match="outside every tensor of the launch"):
        _copy[(3,)](storage[:40], torch.empty(64)[:40], 40, HINT=1, MASKED=False, BLOCK=16)


def test_two_programs_storing_one_address_fail():
    with pytest.raises(Exception, match="stored 3 times in one launch"):
        _sum_into_first[(3,)](torch.randn(48), torch.empty(1), BLOCK=16)
