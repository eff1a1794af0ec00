"""Measurements: MACs (thop and the competition's ptflops profile), parameters, F1, score, latency.

Every counter works on a deep copy of the model, so the caller's module never gains hooks, buffers
or attributes, and never changes mode. Counts are for one image (batch 1).

What each counter charges per layer (read from the installed sources, checked by tests):

- thop (ultralytics-thop 2.x, ``count_macs``): Conv2d ``Cout*Hout*Wout * (Cin/groups)*kh*kw``,
  no bias term; BatchNorm ``2*numel(input)``, doubled (``4*numel``) when affine; Linear
  ``in_features * numel(output)``, no bias term; ReLU, MaxPool, Dropout, Identity 0; AvgPool the
  summed window sizes plus ``numel(output)``. Rules resolve through the class hierarchy, so a
  subclass of nn.Conv2d counts like nn.Conv2d; functional ``matmul``/``F.linear`` calls outside
  counted modules count too.
- ptflops 0.6.x (``count_macs_competition``, the organizers' counter): Conv2d
  ``kh*kw*Cin*(Cout/groups)*Hout*Wout`` plus ``Cout*Hout*Wout`` with a bias; BatchNorm
  ``numel(input)``, doubled when affine; Linear ``numel(input)*out + out`` with a bias; every
  pooling ``numel(input)``; the ignored activations 0; functional calls and residual adds 0.
  Its tables match exact types, so on its own it counts a subclass of nn.Conv2d (the "same"
  padding convs of TensorFlow ports, say) as 0; ``count_macs_competition`` gives each subclass
  the rule of the class it derives from, so that both counters see every layer.

:func:`uncounted_layers` names the layer types with parameters that a counter has no rule for,
so that a gap between the two counts is reported rather than hidden.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from decomp._utils import (
    check_input_size,
    model_device,
    model_dtype,
    select_output,
    training_flags,
)

logger = logging.getLogger(__name__)

BASELINE_MACS = 13_863_553
"""The competition's published baseline MACs."""
BASELINE_F1 = 0.8342
"""The competition's published baseline macro F1."""

_COMPETITION_IGNORED = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6)


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> int:
    """Count multiply-accumulates of one forward pass with thop (ultralytics-thop).

    Profiles a deep copy in eval mode at batch 1, on the model's device and dtype, so the caller's
    model is left untouched (thop would otherwise add ``total_ops`` buffers to its state_dict).

    Args:
        model: The network.
        input_size: One input without the batch dimension, ``(C, H, W)``.

    Returns:
        MACs for one image, as thop counts them (see the module docstring).
    """
    import thop

    size = check_input_size(input_size, dims=None)
    device, dtype = model_device(model), model_dtype(model)
    clone = _countable(model)
    x = torch.zeros((1, *size), device=device, dtype=dtype)
    macs, _ = thop.profile(clone, inputs=(x,), verbose=False)
    return int(round(float(macs)))


