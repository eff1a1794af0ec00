"""Seeding: what makes an epoch depend on ``(seed, epoch, rank)`` only, and a resume exact.

At the start of every epoch :func:`seed_epoch` re-seeds the Python, NumPy and torch (CPU and CUDA)
generators from ``(seed, epoch, rank)``, and so the train loader's ``generator`` (and its
sampler's, when it has one); ``set_epoch(epoch)`` is called on samplers that define it
(DistributedSampler). :func:`rng_state` and :func:`set_rng_state` carry the generators through a
training checkpoint as tensors and primitives (loadable with ``weights_only=True``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A well-mixed 32-bit seed derived from ``(seed, epoch, rank)``."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, rank: int, loader: Iterable) -> None:
    """Re-seed every generator an epoch draws from, so the epoch depends on (seed, epoch) only."""
    value = epoch_seed(seed, epoch, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device
    samplers = [getattr(loader, "sampler", None)]
    samplers.append(getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    generators = [getattr(loader, "generator", None)]
    generators += [getattr(s, "generator", None) for s in samplers]
    seen: set[int] = set()
    for gen in generators:
        if isinstance(gen, torch.Generator) and id(gen) not in seen:
            gen.manual_seed(value)
            seen.add(id(gen))
    for sampler in {id(s): s for s in samplers if s is not None}.values():
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def rng_state() -> dict[str, Any]:
    """Generator states as tensors and primitives (loadable with ``weights_only=True``)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def seed_loader(loader: Any, seed: int) -> None:
    """Fix the order and the augmentations of the next pass over ``loader``.

    Seeds torch's global generator and the loader's own ``generator`` (as
    :func:`decomp.data.make_loader` gives it), so that, for example, batch-norm calibration sees
    the same batches whether a baseline was just trained or loaded from a cache.
    """
    torch.manual_seed(seed)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
