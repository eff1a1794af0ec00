"""Training workflows: build a model, train a baseline (and reuse a cached one), fine-tune.

- :func:`build_model`: a freshly initialised model for a data set's classes.
- :func:`train_baseline`: a model trained from scratch with the recipe of FACTS.md section 5,
  saved as a decomp file that carries its input size, class names, preprocessing and training
  settings; :func:`baseline_config` and :func:`cached_baseline` decide when such a file can be
  reused.
- :func:`finetune`: fine-tune a (compressed) model, optionally distilled from the original,
  after re-estimating its batch-norm statistics when that was not done; under torchrun on every
  process.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decomp._utils import PathLike, plain
from decomp.arch import accepts_kwarg, arch_ref, build_arch, resolve_factory
from decomp.batchnorm import calibrate
from decomp.checkpoint import (
    DecompFileError,
    load,
    model_meta,
    save,
)
from decomp.data import (
    DataBundle,
    Preprocessing,
    load_data,
    make_loader,
    recorded_preprocessing,
)
from decomp.data.preprocessing import RECORD_KEY
from decomp.distributed import is_main_process, setup_distributed
from decomp.evaluate import evaluate
from decomp.train import TrainConfig, train

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "torchvision.models:resnet18"
DEFAULT_DATA = "fashion-mnist"
DEFAULT_INPUT_SIZE = (3, 32, 32)
DEFAULT_BASELINE_OUTPUT = "runs/baseline.pt"

# FACTS.md section 5 measured macro F1 0.9228 after 10 epochs of the baseline recipe; 12 epochs
# gave 0.9240 (the demo's full recipe). A step of 128 images at 32 px costs 0.32 CPU seconds on
# this project's 2-core machine, so an epoch takes about 137 s with one torch thread and about
# 75 s with two when the machine is idle. The demo's quick recipe (decomp.demo) trains 4 epochs
# without augmentation instead.
BASELINE_EPOCHS = 12
FINETUNE_EPOCHS = 2
FINETUNE_LR = 0.01
BASELINE_RECIPE = "sgd-nesterov0.9-wd5e-4-onecycle-ls0.1-flip-shift2"
BASELINE_RECIPE_NO_AUGMENTATION = "sgd-nesterov0.9-wd5e-4-onecycle-ls0.1-noaug"


# ------------------------------------------------------------------------------ model building


def _arch_with_classes(
    arch: str | Mapping[str, Any], arch_kwargs: Mapping[str, Any] | str | None, num_classes: int
) -> dict[str, Any]:
    """The architecture reference, with ``num_classes`` added when the factory takes it."""
    ref = arch_ref(arch, arch_kwargs)
    if "num_classes" not in ref["kwargs"] and accepts_kwarg(
        resolve_factory(ref["factory"]), "num_classes"
    ):
        ref["kwargs"]["num_classes"] = num_classes
    return ref


def build_model(
    arch: str | Mapping[str, Any],
    arch_kwargs: Mapping[str, Any] | str | None,
    num_classes: int,
    input_size: Sequence[int],
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a freshly initialised (seeded) model for ``num_classes`` and check its output.

    Returns:
        ``(model, arch reference)``; the reference includes ``num_classes`` when the factory
        takes it, so a decomp file rebuilds the same shapes.
    """

    ref = _arch_with_classes(arch, arch_kwargs, num_classes)
    torch.manual_seed(seed)
    model = build_arch(ref)
    with torch.no_grad():
        width = model.eval()(torch.zeros(2, *input_size)).shape[-1]
    if width != num_classes:
        raise ValueError(
            f"{ref['factory']} gives {width} outputs but the data has {num_classes} classes; "
            f"""pass arch_kwargs like '{{"num_classes": {num_classes}}}'"""
        )
    return model, ref


# ------------------------------------------------------------------------------ training