def count_macs_competition(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> int:
    """Count MACs exactly as the competition's organizers did, with ptflops.

    Calls ``ptflops.get_model_complexity_info`` on a deep copy, batch 1, with the organizers'
    settings (ReLU, PReLU, ELU, LeakyReLU and ReLU6 ignored). ptflops' own output is swallowed.

    Args:
        model: The network.
        input_size: One input without the batch dimension, ``(C, H, W)``.

    Returns:
        MACs for one image, as ptflops counts them (see the module docstring).
    """
    from ptflops import get_model_complexity_info

    size = check_input_size(input_size, dims=None)
    clone = _countable(model)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        macs, _ = get_model_complexity_info(
            clone,
            size,
            custom_modules_hooks=_subclass_hooks(clone),
            as_strings=False,
            print_per_layer_stat=False,
            verbose=False,
            ost=sink,
            ignore_modules=list(_COMPETITION_IGNORED),
        )
    if sink.getvalue():
        logger.debug("ptflops said: %s", sink.getvalue().strip())
    return int(round(float(macs)))


def _countable(model: nn.Module) -> nn.Module:
    """An eval-mode copy the counters can see through: tensorly-torch layers (which thop and
    ptflops count as almost nothing) replaced by the plain layers that compute the same."""
    clone = copy.deepcopy(model).eval()
    if "tltorch" in sys.modules:  # no tltorch layer can exist before tltorch is imported
        from decomp.tltorch import from_tltorch

        clone = from_tltorch(clone, inplace=True)
    return clone


def _subclass_hooks(model: nn.Module) -> dict[type, Any]:
    """ptflops hooks for the module types it lacks that derive from one it has."""
    from ptflops.pytorch_ops import MODULES_MAPPING

    hooks: dict[type, Any] = {}
    for kind in {type(m) for m in model.modules()} - set(MODULES_MAPPING):
        base = next((b for b in kind.__mro__[1:] if b in MODULES_MAPPING), None)
        if base is not None:
            hooks[kind] = MODULES_MAPPING[base]
    return hooks


def uncounted_layers(model: nn.Module) -> dict[str, list[str]]:
    """The module types holding parameters of their own that each counter charges nothing
    for: ``{"thop": [...], "ptflops": [...]}``, type names sorted (empty lists: no gap).

    thop resolves rules through the class hierarchy; ptflops, as :func:`count_macs_competition`
    calls it, matches exact types plus the subclasses given their base's rule.
    """
    from ptflops.pytorch_ops import MODULES_MAPPING
    from thop.profile import register_hooks

    owners = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    ptflops_types = set(MODULES_MAPPING) | set(_subclass_hooks(model))
    return {
        "thop": sorted(t.__name__ for t in owners if not set(t.__mro__) & set(register_hooks)),
        "ptflops": sorted(t.__name__ for t in owners if t not in ptflops_types),
    }


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, each shared tensor counted once (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _as_labels(values: Any, name: str) -> np.ndarray:
    """Convert labels (list, numpy array or tensor) to a 1-D int64 numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D class indices; got shape {array.shape}")
    return array.astype(np.int64)


def _check_labels(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of label vectors against ``num_classes``; return them as numpy arrays."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    true, pred = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {len(true)} vs {len(pred)}")
    if true.size == 0:
        raise ValueError("y_true and y_pred are empty")
    for name, arr in (("y_true", true), ("y_pred", pred)):
        if arr.min() < 0 or arr.max() >= num_classes:
            raise ValueError(
                f"{name} holds labels outside [0, {num_classes - 1}]: "
                f"min {arr.min()}, max {arr.max()}"
            )
    return true, pred


def macro_f1(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Macro F1 over all ``num_classes`` classes, as the competition scored it.

    ``sklearn.metrics.f1_score(average="macro", labels=range(num_classes), zero_division=0)``:
    a class absent from both vectors scores 0 and still counts in the mean.

    Args:
        y_true: True class indices, shape ``(N,)``.
        y_pred: Predicted class indices, shape ``(N,)``.
        num_classes: Number of classes.

    Returns:
        Macro F1 in [0, 1].
    """
    from sklearn.metrics import f1_score

    true, pred = _check_labels(y_true, y_pred, num_classes)
    labels = list(range(num_classes))
    return float(f1_score(true, pred, average="macro", labels=labels, zero_division=0))


def classification_summary(
    y_true: Any, y_pred: Any, num_classes: int, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Macro F1, accuracy, per-class F1 and the confusion matrix.

    Args:
        y_true: True class indices, shape ``(N,)``.
        y_pred: Predicted class indices, shape ``(N,)``.
        num_classes: Number of classes.
        class_names: Names for the classes; defaults to ``"0"``, ``"1"``, ...

    Returns:
        ``{"f1", "accuracy", "per_class_f1": {name: f1}, "confusion_matrix": [[...]],
        "num_samples"}``; ``confusion_matrix[i][j]`` counts true class i predicted as j.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    true, pred = _check_labels(y_true, y_pred, num_classes)
    names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    labels = list(range(num_classes))
    per_class = f1_score(true, pred, average=None, labels=labels, zero_division=0)
    return {
        "f1": macro_f1(true, pred, num_classes),
        "accuracy": float(accuracy_score(true, pred)),
        "per_class_f1": {name: float(f) for name, f in zip(names, per_class, strict=True)},
        "confusion_matrix": confusion_matrix(true, pred, labels=labels).tolist(),
        "num_samples": int(true.size),
    }


def competition_score(
    macs: float,
    f1: float,
    baseline_macs: float = BASELINE_MACS,
    baseline_f1: float = BASELINE_F1,
) -> float:
    """The competition's score; lower is better.

    ``score = macs / baseline_macs + f1_term`` where ``f1_term`` is 1 for F1 < 0.5,
    ``1 - F1/F1_base`` for 0.5 <= F1 < F1_base and ``0.5 * (1 - F1/F1_base)`` above.

    Args:
        macs: The model's MACs (>= 0), as the organizers' ptflops profile counts them.
        f1: Macro F1 in [0, 1].
        baseline_macs: MACs of the baseline model (> 0).
        baseline_f1: Macro F1 of the baseline model, in (0, 1].

    Returns:
        The score.
    """
    if not math.isfinite(macs) or macs < 0:
        raise ValueError(f"macs must be a finite number >= 0; got {macs!r}")
    if not 0.0 <= f1 <= 1.0:  # also rejects NaN
        raise ValueError(f"f1 must lie in [0, 1]; got {f1!r}")
    if not math.isfinite(baseline_macs) or baseline_macs <= 0:
        raise ValueError(f"baseline_macs must be > 0; got {baseline_macs!r}")
    if not 0.0 < baseline_f1 <= 1.0:
        raise ValueError(f"baseline_f1 must lie in (0, 1]; got {baseline_f1!r}")
    if f1 < 0.5:
        f1_term = 1.0
    elif f1 < baseline_f1:
        f1_term = 1.0 - f1 / baseline_f1
    else:
        f1_term = 0.5 * (1.0 - f1 / baseline_f1)
    return float(macs) / float(baseline_macs) + f1_term


def _time_cuda(run: Any, repeats: int, device: torch.device) -> list[float]:
    """Per-call milliseconds of ``run()`` timed with CUDA events."""
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return times


def _time_cpu(run: Any, repeats: int) -> list[float]:
    """Per-call milliseconds of ``run()`` timed with ``time.perf_counter``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int] = (3, 32, 32),
    batch_size: int = 1,
    device: str | torch.device | None = None,
    warmup: int = 5,
    repeats: int = 20,
) -> dict[str, Any]:
    """Time forward passes of ``model`` in eval mode under ``torch.inference_mode``.

    On CUDA each pass is timed with CUDA events after a synchronize; on CPU with
    ``time.perf_counter``. Every module's training flag is restored afterwards. If ``device``
    differs from the model's, a copy is moved there and timed.

    Args:
        model: The network.
        input_size: One input without the batch dimension, ``(C, H, W)``.
        batch_size: Images per forward pass.
        device: Where to run; defaults to the model's device.
        warmup: Untimed passes first.
        repeats: Timed passes.

    Returns:
        ``{"median_ms", "p90_ms", "mean_ms", "min_ms", "repeats", "batch_size", "device"}``.
    """
    size = check_input_size(input_size, dims=None)
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            "need batch_size >= 1, repeats >= 1, warmup >= 0; "
            f"got {batch_size}, {repeats}, {warmup}"
        )
    home, dtype = model_device(model), model_dtype(model)
    target = torch.device(device) if device is not None else home
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target != home:
        model = copy.deepcopy(model).to(target)
    x = torch.randn((batch_size, *size), device=target, dtype=dtype)
    with training_flags(model, train=False), torch.inference_mode():

        def run() -> None:
            model(x)

        for _ in range(warmup):
            run()
        if target.type == "cuda":
            torch.cuda.synchronize(target)
            times = _time_cuda(run, repeats, target)
        else:
            times = _time_cpu(run, repeats)
    return {
        "median_ms": float(statistics.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": float(statistics.fmean(times)),
        "min_ms": float(min(times)),
        "repeats": repeats,
        "batch_size": batch_size,
        "device": str(target),
    }


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Take ``(inputs, targets)`` from a loader batch (a tuple/list, or a dict with those keys)."""
    if isinstance(batch, dict):
        return batch["inputs"], batch["targets"]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"a batch must be (inputs, targets); got {type(batch).__name__}")


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    output: str | int | None = None,
) -> dict[str, Any]:
    """Predict every batch of ``loader`` and summarize (see ``classification_summary``).

    The model runs in eval mode on ``device`` (default: the model's device); every module's
    training flag is restored afterwards.

    Args:
        model: A classifier returning logits of shape ``(B, num_classes)``.
        loader: Yields ``(inputs, targets)`` batches.
        device: Where to run; the model must already be there.
        num_classes: Defaults to ``len(class_names)``, else the logits' width.
        class_names: Names for the per-class report.
        output: for a model returning a tuple, list or dict, the entry holding the logits (an
            index or a key; default the first, see :func:`decomp._utils.select_output`).

    Returns:
        The ``classification_summary`` dict.
    """
    target = torch.device(device) if device is not None else model_device(model)
    trues, preds = [], []
    width = None
    with training_flags(model, train=False):
        for batch in loader:
            inputs, targets = _split_batch(batch)
            logits = select_output(model(inputs.to(target, non_blocking=True)), output)
            width = logits.shape[1]
            preds.append(logits.argmax(dim=1).cpu())
            trues.append(targets.reshape(-1).cpu())
    if not preds:
        raise ValueError("the loader yielded no batches")
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else int(width)
    return classification_summary(torch.cat(trues), torch.cat(preds), num_classes, class_names)
