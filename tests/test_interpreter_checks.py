"""The interpreter's launch checks (conftest's checked_triton_launches) catch what they exist for: each tiny kernel
here keeps or breaks one promise that only a GPU would otherwise expose."""

import pytest
import torch
import triton
import triton.language as tl

from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="checks the Triton interpreter's launch hooks (CPU only)")


@triton.jit
def _copy(src_ptr, dst_ptr, n, HINT: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """dst[:n] = src[:n] in blocks of BLOCK, one block per program; HINT claims each block's offsets start on a
    multiple of HINT (the usual idiom); MASKED=False drops the bounds mask."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if HINT > 1:
        offsets = tl.multiple_of(offsets, HINT)
    mask = offsets < n if MASKED else offsets >= 0
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def _sum_into_first(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    """Every program stores its block's sum at dst[0]."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr, tl.sum(tl.load(src_ptr + offsets), axis=0))


@triton.jit
def _write_then_read(dst_ptr, SHIFT: tl.constexpr):
    """Program i stores i at dst[i], overwrites it with i + 1, then reads dst[i - SHIFT] (a neighbour's if SHIFT)."""
    i = tl.program_id(0)
    tl.store(dst_ptr + i, i.to(tl.float32))
    tl.store(dst_ptr + i, i.to(tl.float32) + 1)
    value = tl.load(dst_ptr + i - SHIFT, mask=i >= SHIFT, other=0.0)
    tl.store(dst_ptr + i, value + 1, mask=i >= SHIFT)


def test_a_correct_launch_passes():
    src = torch.randn(40)
    dst = torch.empty(40)
    _copy[(3,)](src, dst, 40, HINT=16, MASKED=True, BLOCK=16)
    assert torch.equal(dst, src)


def test_a_false_alignment_hint_fails():
    with pytest.raises(Exception, match=r"tl.multiple_of\(\.\.\., \[32\]\) is false: 16 starts a run"):
        _copy[(3,)](torch.randn(40), torch.empty(40), 40, HINT=32, MASKED=True, BLOCK=16)


def test_an_access_past_the_tensors_fails():
    with pytest.raises(Exception, match="lies in no one tensor of the launch"):
        _copy[(3,)](torch.randn(40), torch.empty(40), 40, HINT=1, MASKED=False, BLOCK=16)


def test_an_access_past_a_view_inside_its_storage_fails():
    storage = torch.randn(64)
    with pytest.raises(Exception, match="lies in no one tensor of the launch"):
        _copy[(3,)](storage[:40], torch.empty(64)[:40], 40, HINT=1, MASKED=False, BLOCK=16)


def test_a_load_running_from_one_tensor_into_another_fails():
    storage = torch.randn(96)
    with pytest.raises(Exception, match="lies in no one tensor of the launch"):
        _copy[(3,)](storage[:40], storage[48:88], 40, HINT=1, MASKED=False, BLOCK=16)


def test_two_programs_storing_one_address_fail():
    with pytest.raises(Exception, match="stored by several programs of one launch"):
        _sum_into_first[(3,)](torch.randn(48), torch.empty(1), BLOCK=16)


def test_a_program_may_store_an_address_twice_and_read_it_back():
    dst = torch.empty(4)
    _write_then_read[(4,)](dst, SHIFT=0)
    assert torch.equal(dst, torch.arange(4.0) + 2)


def test_a_program_reading_what_another_stored_fails():
    with pytest.raises(Exception, match="loaded by one program and stored by another"):
        _write_then_read[(4,)](torch.empty(4), SHIFT=1)