@dataclass
class TrainingOutcome:
    """What :func:`train_baseline` and :func:`finetune` return.

    Attributes:
        model: the trained model, holding the weights of the best validation epoch.
        path: the decomp file written, or None.
        history: one row per epoch (epoch 0 = the starting weights).
        best_val_f1: macro F1 of the kept weights on the validation split.
        best_epoch: the epoch those weights come from.
        test: :func:`evaluate` on the test split (without latency), or None.
        seconds: wall time of the training itself.
        finished: False when the run stopped early (``max_epochs_this_run``).
        config: the settings of the run (plain data).
    """

    model: nn.Module
    path: str | None
    history: list[dict[str, Any]]
    best_val_f1: float
    best_epoch: int
    test: dict[str, Any] | None
    seconds: float
    finished: bool
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, as plain data."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.pop("model")
        return out


def baseline_config(
    arch: str | Mapping[str, Any],
    arch_kwargs: Mapping[str, Any] | str | None,
    data: str,
    input_size: Sequence[int],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    train_subset: int | None,
    val_split: float | int | None,
    augment: bool = True,
    preprocessing: Preprocessing | None = None,
) -> dict[str, Any]:
    """The settings that determine a baseline; a cached baseline is reused only when they match.
    The preprocessing is among them only when it is not the default (so that baselines cached
    before it was recorded stay valid)."""
    changed = preprocessing is not None and preprocessing != Preprocessing()
    return {
        "arch": arch_ref(arch, arch_kwargs),
        "data": str(data),
        "input_size": [int(s) for s in input_size],
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "seed": int(seed),
        "train_subset": train_subset,
        "val_split": val_split,
        "recipe": BASELINE_RECIPE if augment else BASELINE_RECIPE_NO_AUGMENTATION,
        **({"preprocessing": preprocessing.to_dict()} if changed else {}),
    }


def _config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def cached_baseline(
    path: PathLike, key: Mapping[str, Any], retrain: bool = False
) -> nn.Module | None:
    """The baseline at ``path`` when it was trained with settings ``key``, else None (says why).

    Args:
        path: a file written by :func:`train_baseline`.
        key: the settings that must match, from :func:`baseline_config`.
        retrain: never reuse (return None).
    """
    path = Path(path)
    if retrain or not path.exists():
        return None
    try:
        model = load(path)
    except DecompFileError as exc:
        logger.warning("cannot reuse %s (%s); training a new baseline", path, exc)
        return None
    stored = model_meta(model).get("extra", {}).get("baseline_config")
    if stored != plain(dict(key)):
        differ = sorted(k for k in key if (stored or {}).get(k) != plain(key[k]))
        logger.info("cached %s was trained with other settings (%s); retraining", path, differ)
        return None
    logger.info("reusing the cached baseline %s (its settings match)", path)
    return model


def load_bundle(
    data: str | DataBundle,
    input_size: Sequence[int],
    batch_size: int = 128,
    seed: int = 0,
    workers: int | None = None,
    train_subset: int | None = None,
    val_split: float | int | None = None,
    preprocessing: Preprocessing | None = None,
) -> DataBundle:
    """``data`` itself when it is a bundle, else :func:`decomp.data.load_data` of the spec,
    after joining the torchrun process group (so that the train loader shards the data)."""
    if isinstance(data, DataBundle):
        return data
    setup_distributed()  # under torchrun, so that the train loader gets a DistributedSampler
    return load_data(
        data,
        input_size,
        batch_size=batch_size,
        val_split=val_split,
        seed=seed,
        workers=workers,
        train_subset=train_subset,
        preprocessing=preprocessing,
    )


