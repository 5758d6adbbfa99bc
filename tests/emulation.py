"""Shared by the emulation tests: builds a host emulator of csrc/ kernels (tests/cuda_emulation) with g++ and the
sanitizers, feeds it tensors and reads back what the kernel wrote. The kernels' own source runs on a CPU, one host
thread per CUDA thread, so their indexing, tiling and masks are tested without a GPU."""

import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "cuda_emulation"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # lkconv::DType
# Every emulated case runs twice: under AddressSanitizer and UBSan (out-of-bounds and misaligned accesses), and under
# ThreadSanitizer, which names any shared memory one thread writes and another reads with no barrier between: the
# missing-__syncthreads race a GPU would only show as occasional wrong results.
SANITIZERS = ("address,undefined", "thread")


def cuda_include_flags() -> list[str]:
    """The include flags nvcc itself uses (its toolkit headers hold the fp16/bf16 types the kernels read)."""
    nvcc = shutil.which("nvcc")
    assert nvcc is not None, "nvcc is on every machine lkconv builds on (README); it is not on PATH here"
    dry_run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                             capture_output=True, text=True)
    found = re.search(r'INCLUDES="([^"]*)"', dry_run.stderr + dry_run.stdout)
    assert found, f"nvcc --dryrun did not list its include directories:\n{dry_run.stderr}"
    return found.group(1).split()


def build_emulator(source: str, directory: Path, sanitizers: str = "address,undefined") -> Path:
    """Compiles tests/cuda_emulation/`source` with `sanitizers`, warnings as errors; returns the binary. By default
    AddressSanitizer and UBSan: any access outside a tensor, or a misaligned vector load, stops it. "thread"
    (ThreadSanitizer) instead reports shared memory one thread writes and another reads with no barrier between."""
    binary = directory / f"{Path(source).stem}_{sanitizers.replace(',', '_')}"
    command = ["g++", "-std=c++20", "-O1", "-g", f"-fsanitize={sanitizers}", "-fno-sanitize-recover=all",
               "-Wall", "-Wno-attributes", "-Wno-unknown-pragmas", "-Werror", "-pthread", "-I", str(ROOT / "csrc"),
               *cuda_include_flags(), str(EMULATION / source), "-o", str(binary)]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, f"building the emulation failed:\n{built.stderr}"
    return binary


# Elements between the images of a FarImages map: every offset into its second image needs more than 32 bits.
FAR = 2**31 + 64


class FarImages(NamedTuple):
    """A contiguous map described to an emulator with its images FAR elements apart. Only the images travel; the
    emulator places them in a reservation of the whole span whose other pages fault (host_harness.h). This tests the
    kernels' int64 offsets without tensors of 2^31 elements."""

    images: torch.Tensor


def as_map(t: torch.Tensor, layout: str):
    """`t` as a test case hands it to an emulator: FarImages for the layout "far", else the tensor itself."""
    return FarImages(t.contiguous()) if layout == "far" else t


def tensor_of(m) -> torch.Tensor:
    """The tensor behind what `as_map` or `nan_buffer` returned."""
    return m.images if isinstance(m, FarImages) else m


def span(t: torch.Tensor) -> int:
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _raw(t: torch.Tensor) -> bytes:
    """The elements a strided tensor spans in its storage, from its first one, as raw bytes."""
    flat = torch.as_strided(t, (span(t),), (1,), t.storage_offset())
    return flat.contiguous().view(torch.uint8).numpy().tobytes()


def _payload(m) -> bytes:
    """What follows the header for a map or tensor: its span, or for FarImages the segment table and the images."""
    if not isinstance(m, FarImages):
        return _raw(m)
    n, image = m.images.shape[0], m.images[0].numel()
    table = [value for i in range(n) for value in (i * FAR, image)]
    return np.asarray(table, dtype=np.int64).tobytes() + m.images.view(torch.uint8).numpy().tobytes()


def map_fields(m) -> list[int]:
    """A tensor (or FarImages) as the emulators read a map: sizes, element strides, span and segment count."""
    if isinstance(m, FarImages):
        n, c, h, w = m.images.shape
        return [n, c, h, w, FAR, h * w, w, 1, (n - 1) * FAR + c * h * w, n]
    return [*m.shape, *m.stride(), span(m), 0]


def run_emulator(emulator: Path, tmp_path: Path, mode: str, header: list[int], tensors) -> subprocess.CompletedProcess:
    """Runs the emulator in `mode` on the header fields and tensors (or FarImages); its output goes to tmp_path/out."""
    payload = np.asarray(header, dtype=np.int64).tobytes() + b"".join(_payload(t) for t in tensors)
    (tmp_path / "in").write_bytes(payload)
    return subprocess.run([str(emulator), mode, str(tmp_path / "in"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=600)


def emulate(emulator: Path, tmp_path: Path, mode: str, header: list[int], tensors) -> bytes:
    """Runs the emulator in `mode` on the header fields and tensors (or FarImages); returns what it wrote."""
    result = run_emulator(emulator, tmp_path, mode, header, tensors)
    assert result.returncode == 0, f"the emulated kernel failed:\n{result.stderr[-4000:]}"
    return (tmp_path / "out").read_bytes()


def written_view(raw: bytes, like) -> torch.Tensor:
    """The span `raw` the emulator wrote back for the NaN-filled buffer `like`, viewed with like's sizes and strides.
    Elements of the span outside the view (the gaps of a sliced buffer) must still be NaN: a kernel writes its view
    only. For FarImages, `raw` is the images, and whatever lies between them faulted if written."""
    if isinstance(like, FarImages):
        return torch.from_numpy(np.frombuffer(raw, np.uint8).copy()).view(like.images.dtype).view(like.images.shape)
    flat = torch.from_numpy(np.frombuffer(raw, np.uint8).copy()).view(like.dtype)
    covered = torch.zeros(flat.numel(), dtype=torch.bool)
    torch.as_strided(covered, like.shape, like.stride()).fill_(True)
    assert flat[~covered].isnan().all(), "the kernel wrote into the buffer outside its view"
    return torch.as_strided(flat, like.shape, like.stride())


def read_weight_grad(raw: bytes, splits: int, channels: int, taps: int, dtype: torch.dtype, finite_inputs=True):
    """What a weight-grad mode wrote: the splits the launch used, their fp32 partials (used, C*m, taps + 1), and
    grad_weight (C*m * taps) and grad_bias (C*m) from the reduce. Every used partial must be written and no other
    (with non-finite inputs a written partial may be NaN too, so only the second is checked)."""
    used = int(np.frombuffer(raw[:8], np.int64)[0])
    partial_end = 8 + 4 * splits * channels * (taps + 1)
    partials = torch.from_numpy(np.frombuffer(raw[8:partial_end], np.float32).copy())
    partials = partials.view(splits, channels, taps + 1)
    assert 1 <= used <= splits, f"the launch used {used} splits of the {splits} the workspace holds"
    assert not finite_inputs or not partials[:used].isnan().any(), "a partial sum was left unwritten"
    assert partials[used:].isnan().all(), "a partial past the splits used was written"
    results = torch.from_numpy(np.frombuffer(raw[partial_end:], np.uint8).copy()).view(dtype)
    return used, partials[:used], results[:channels * taps], results[channels * taps:]


def random_tensor(shape, dtype, channels_last=False):
    t = torch.randn(shape, dtype=torch.float64).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def nan_buffer(shape, dtype, layout):
    """Uninitialised-looking output: NaN everywhere, so an unwritten element fails the comparison. The layouts:
    "nchw", "channels_last", "sliced" and "far" (FarImages)."""
    if layout == "far":
        return FarImages(torch.full(shape, float("nan"), dtype=dtype))
    if layout == "sliced":  # every other column of a wider buffer: a non-unit stride along W
        wide = torch.full((*shape[:3], 2 * shape[3]), float("nan"), dtype=dtype)
        return wide[..., ::2]
    buffer = torch.full(shape, float("nan"), dtype=dtype)
    return buffer.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else buffer
