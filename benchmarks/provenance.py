"""Where numbers came from: machine, driver, library versions, git commit, date and the exact command."""

import datetime
import os
import platform
import re
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


COMMIT_VARIABLE = "LKCONV_GIT_COMMIT"


def passed_commit() -> tuple[Optional[str], Optional[bool]]:
    """The commit and whether the tree differed from it, as a copy of the tree without .git (a lent GPU machine's)
    is told them: LKCONV_GIT_COMMIT holds `git describe --always --dirty --abbrev=40`, a hash with "-dirty" added
    when tracked files had changes. (None, None) when unset; anything but a hex hash raises, so that a results file
    never names a commit that is not one."""
    value = os.environ.get(COMMIT_VARIABLE)
    if not value:
        return None, None
    # A tagged history makes describe print TAG-N-gHASH: the hash is what identifies the commit.
    match = re.fullmatch(r"(?:.+-g)?([0-9a-f]{7,40})(-dirty)?", value)
    if match is None:
        raise ValueError(f"{COMMIT_VARIABLE} must be a commit hash, with '-dirty' where the tree had changes (the "
                         f"output of `git describe --always --dirty --abbrev=40`); got {value!r}")
    return match[1], match[2] is not None


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
    if in_repository:
        commit = _command_output("git", "rev-parse", "HEAD")
        status = _command_output("git", "status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    else:
        commit, dirty = passed_commit()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
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
