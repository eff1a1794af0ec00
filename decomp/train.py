"""Training and fine-tuning: knowledge distillation, AMP on CUDA, torchrun/DDP, checkpoints, resume.

One entry point, :func:`train`, serves both jobs of the project: training a baseline from scratch
(``schedule="onecycle"``) and fine-tuning a compressed model, optionally distilled from the original
(``teacher=...``). It never re-initialises the model: the first forward pass uses the weights it is
given, and the starting weights are evaluated as "epoch 0", so fine-tuning can never return a model
worse (on the validation set) than the one it was handed. The loss, optimiser and schedules are
in :mod:`decomp.optim`, the torchrun plumbing in :mod:`decomp.distributed`.

Reproducibility and resume
--------------------------
At the start of every epoch :func:`decomp.seeding.seed_epoch` re-seeds the Python, NumPy and torch
(CPU and CUDA) generators from ``(config.seed, epoch, rank)``, and so is the train loader's
``generator`` (and its sampler's, when it has one); ``set_epoch(epoch)`` is called on samplers that
define it (DistributedSampler). The data order, augmentations and dropout masks of an epoch
therefore depend only on the seed and the epoch number, which is what lets a run that was killed
and resumed from its last checkpoint end with exactly the weights of an uninterrupted run
(bit-exact on the CPU with ``num_workers=0``; on CUDA only as deterministic as the kernels are).
This re-seeds the caller's loader generator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from decomp._utils import atomic_write, atomic_write_text, check_choice, training_flags
from decomp.devices import AMP_MODES, autocast, autocast_dtype, pick_device, to_device
from decomp.distributed import (
    barrier,
    broadcast_buffers,
    check_samplers,
    setup_distributed,
)
from decomp.metrics import macro_f1
from decomp.optim import (
    OPTIMIZERS,
    SCHEDULES,
    build_optimizer,
    build_scheduler,
    distillation_loss,
)
from decomp.seeding import rng_state, seed_epoch, set_rng_state

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "decomp.train/1"

# config fields that may change between a run and its resumption without a warning
_RESUME_FREE_FIELDS = {"resume", "max_epochs_this_run", "log_path", "checkpoint_path", "epochs"}


# --------------------------------------------------------------------------------------------------
# configuration and result
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one training run.

    Attributes:
        epochs: total number of epochs of the run (a resumed run continues up to this number).
        lr: peak learning rate.
        optimizer: ``"sgd"`` (Nesterov, ``momentum``) or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: applied to weights with 2 or more dimensions; biases and batch-norm
            parameters get none.
        schedule: ``"cosine"`` (linear warm-up for ``warmup_epochs``, then cosine to 0; for
            fine-tuning), ``"onecycle"`` (30 % cosine ramp from lr/25 up to lr, then cosine down to
            lr/2.5e5; for training from scratch) or ``"constant"``. Stepped every batch.
        warmup_epochs: length of the cosine schedule's warm-up, in epochs (may be fractional).
        label_smoothing: label smoothing of the cross-entropy term.
        kd_alpha: weight of the distillation term when a teacher is given, in [0, 1].
        kd_temperature: distillation temperature T (> 0).
        amp: ``"auto"`` (bf16 autocast on CUDA when supported, else fp16 with a GradScaler),
            ``"bf16"``, ``"fp16"`` or ``"off"``. Always off on the CPU.
        channels_last: use the channels-last memory format (CUDA only).
        seed: seed of the per-epoch re-seeding (see the module docstring).
        grad_clip: maximum global gradient norm, or None for no clipping.
        log_path: JSON-lines file with one row per epoch (rewritten atomically each epoch).
        checkpoint_path: checkpoint written atomically after every epoch, or None.
        resume: continue from ``checkpoint_path`` when it exists (start afresh when it does not).
        max_epochs_this_run: stop after this many epochs in this call (for time-sliced jobs);
            a later call with ``resume=True`` continues.
    """

    epochs: int = 10
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    amp: str = "auto"
    channels_last: bool = True
    seed: int = 0
    grad_clip: float | None = None
    log_path: str | os.PathLike[str] | None = None
    checkpoint_path: str | os.PathLike[str] | None = None
    resume: bool = False
    max_epochs_this_run: int | None = None

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("amp", self.amp, AMP_MODES)
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0; got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1]; got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0; got {self.kd_temperature}")
        if self.max_epochs_this_run is not None and self.max_epochs_this_run < 1:
            raise ValueError(f"max_epochs_this_run must be >= 1; got {self.max_epochs_this_run}")
        if self.resume and self.checkpoint_path is None:
            raise ValueError("resume=True needs a checkpoint_path")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (paths as strings), as stored in checkpoints."""
        out = dataclasses.asdict(self)
        for key in ("log_path", "checkpoint_path"):
            if out[key] is not None:
                out[key] = str(out[key])
        return out


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        best_f1: best validation macro F1 (NaN without a validation loader).
        best_epoch: epoch of that F1; 0 means the weights the run started from.
        history: one dict per epoch: epoch, train_loss (None for epoch 0), val_f1, val_accuracy,
            lr, seconds.
        model: the trained model (the same object that was passed in), holding the best weights.
        finished: False when the run stopped early because of ``max_epochs_this_run``.
    """

    best_f1: float
    best_epoch: int
    history: list[dict[str, Any]]
    model: nn.Module
    finished: bool


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _predict(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[Tensor, Tensor, int]:
    """Predicted and true labels over ``loader`` (model in eval mode), and the class count."""
    model.eval()
    preds, labels, num_classes = [], [], 0
    for images, targets in loader:
        with autocast(device, amp_dtype):
            logits = model(to_device(images, device, channels_last))
        num_classes = logits.shape[1]
        preds.append(logits.argmax(dim=1).cpu())
        labels.append(targets.cpu())
    if not preds:
        raise ValueError("the validation loader yielded no batches")
    return torch.cat(preds), torch.cat(labels), num_classes


def _classification_metrics(preds: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Macro F1 (every class counted, zero_division=0) and accuracy."""
    classes = max(num_classes, int(labels.max()) + 1)
    f1 = macro_f1(labels, preds, classes)
    return {"f1": f1, "accuracy": float((preds == labels).float().mean())}


def _evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    preds, labels, num_classes = _predict(model, loader, device, amp_dtype, channels_last)
    return _classification_metrics(preds, labels, num_classes)


# --------------------------------------------------------------------------------------------------
# checkpoint and log files
# --------------------------------------------------------------------------------------------------


def save_checkpoint_atomic(payload: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save(payload, path)`` atomically: readers see the old file or the new one."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp), parents=True)


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history), parents=True)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a training checkpoint written by :func:`train` (``weights_only=True``, onto the CPU)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a training checkpoint (expected format {CHECKPOINT_FORMAT})")
    return payload


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Mutable state of one training run."""

    model: nn.Module
    net: nn.Module  # ``model`` or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    rank: int
    world: int
    epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_f1: float = float("nan")
    best_epoch: int = -1
    best_state: dict[str, Tensor] | None = None


def _cpu_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _prepare(module: nn.Module, device: torch.device, channels_last: bool) -> None:
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)


def _start_run(
    model: nn.Module,
    train_loader: Iterable,
    config: TrainConfig,
    device: torch.device,
    distributed: tuple[int, int],
) -> _Run:
    rank, world = distributed
    amp_dtype = autocast_dtype(config.amp, device)
    channels_last = config.channels_last and device.type == "cuda"
    _prepare(model, device, channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, _steps_per_epoch(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run = _Run(
        model, model, optimizer, scheduler, scaler, device, amp_dtype, channels_last, rank, world
    )
    if config.resume:
        _resume(run, config)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        run.net = DistributedDataParallel(model, device_ids=ids)
    return run


def _steps_per_epoch(loader: Iterable) -> int:
    try:
        return max(1, len(loader))  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("the train loader must have a length (steps per epoch)") from None


def _resume(run: _Run, config: TrainConfig) -> None:
    path = Path(config.checkpoint_path)  # type: ignore[arg-type]
    if not path.exists():
        logger.info("no checkpoint at %s; starting from the given weights", path)
        return
    ckpt = load_checkpoint(path)
    _warn_config_changes(ckpt["config"], config.to_dict())
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    run.epoch, run.history = ckpt["epoch"], list(ckpt["history"])
    run.best_f1, run.best_epoch, run.best_state = ckpt["best_f1"], ckpt["best_epoch"], ckpt["best"]
    logger.info("resumed from %s after epoch %d (best F1 %.4f)", path, run.epoch, run.best_f1)


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any]) -> None:
    changed = sorted(
        k for k in current if k not in _RESUME_FREE_FIELDS and saved.get(k) != current[k]
    )
    if changed:
        logger.warning("resuming with changed settings: %s", ", ".join(changed))


def _checkpoint_payload(run: _Run, config: TrainConfig) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": run.epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(),
        "best_f1": run.best_f1,
        "best_epoch": run.best_epoch,
        "best": run.best_state,
        "history": run.history,
        "config": config.to_dict(),
    }


