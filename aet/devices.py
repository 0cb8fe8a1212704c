"""Is an NVIDIA GPU really there? The one rule that training and serving share for `--device auto`.

A CUDA-enabled build of a library (torch, onnxruntime) says little: the machine also needs an
NVIDIA device node and, when the tool is installed, `nvidia-smi -L` listing a GPU. Each caller
adds its own library's check (`torch.cuda.is_available()`, onnxruntime's CUDA provider).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")


def nvidia_device_node_present() -> bool:
    """True when /dev holds an NVIDIA GPU device node (nvidia0, nvidia1, ...)."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def nvidia_gpu_present() -> bool:
    """True when an NVIDIA device node exists and `nvidia-smi -L` (if installed) lists a GPU."""
    if not nvidia_device_node_present():
        return False
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return True
    try:
        listing = subprocess.run(
            [nvidia_smi, "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout
