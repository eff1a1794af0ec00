"""Where a run computes and in what precision: the device, autocast, channels-last batches."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor

from decomp._utils import check_choice

logger = logging.getLogger(__name__)

AMP_MODES = ("auto", "bf16", "fp16", "off")

_notices_given: set[str] = set()


def pick_device(
    device: torch.device | str | None = None,
    *,
    local_rank: int | None = None,
    notice: str = "running on the CPU",
) -> torch.device:
    """The given device, else CUDA when available, else the CPU.

    Args:
        device: an explicit choice, returned as is.
        local_rank: under torchrun, the process's GPU (``cuda:LOCAL_RANK``).
        notice: what to say (once per process and notice) when no GPU is found, after
            "no GPU found; ".
    """
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
    if notice not in _notices_given:
        logger.warning("no GPU found; %s", notice)
        _notices_given.add(notice)
    return torch.device("cpu")


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an AMP ``mode`` on ``device``, or None for full precision.

    ``"auto"`` is bf16 on CUDA devices that support it, else fp16; there is no AMP on the CPU.
    """
    check_choice("amp", mode, AMP_MODES)
    if device.type != "cuda":
        if mode in ("bf16", "fp16"):
            logger.info("amp=%s needs CUDA; training in float32 on %s", mode, device)
        return None
    if mode == "off":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``dtype``, or nothing for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """A batch moved to ``device``, in channels-last memory format when asked (4-D only)."""
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
