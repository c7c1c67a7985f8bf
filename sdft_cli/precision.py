"""Devices and compute precision: where a run computes, and in which dtype its weights and compute are.

Weights and optimizer state stay in ``model.dtype`` (fp32 by default); compute runs under bf16 autocast
where the device supports it. Generation and evaluation copies take the compute dtype (``auto``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sdft_cli.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), where autocast is a real speed-up."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32 compute)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if precision == "bf16" or cpu_supports_bf16():
        return torch.bfloat16
    return None


def inference_dtype(setting: str, autocast: torch.dtype | None) -> torch.dtype | None:
    """Weights dtype for generation/evaluation copies: ``auto`` = bf16 when compute runs in bf16."""
    if setting == "auto":
        return autocast
    return DTYPES[setting]


def autocast(dtype: torch.dtype | None, device: torch.device):
    """A bf16 autocast context (weights and optimizer state stay in their own dtype), or a no-op."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the operating system (glibc's
    ``malloc_trim``): after an evaluation its freed buffers would otherwise stay in the process's resident
    set, and a CPU run's peak would be that residue plus the next stage's own peak. A no-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
