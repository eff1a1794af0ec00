"""Measure a classifier: quality (macro F1, accuracy, per class), cost (MACs, params, latency)
and the competition score, on a data bundle, a data spec or a loader.

- :func:`evaluate`: everything, for reports and the ``evaluate`` command.
- :func:`val_f1` and :func:`quick_scores`: the validation / test F1 alone, for model selection
  and the benchmarks (no cost measurements).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from decomp._utils import check_input_size, model_device
from decomp.checkpoint import model_meta
from decomp.data import DataBundle, load_data, recorded_preprocessing
from decomp.metrics import (
    BASELINE_F1,
    BASELINE_MACS,
    competition_score,
    count_macs,
    count_macs_competition,
    count_params,
    evaluate_model,
    measure_latency,
)

LATENCY_BATCHES = (1, 64)
"""Batch sizes :func:`evaluate` times."""

EvalData = DataBundle | Iterable | str | os.PathLike[str]


def resolve_eval_source(
    model: nn.Module,
    data: EvalData,
    input_size: Sequence[int] | None = None,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[Iterable, str, list[str] | None, tuple[int, ...]]:
    """The loader to evaluate on, its split's name, the class names and the input size.

    See :func:`evaluate` for what ``data`` may be and where the defaults come from.
    """
    meta = model_meta(model)
    if isinstance(data, str | os.PathLike):
        size = input_size or meta.get("input_size")
        if size is None:
            raise ValueError(f"input_size is needed to read {data}, e.g. (3, 32, 32)")
        data = load_data(str(data), size, preprocessing=recorded_preprocessing(model))
    if isinstance(data, DataBundle):
        split = split or ("test" if data.test_loader is not None else "val")
        loaders = {"test": data.test_loader, "val": data.val_loader, "train": data.train_loader}
        if split not in loaders:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(loaders)}")
        if loaders[split] is None:
            raise ValueError(f"the data has no {split} split; use split='val'")
        loader, names = loaders[split], class_names or data.class_names
        size = input_size or data.input_size
    else:
        loader, split = data, split or "given"
        names = class_names or meta.get("class_names")
        size = input_size or meta.get("input_size")
    if size is None:
        raise ValueError("input_size is needed to count MACs, e.g. (3, 32, 32)")
    return loader, split, (list(names) if names else None), check_input_size(size, dims=None)


def latency_rows(model: nn.Module, input_size: Sequence[int], repeats: int) -> dict[str, Any]:
    """Median latency at every batch of :data:`LATENCY_BATCHES` on the CPU, and on CUDA when
    there is a GPU: ``{"cpu": {"batch_1": {...}, "batch_64": {...}}, "cuda": ...}``."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        device: {
            f"batch_{b}": measure_latency(
                model, input_size, batch_size=b, device=device, warmup=5, repeats=repeats
            )
            for b in LATENCY_BATCHES
        }
        for device in devices
    }


def speedup_rows(
    original: nn.Module, model: nn.Module, input_size: Sequence[int]
) -> dict[str, Any]:
    """``model``'s speed-up over ``original`` at every batch of :data:`LATENCY_BATCHES`, eager
    PyTorch on the CPU, timed paired (:func:`decomp.timing.paired_latency`):
    ``{"batch_1": {...}, "batch_64": {...}}``."""
    from decomp.timing import paired_latency

    return {
        f"batch_{b}": paired_latency(original, model, input_size, batch=b) for b in LATENCY_BATCHES
    }


def evaluate(
    model: nn.Module,
    data: EvalData,
    input_size: Sequence[int] | None = None,
    *,
    latency: bool = True,
    compare_with: nn.Module | None = None,
    device: str | torch.device | None = None,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
    latency_repeats: int = 20,
    baseline_macs: float = BASELINE_MACS,
    baseline_f1: float = BASELINE_F1,
    output: str | int | None = None,
) -> dict[str, Any]:
    """Measure a classifier: quality, cost and the competition score. The model is not changed.

    No calibration, no training: predictions run in eval mode and every module's training flag is
    restored; MAC counters and latency work on copies.

    Args:
        model: a classifier returning logits ``(B, num_classes)``.
        data: a :class:`DataBundle` (its test split when it has one, else validation), a data
            spec for :func:`decomp.data.load_data` (``"fashion-mnist"``, a folder), or a loader
            of ``(images, labels)``.
        input_size: ``(C, H, W)``; default: the bundle's, else the model's saved metadata.
        latency: time forward passes at batch 1 and 64 on the CPU (and CUDA when available).
        compare_with: the original model: with ``latency``, ``model``'s speed-up over it is
            timed paired (see :func:`speedup_rows`).
        device: where to predict; default the model's device (a copy is moved if it differs).
        split: ``"test"``, ``"val"`` or ``"train"`` of a bundle.
        class_names: names for the per-class report; default the bundle's or the metadata's.
        latency_repeats: timed passes per latency measurement (median reported).
        baseline_macs: the competition score's MACs constant.
        baseline_f1: the competition score's F1 constant.
        output: for a model returning a tuple, list or dict, the entry holding the logits (an
            index or a key; default the first).

    Returns:
        ``f1``, ``accuracy``, ``per_class_f1``, ``confusion_matrix``, ``num_samples``, ``split``,
        ``macs`` (thop), ``macs_competition`` (ptflops, the organizers' counter), ``params``,
        ``competition_score`` (from ``macs_competition``), ``score_constants``, ``latency``
        (see :func:`latency_rows`, or None), ``speedup`` (see :func:`speedup_rows`, or None),
        ``input_size``, ``device`` and ``seconds``.
    """
    start = time.perf_counter()
    loader, split, names, size = resolve_eval_source(model, data, input_size, split, class_names)
    net = model
    if device is not None and torch.device(device) != model_device(model):
        net = copy.deepcopy(model).to(device)
    where = model_device(net)
    summary = evaluate_model(net, loader, where, len(names) if names else None, names, output)
    macs, macs_comp = count_macs(model, size), count_macs_competition(model, size)
    result = {
        **summary,
        "split": split,
        "macs": macs,
        "macs_competition": macs_comp,
        "params": count_params(model),
        "competition_score": competition_score(
            macs_comp, summary["f1"], baseline_macs, baseline_f1
        ),
        "score_constants": {"baseline_macs": baseline_macs, "baseline_f1": baseline_f1},
        "latency": latency_rows(model, size, latency_repeats) if latency else None,
        "speedup": speedup_rows(compare_with, model, size)
        if latency and compare_with is not None
        else None,
        "input_size": list(size),
        "device": str(where),
    }
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def val_f1(model: nn.Module, bundle: DataBundle) -> float:
    """Macro F1 of ``model`` on the bundle's validation split (over all its classes)."""
    names = bundle.class_names
    return float(evaluate_model(model, bundle.val_loader, None, len(names), names)["f1"])


def quick_scores(model: nn.Module, bundle: DataBundle) -> dict[str, float]:
    """Test F1 and accuracy (validation when there is no test split), and validation F1,
    without cost measurements: ``{"f1", "accuracy", "val_f1"}``."""
    names = bundle.class_names
    loader = bundle.test_loader or bundle.val_loader
    test = evaluate_model(model, loader, None, len(names), names)
    return {"f1": test["f1"], "accuracy": test["accuracy"], "val_f1": val_f1(model, bundle)}
