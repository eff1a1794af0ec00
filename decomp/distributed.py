"""torchrun set-up: join the process group, who is rank 0, keep the ranks in step."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

logger = logging.getLogger(__name__)


def setup_distributed() -> tuple[int, int, int]:
    """Join the torchrun process group when the environment asks for one.

    When ``WORLD_SIZE`` > 1 and no process group exists yet, it is created (``nccl`` when CUDA is
    available, else ``gloo``) and, on CUDA, the current device is set to ``LOCAL_RANK``.

    Returns:
        ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` for a single process.
    """
    initialized = dist.is_available() and dist.is_initialized()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not initialized:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not initialized:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        logger.info("joined process group: rank %d of %d (%s)", dist.get_rank(), world, backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def cleanup_distributed() -> None:
    """Destroy the default process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True unless this is a torchrun process other than rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier(world: int) -> None:
    """Wait for every rank (nothing to do in a single process)."""
    if world > 1:
        dist.barrier()


def broadcast_buffers(model: nn.Module, world: int) -> None:
    """Make every rank's buffers (BN statistics) equal to rank 0's."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def check_samplers(train_loader: Iterable, val_loader: Iterable | None) -> None:
    """Warn about loaders that do not shard the way a distributed run needs."""
    if not isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
        logger.warning("distributed run without a DistributedSampler: every rank sees all the data")
    if isinstance(getattr(val_loader, "sampler", None), DistributedSampler):
        logger.warning("the validation loader is sharded; rank 0 evaluates only its shard")