def _train_step(
    run: _Run, images: Tensor, labels: Tensor, teacher: nn.Module | None, config: TrainConfig
) -> Tensor:
    with autocast(run.device, run.amp_dtype):
        logits = run.net(images)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(images)
    loss = distillation_loss(
        logits,
        labels,
        teacher_logits,
        config.kd_alpha,
        config.kd_temperature,
        config.label_smoothing,
    )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if config.grad_clip is not None:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return loss.detach()


def _train_epoch(
    run: _Run, loader: Iterable, teacher: nn.Module | None, config: TrainConfig, bar: Any
) -> float:
    """One pass over ``loader``; returns the sample-weighted mean loss over all ranks."""
    run.net.train()
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)
    title = f"epoch {run.epoch + 1}/{config.epochs}"
    task = None if bar is None else bar.add_task(title, total=_steps_per_epoch(loader))
    for step, (images, labels) in enumerate(loader):
        images = to_device(images, run.device, run.channels_last)
        labels = labels.to(run.device, non_blocking=True)
        loss = _train_step(run, images, labels, teacher, config)
        totals[0] += loss.double() * labels.shape[0]
        totals[1] += labels.shape[0]
        if task is not None:
            running = f"{title} loss {float(totals[0] / totals[1]):.4f}" if step % 20 == 0 else None
            bar.update(task, advance=1, description=running)
    if run.world > 1:
        dist.all_reduce(totals)
    mean = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    if task is not None:
        bar.update(task, description=f"{title} loss {mean:.4f}")
    return mean


def _validate(run: _Run, loader: Iterable | None) -> dict[str, float] | None:
    """Rank 0 evaluates the (buffer-synchronised) model; every rank receives the same numbers."""
    if loader is None:
        return None
    values = torch.zeros(2, dtype=torch.float64, device=run.device)
    if run.rank == 0:
        metrics = _evaluate(run.model, loader, run.device, run.amp_dtype, run.channels_last)
        values[0], values[1] = metrics["f1"], metrics["accuracy"]
    if run.world > 1:
        dist.broadcast(values, src=0)
    return {"f1": float(values[0]), "accuracy": float(values[1])}


def _record(
    run: _Run, loss: float | None, metrics: dict[str, float] | None, seconds: float
) -> None:
    """Append the epoch's row and keep a copy of the weights when they are the best so far."""
    row = {
        "epoch": run.epoch,
        "train_loss": loss,
        "val_f1": None if metrics is None else metrics["f1"],
        "val_accuracy": None if metrics is None else metrics["accuracy"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "seconds": round(seconds, 3),
    }
    run.history.append(row)
    improved = metrics is not None and not metrics["f1"] <= run.best_f1  # NaN best: first wins
    if improved or metrics is None:
        run.best_f1 = float("nan") if metrics is None else metrics["f1"]
        run.best_epoch, run.best_state = run.epoch, _cpu_copy(run.model)


def _log_epoch(run: _Run, config: TrainConfig) -> None:
    if run.rank != 0:
        return
    row = run.history[-1]
    if row["val_f1"] is None:
        logger.info(
            "epoch %d/%d: loss %.4f (%.1f s)",
            row["epoch"],
            config.epochs,
            row["train_loss"],
            row["seconds"],
        )
    else:
        logger.info(
            "epoch %d/%d: loss %s, val F1 %.4f, accuracy %.4f, lr %.3g (%.1f s)",
            row["epoch"],
            config.epochs,
            "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}",
            row["val_f1"],
            row["val_accuracy"],
            row["lr"],
            row["seconds"],
        )
    if config.log_path is not None:
        _write_log(Path(config.log_path), run.history)


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        yield bar


def _fit(
    run: _Run,
    train_loader: Iterable,
    val_loader: Iterable | None,
    config: TrainConfig,
    teacher: nn.Module | None,
    progress: bool,
) -> bool:
    """Train from ``run.epoch`` on; returns True when ``config.epochs`` was reached."""
    stop = config.epochs
    if config.max_epochs_this_run is not None:
        stop = min(stop, run.epoch + config.max_epochs_this_run)
    with _progress_bar(progress and run.rank == 0) as bar:
        while run.epoch < stop:
            start = time.perf_counter()
            seed_epoch(config.seed, run.epoch, run.rank, train_loader)
            loss = _train_epoch(run, train_loader, teacher, config, bar)
            broadcast_buffers(run.model, run.world)
            metrics = _validate(run, val_loader)
            run.epoch += 1
            _record(run, loss, metrics, time.perf_counter() - start)
            _log_epoch(run, config)
            if run.rank == 0 and config.checkpoint_path is not None:
                save_checkpoint_atomic(_checkpoint_payload(run, config), config.checkpoint_path)
            barrier(run.world)
    return run.epoch >= config.epochs


def train(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    config: TrainConfig,
    teacher: nn.Module | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train or fine-tune ``model`` in place and keep the weights with the best validation F1.

    The model's weights are never re-initialised. Unless resuming, the starting weights are
    evaluated first (history row ``epoch=0``) and compete for "best" like every epoch does.
    Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (build
    ``train_loader`` with a ``DistributedSampler``); rank 0 evaluates on the whole validation set
    and writes the log and checkpoints, and every rank ends with the same weights.

    Args:
        model: the network, already holding the weights to start from; moved to ``device``.
        train_loader: yields ``(images, labels)``; must have a length.
        val_loader: yields ``(images, labels)``, or None (the last epoch is then kept).
        config: hyper-parameters, paths, resume.
        teacher: a model to distil from (put in eval mode for the run, never updated).
        device: default CUDA (``LOCAL_RANK`` under torchrun) when available, else the CPU.
        progress: show a rich progress bar on rank 0.

    Returns:
        A :class:`TrainResult`; ``result.model`` is ``model`` holding the best weights.
    """
    rank, world, local_rank = setup_distributed()
    device = pick_device(
        device, local_rank=local_rank if world > 1 else None, notice="training on the CPU"
    )
    if world > 1 and rank == 0:
        check_samplers(train_loader, val_loader)
    with training_flags(model, *([] if teacher is None else [teacher])):
        run = _start_run(model, train_loader, config, device, (rank, world))
        if teacher is not None:
            _prepare(teacher, device, run.channels_last)
            teacher.eval()
        if not run.history:
            _evaluate_start(run, val_loader, config)
        finished = _fit(run, train_loader, val_loader, config, teacher, progress)
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    return TrainResult(run.best_f1, run.best_epoch, run.history, model, finished)


def _evaluate_start(run: _Run, val_loader: Iterable | None, config: TrainConfig) -> None:
    """Evaluate the starting weights as epoch 0 (skipped without a validation loader)."""
    if val_loader is None:
        return
    start = time.perf_counter()
    metrics = _validate(run, val_loader)
    _record(run, None, metrics, time.perf_counter() - start)
    _log_epoch(run, config)
