"""Choice of the torch device and of mixed precision.

``"auto"`` picks CUDA when available, then Apple MPS, then the CPU; any other name
(``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) is taken as given and checked. Mixed precision
means bfloat16 autocast and is used on CUDA only (elsewhere it is a no-op).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import ContextManager

import torch


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device called ``name``; under torchrun, ``local_rank`` selects the CUDA device."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif _mps_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device '{name}' (auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' was asked for but CUDA is not available")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    elif device.type == "mps" and not _mps_available():
        raise ValueError(f"device '{name}' was asked for but Apple MPS is not available")
    return device


def keep_freed_memory() -> bool:
    """Make glibc keep freed large blocks for reuse instead of returning them to the system.

    By default every freed block over ~128 KiB-32 MiB goes back to the kernel, and the next batch's
    images and activations fault in fresh pages (here ~3 ms per 64-stamp batch, 15-20 % of a CPU
    training step). Raising malloc's mmap and trim thresholds keeps them in the heap: memory stays
    at the working set's peak. The same effect as the jemalloc/tcmalloc advice of PyTorch's CPU
    tuning guides, without preloading a library. Returns False where this is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                and libc.mallopt(m_trim_threshold, 1 << 30))


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def uses_mixed_precision(device: torch.device, requested: bool) -> bool:
    """bf16 autocast is used only when requested and on CUDA."""
    return requested and device.type == "cuda"


def autocast(device: torch.device, enabled: bool) -> ContextManager[None]:
    """bf16 autocast context on CUDA when ``enabled``; a null context otherwise."""
    if uses_mixed_precision(device, enabled):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
