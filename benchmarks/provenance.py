"""Where numbers came from: machine, driver, library versions, git commit, date and the exact command."""

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

import lkconv
from lkconv.backends import cuda_backend

REPO = Path(__file__).resolve().parent.parent


def _command_output(*command: str) -> Optional[str]:
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def device_name() -> str:
    """The GPU's name, or the CPU's architecture and torch's thread count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def provenance(settings: dict) -> dict:
    """Everything needed to tell later which machine and code produced the numbers, plus the run's `settings`."""
    import numpy

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = torch.cuda.is_available()
    in_repository = _command_output("git", "rev-parse", "--show-toplevel") == str(REPO)
    status = _command_output("git", "status", "--porcelain", "--untracked-files=no") if in_repository else None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # A copy of the tree without .git (as on a lent GPU machine) passes the commit in LKCONV_GIT_COMMIT.
        "git_commit": (_command_output("git", "rev-parse", "HEAD") if in_repository else None)
        or os.environ.get("LKCONV_GIT_COMMIT"),
        "git_dirty": None if status is None else bool(status),
        "device": device_name(),
        "driver": (_command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
                   if on_gpu else None),
        "cuda": torch.version.cuda,
        # The cuda backend runs on lkconv._C's own CUDA runtime (linked statically), which may differ from torch's.
        "lkconv_cuda_runtime": cuda_backend.extension_cuda_runtime(),
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "lkconv": lkconv.__version__,
        "lkconv_backends_available": lkconv.available_backends(),
        "command": " ".join([Path(sys.executable).name, *getattr(sys, "orig_argv", sys.argv)[1:]]),
        **settings,
    }