def without_augmentation(bundle: DataBundle, seed: int = 0) -> DataBundle:
    """``bundle`` with a train loader over the same images that does not augment them.

    The in-memory data sets (Fashion-MNIST) have an ``augment`` switch; image folders get the
    validation split's transform. The bundle itself is returned when its training batches are
    not augmented already.

    Raises:
        ValueError: the training set is neither kind.
    """
    loader = bundle.train_loader
    dataset, val_set = loader.dataset, bundle.val_loader.dataset
    plain_set = copy.copy(dataset)
    if hasattr(dataset, "augment"):
        if not dataset.augment:
            return bundle
        plain_set.augment = False
    elif hasattr(dataset, "transform") and hasattr(val_set, "transform"):
        if dataset.transform is val_set.transform:
            return bundle
        plain_set.transform = val_set.transform
    else:
        raise ValueError(
            f"cannot switch augmentation off for a {type(dataset).__name__} (it has neither an "
            "augment switch nor a transform); train with augmentation"
        )
    workers = loader.num_workers
    train = make_loader(plain_set, loader.batch_size, True, workers, seed, bundle.train_sampler)
    return dataclasses.replace(bundle, train_loader=train)


def train_baseline(
    arch: str | Mapping[str, Any] = DEFAULT_ARCH,
    arch_kwargs: Mapping[str, Any] | str | None = None,
    data: str | DataBundle = DEFAULT_DATA,
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
    epochs: int = BASELINE_EPOCHS,
    output: PathLike | None = DEFAULT_BASELINE_OUTPUT,
    *,
    batch_size: int = 128,
    lr: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    train_subset: int | None = None,
    val_split: float | int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    resume: bool = True,
    evaluate_test: bool = True,
    data_name: str | None = None,
    augment: bool = True,
    preprocessing: Preprocessing | None = None,
) -> TrainingOutcome:
    """Train a classifier from scratch and save it as a decomp file.

    The recipe of FACTS.md section 5: SGD with Nesterov momentum 0.9, weight decay 5e-4 (not on
    biases and BN), a one-cycle schedule up to ``lr``, label smoothing 0.1, random flips and
    +-2 px shifts (the data module's training augmentation; ``augment=False`` trains on the images
    as they are, which converges faster in a short schedule). The weights of the best epoch on the
    validation split (held out from train) are kept; final numbers come from the test split.
    A training checkpoint named after the settings is written beside ``output`` every epoch and
    resumed from (``resume``), so a killed run continues; it is removed once the file is saved.
    Under torchrun, DDP as in :func:`finetune`.

    Args:
        arch: ``"module:factory"``; ``num_classes`` is added to ``arch_kwargs`` when the
            factory accepts it and it is not given.
        arch_kwargs: keyword arguments of the factory (a dict or JSON text).
        data: a data spec for :func:`decomp.data.load_data`, or a ready :class:`DataBundle`.
        input_size: ``(C, H, W)`` of the model input.
        epochs: training epochs.
        output: the decomp file to write (None: do not save).
        batch_size: batch size (128 in the recipe).
        lr: peak learning rate of the one-cycle schedule.
        seed: seeds the initialisation, the split and the data order.
        workers: DataLoader workers (default: the data module's).
        train_subset: train on at most this many images (quick runs).
        val_split: validation hold-out (default: the data module's).
        device: default CUDA when available, else the CPU.
        progress: show rich progress bars.
        resume: continue from the settings' training checkpoint when one exists.
        evaluate_test: evaluate the kept weights on the test split (or validation if none).
        data_name: how to record ``data`` in the file when a bundle is given.
        augment: train with the data's augmentation (see :func:`without_augmentation`).
        preprocessing: how a data spec's images are read (:class:`decomp.data.Preprocessing`;
            default the data's own); the file records the one used.

    Returns:
        A :class:`TrainingOutcome`.
    """
    bundle = load_bundle(
        data, input_size, batch_size, seed, workers, train_subset, val_split, preprocessing
    )
    if not augment:
        bundle = without_augmentation(bundle, seed)
    name = data_name or (data if isinstance(data, str) else "bundle")
    key = baseline_config(
        arch,
        arch_kwargs,
        name,
        input_size,
        epochs,
        batch_size,
        lr,
        seed,
        train_subset,
        val_split,
        augment,
        preprocessing,
    )
    model, ref = build_model(arch, arch_kwargs, bundle.num_classes, bundle.input_size, seed)
    config = TrainConfig(
        epochs=epochs,
        lr=lr,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=5e-4,
        schedule="onecycle",
        label_smoothing=0.1,
        seed=seed,
    )
    ckpt = None
    if output is not None:
        ckpt = Path(f"{output}.{_config_hash(key)}.ckpt")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        config.checkpoint_path, config.resume = ckpt, resume
        config.log_path = Path(f"{output}.log.jsonl")
    logger.info("training %s from scratch for %d epochs", ref["factory"], epochs)
    outcome = _run_training(model, bundle, config, None, device, progress, evaluate_test)
    outcome.config = {**key, "train": config.to_dict(), "arch": ref}
    if output is not None and is_main_process():
        extra = {"baseline_config": key, "training": _training_record(outcome)}
        outcome.path = _save(outcome.model, output, ref, bundle, extra)
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()
    return outcome


def _run_training(
    model: nn.Module,
    bundle: DataBundle,
    config: TrainConfig,
    teacher: nn.Module | None,
    device: str | torch.device | None,
    progress: bool,
    evaluate_test: bool,
) -> TrainingOutcome:
    start = time.perf_counter()
    result = train(
        model,
        bundle.train_loader,
        bundle.val_loader,
        config,
        teacher=teacher,
        device=device,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    logger.info(
        "kept epoch %d: validation F1 %.4f (%.0f s)", result.best_epoch, result.best_f1, seconds
    )
    test = None
    if evaluate_test and is_main_process():
        test = evaluate(result.model, bundle, latency=False)
    if test is not None:
        logger.info("%s F1 %.4f, accuracy %.4f", test["split"], test["f1"], test["accuracy"])
    return TrainingOutcome(
        model=result.model,
        path=None,
        history=result.history,
        best_val_f1=float(result.best_f1),
        best_epoch=int(result.best_epoch),
        test=test,
        seconds=round(seconds, 3),
        finished=result.finished,
        config={"train": config.to_dict()},
    )


def _training_record(outcome: TrainingOutcome) -> dict[str, Any]:
    """What a saved file remembers of its training (plain data)."""
    test = outcome.test or {}
    return {
        "best_val_f1": outcome.best_val_f1,
        "best_epoch": outcome.best_epoch,
        "test_f1": test.get("f1"),
        "test_accuracy": test.get("accuracy"),
        "seconds": outcome.seconds,
        "history": plain(outcome.history),
    }


def _save(
    model: nn.Module,
    output: str | os.PathLike[str],
    arch: Mapping[str, Any] | None,
    bundle: DataBundle,
    extra: Mapping[str, Any],
) -> str:
    """Save with the bundle's input size, class names and preprocessing."""
    if bundle.preprocessing is not None:
        extra = {**extra, RECORD_KEY: bundle.preprocessing.to_dict()}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    path = save(
        model,
        output,
        arch=arch,
        input_size=list(bundle.input_size),
        class_names=bundle.class_names,
        extra=plain(dict(extra)),
    )
    return str(path)


def as_model(model: nn.Module | PathLike) -> nn.Module:
    """``model`` itself, or the decomp file it names, loaded."""
    if isinstance(model, nn.Module):
        return model
    return load(model)


def finetune(
    model: nn.Module | PathLike,
    data: str | DataBundle,
    *,
    teacher: nn.Module | PathLike | None = None,
    epochs: int = FINETUNE_EPOCHS,
    output: PathLike | None = None,
    lr: float = FINETUNE_LR,
    resume: bool = False,
    input_size: Sequence[int] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    workers: int | None = None,
    train_subset: int | None = None,
    val_split: float | int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    evaluate_test: bool = True,
    extra: Mapping[str, Any] | None = None,
    calibrate_batches: int = 0,
    preprocessing: Preprocessing | None = None,
    **train_options: Any,
) -> TrainingOutcome:
    """Fine-tune a (compressed) model from its current weights, optionally distilling a teacher.

    The weights are never re-initialised: epoch 0 of the history is the validation F1 of the
    weights as given, and the best validation epoch (possibly epoch 0) is kept. With
    ``calibrate_batches``, batch-norm statistics are re-estimated first on that many training
    batches (:func:`decomp.calibrate`), unless the model's file records that this was done. With an
    ``output``, a training checkpoint ``OUTPUT.ckpt`` is written every epoch (``resume=True``
    continues from it after a kill; it is removed once ``output`` is saved) and the epochs are
    logged to ``OUTPUT.log.jsonl``. Under torchrun (``WORLD_SIZE`` > 1) every process trains its
    shard as DDP (see :func:`decomp.train.train`) and rank 0 evaluates and writes the file.

    Args:
        model: the model, or a file for :func:`decomp.checkpoint.load` (a decomp file keeps its
            plans, input size and class names).
        data: a data spec for :func:`decomp.data.load_data`, or a :class:`DataBundle`.
        teacher: the original model (or its file) to distil from; None for plain cross-entropy.
        epochs: fine-tuning epochs.
        output: the decomp file to write, or None.
        lr: peak learning rate (cosine schedule after a short warm-up).
        resume: continue from ``OUTPUT.ckpt`` when it exists.
        input_size: default: the model's saved input size, else (3, 32, 32).
        batch_size: batch size.
        seed: seeds the data order.
        workers: DataLoader workers.
        train_subset: use at most this many training images.
        val_split: validation hold-out.
        device: default CUDA when available, else the CPU.
        progress: show rich progress bars.
        evaluate_test: evaluate the kept weights on the test split (or validation if none).
        extra: more plain data for the saved file (e.g. ``{"bn_calibrated": True}``).
        calibrate_batches: re-estimate batch norm on this many batches first (0: never); the
            file then records ``bn_calibrated`` and ``calibration_batches``.
        preprocessing: how a data spec's images are read; default what the model's file
            records, else the data's own (:class:`decomp.data.Preprocessing`); the file records
            the one used.
        **train_options: further :class:`decomp.train.TrainConfig` fields (``optimizer``,
            ``kd_alpha``, ``kd_temperature``, ``weight_decay``, ``warmup_epochs``, ...).

    Returns:
        A :class:`TrainingOutcome`.
    """
    model, teacher = as_model(model), None if teacher is None else as_model(teacher)
    size = input_size or model_meta(model).get("input_size") or DEFAULT_INPUT_SIZE
    prep = preprocessing or recorded_preprocessing(model)
    bundle = load_bundle(data, size, batch_size, seed, workers, train_subset, val_split, prep)
    extra = dict(extra or {})
    if calibrate_batches and not model_meta(model).get("extra", {}).get("bn_calibrated"):
        calibrate(model, bundle.train_loader, batches=calibrate_batches)
        extra.update(bn_calibrated=True, calibration_batches=calibrate_batches)
    options = {"schedule": "cosine", "warmup_epochs": 0.2, **train_options}
    config = TrainConfig(epochs=epochs, lr=lr, seed=seed, **options)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        config.checkpoint_path, config.resume = Path(f"{output}.ckpt"), resume
        config.log_path = Path(f"{output}.log.jsonl")
    kind = "with distillation" if teacher is not None else "without a teacher"
    logger.info("fine-tuning for %d epochs %s, lr %g", epochs, kind, lr)
    outcome = _run_training(model, bundle, config, teacher, device, progress, evaluate_test)
    if output is not None and is_main_process():
        record = {"finetune": {**_training_record(outcome), "config": config.to_dict()}}
        outcome.path = _save(outcome.model, output, None, bundle, {**extra, **record})
        Path(config.checkpoint_path).unlink(missing_ok=True)
    return outcome
