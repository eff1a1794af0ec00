"""Compress a model file: plan (or a given plan), factorize, re-estimate batch norm, save.

With calibration data the layers are fitted to their outputs on it and batch norm is re-estimated
on the same batches; the file records what was used (``calibration``, ``preprocessing``).

- :func:`compress`: the ``decompose`` workflow, returning a :class:`CompressResult`.
- :func:`inspect_model`: what every method would do to each layer, without changing anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from decomp._utils import PathLike, plain
from decomp.batchnorm import recalibrate
from decomp.checkpoint import load, model_arch, model_meta, recorded_input_size, save
from decomp.data import (
    DataBundle,
    Preprocessing,
    calibration_data,
    recorded_preprocessing,
)
from decomp.data.preprocessing import RECORD_KEY
from decomp.metrics import count_macs, count_macs_competition, count_params
from decomp.plan import Plan, applied_plans, apply, method_choices, recount
from decomp.plan import plan as make_plan
from decomp.recipes.training import without_augmentation

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "tucker"
DEFAULT_RANK = "vbmf"
CALIBRATION_BATCHES = 30
"""Batches over which batch-norm statistics are re-estimated after a decomposition."""


Stage = Callable[[str], contextlib.AbstractContextManager[Any]]
"""Wraps a slow stage of :func:`compress` (``stage("planning")``), e.g. to show a spinner."""


def no_stage(text: str) -> contextlib.AbstractContextManager[Any]:
    """The default :data:`Stage`: shows nothing."""
    return contextlib.nullcontext()


@dataclass
class CompressResult:
    """What :func:`compress` did.

    Attributes:
        status: ``"written"``, ``"nothing_to_decompose"`` (every layer skipped; nothing written,
            also on a dry run) or ``"dry_run"`` (planned, nothing written).
        plan: the plan that was (or would be) applied, its costs measured on the model.
        input: the file the model came from, when known.
        output: the file written, or None.
        input_size: ``(C, H, W)`` the plan was made at.
        macs_before, macs_after, params_before, params_after: thop MACs (batch 1) and parameter
            counts of the model and of the compressed one (``status == "written"`` only).
        seconds: wall time of factorizing, calibrating and saving.
        bn_calibrated: whether batch-norm statistics were re-estimated on data.
        calibration: with data: ``layers`` (batch-norm layers re-estimated), ``batches`` and
            ``images`` used, ``batches_asked``; None without data.
        preprocessing: the preprocessing the data was read with (plain data), when known.
    """

    status: str
    plan: Plan
    input: str | None
    output: str | None
    input_size: list[int]
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    seconds: float | None = None
    bn_calibrated: bool = False
    calibration: dict[str, int] | None = None
    preprocessing: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the ``--json`` output of ``decompose``)."""
        if self.status != "written":
            return {
                "status": self.status,
                "input": self.input,
                "output": None,
                "plan": self.plan.to_dict(),
            }
        p = self.plan
        return {
            "status": self.status,
            "input": self.input,
            "output": self.output,
            "method": p.method,
            "rank": p.rank,
            "input_size": self.input_size,
            "layers": len(p.layers),
            "decomposed": len(p.decomposed),
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_reduction": self.macs_before / max(self.macs_after or 0, 1),
            "seconds": self.seconds,
            "bn_calibrated": self.bn_calibrated,
            "calibration": self.calibration,
            "preprocessing": self.preprocessing,
            "plan": p.to_dict(),
        }


def _calibration_batches(
    data: str | os.PathLike[str] | DataBundle | Iterable,
    input_size: Sequence[int],
    preprocessing: Preprocessing | None,
) -> tuple[Iterable, Preprocessing | None]:
    """The batches to fit and calibrate on, and the preprocessing they were read with: a spec
    through :func:`decomp.data.calibration_data`, a bundle's training images not augmented."""
    if isinstance(data, str | os.PathLike):
        read = calibration_data(str(data), input_size, preprocessing)
        return read.loader, read.preprocessing
    if isinstance(data, DataBundle):
        return without_augmentation(data).train_loader, data.preprocessing
    return data, None


def compress(
    model: nn.Module | PathLike,
    output: PathLike | None,
    *,
    method: str = DEFAULT_METHOD,
    rank: str = DEFAULT_RANK,
    input_size: Sequence[int] | None = None,
    exclude: Sequence[str] = (),
    force: bool = False,
    target_macs: float | int | str | None = None,
    latency: Mapping[str, Any] | None = None,
    plan: Plan | None = None,
    data: str | os.PathLike[str] | DataBundle | Iterable | None = None,
    fit: str | None = None,
    preprocessing: Preprocessing | None = None,
    weigh_layers: bool = False,
    calibrate_batches: int = CALIBRATION_BATCHES,
    dry_run: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    progress: Callable[[str], None] | None = None,
    stage: Stage = no_stage,
    source: PathLike | None = None,
) -> CompressResult:
    """Compress a model (or a model file) and save it as a decomp file, atomically.

    Read the calibration data first (a bad spec fails before any work), plan
    (:func:`decomp.plan`, fitting the layers' outputs on the data) or take ``plan`` (its costs
    recounted on this model, its layers checked to fit before any work), factorize
    (:func:`decomp.apply`), re-estimate batch-norm statistics on the same batches
    (:func:`decomp.batchnorm.recalibrate`; no training), save with the decompose settings, the
    calibration's counts and the preprocessing in the file's extra.

    Args:
        model: a model, or a file for :func:`decomp.load` (its metadata gives the input size,
            the preprocessing and the source that is recorded).
        output: the decomp file to write; may be None with ``dry_run``.
        method, rank, exclude, force, target_macs: as in :func:`decomp.plan`; not used with
            ``plan``.
        latency: a latency budget instead, as :func:`decomp.plan` keywords (``target_latency``,
            ``runtime``, ``batch``, ``device``, ``threads``, ``latency_table``); the plan's
            latency record (measured landing) goes into the file's extra.
        input_size: ``(C, H, W)``; default: ``plan``'s, else what the model's file records.
        plan: a saved (possibly hand-edited) plan to apply instead of planning.
        data: calibration data: a data spec (read by :func:`decomp.data.calibration_data`: the
            training images, not augmented, no validation split needed), a bundle (its training
            images, not augmented) or a loader of image batches.
        fit: "outputs" (default with ``data``) or "weights", as in :func:`decomp.plan`.
        preprocessing: how a data spec's images are read; default what the model's file
            records, else the data's defaults (:class:`decomp.data.Preprocessing`).
        weigh_layers: with ``target_macs`` and ``data``: :mod:`decomp.plan.importance` weights.
        calibrate_batches: batches for the batch-norm re-estimation (0: none).
        dry_run: plan only; write nothing.
        on_plan: called with the plan once it is made, before any factorization.
        progress: called with each layer's name as it is factorized.
        stage: wraps the slow stages (planning, calibrating), e.g. to show a spinner.
        source: the file ``model`` came from, as the result should name it; default ``model``
            when it is a path, else the file it was loaded from.

    Returns:
        A :class:`CompressResult`.
    """
    if output is None and not dry_run:
        raise ValueError("compress needs an output path unless dry_run=True")
    if weigh_layers and not (target_macs and data is not None):
        raise ValueError("weigh_layers needs target_macs and data")
    net = model if isinstance(model, nn.Module) else load(model)
    if source is None:
        source = model if not isinstance(model, nn.Module) else model_meta(net).get("source_path")
    source = None if source is None else str(source)
    size = list(input_size or (plan.input_size if plan else None) or _recorded_size(net, source))
    batches, prep = None, None
    if data is not None:
        batches, prep = _calibration_batches(
            data, size, preprocessing or recorded_preprocessing(net)
        )
    if plan is not None:
        p, macs_before = _fixed_plan(net, plan, size, batches), None
    else:
        planning = "measuring layer importance and planning" if weigh_layers else "planning"
        with stage(planning):
            p = make_plan(
                net,
                method,
                rank,
                size,
                list(exclude),
                force,
                target_macs,
                batches,
                fit=fit,
                weigh_layers=weigh_layers,
                **dict(latency or {}),
            )
        macs_before = p.model_macs
    if on_plan is not None:
        on_plan(p)
    if not p.decomposed or dry_run:
        status = "nothing_to_decompose" if not p.decomposed else "dry_run"
        return CompressResult(status, p, source, None, size)
    start = time.perf_counter()
    compressed = apply(net, p, progress=progress, data=batches)
    before = macs_before if macs_before is not None else count_macs(net, size)
    after = count_macs(compressed, size)
    calibration = None
    if batches is not None and calibrate_batches:
        calibration = _calibrate(compressed, batches, calibrate_batches, stage)
    extra = {
        "decompose": {"method": p.method, "rank": p.rank, "input_size": size},
        **({"latency": plain(p.latency)} if getattr(p, "latency", None) else {}),
        "bn_calibrated": bool(calibration and calibration["layers"]),
        "calibration": calibration,
        **({RECORD_KEY: prep.to_dict()} if prep else {}),
    }
    save(compressed, output, input_size=size, source=source, extra=extra)
    seconds = round(time.perf_counter() - start, 3)
    params = (count_params(net), count_params(compressed))
    return CompressResult(
        "written",
        p,
        source,
        str(output),
        size,
        before,
        after,
        *params,
        seconds,
        bn_calibrated=extra["bn_calibrated"],
        calibration=calibration,
        preprocessing=extra.get(RECORD_KEY),
    )


def _fixed_plan(net: nn.Module, plan: Plan, size: list[int], batches: Iterable | None) -> Plan:
    """A given plan, recounted on ``net``; checked first to fit it (and to have the data its
    output-aware layers need), so that nothing is done for a plan that cannot be applied."""
    if plan.decomposed:
        apply(net, plan, init="structure")
    fits_outputs = any(lp.fit == "outputs" for lp in plan.decomposed)
    if fits_outputs and batches is None and not plan.whitening:
        raise ValueError(
            "the plan fits some layers' outputs on calibration data; pass that data "
            "(command line: --data)"
        )
    return recount(net, replace(plan, input_size=size))


def _calibrate(model: nn.Module, batches: Iterable, asked: int, stage: Stage) -> dict[str, int]:
    """Re-estimate batch norm on ``asked`` batches; what was used, as plain data (all 0 for a
    model without batch norm)."""
    with stage(f"calibrating batch norm on up to {asked} batches"):
        done = recalibrate(model, batches, batches=asked)
    return {**dataclasses.asdict(done), "batches_asked": asked}


def _recorded_size(model: nn.Module, source: str | None) -> list[int]:
    size = recorded_input_size(model)
    if size is None:
        raise ValueError(
            f"input_size is needed: {source or 'the model'} does not record the model's input "
            "size (command line: --input-size C,H,W)"
        )
    return size


def inspect_model(
    model: nn.Module,
    input_size: Sequence[int],
    rank: str = DEFAULT_RANK,
    methods: Sequence[str] | None = None,
    stage: Stage = no_stage,
) -> dict[str, Any]:
    """What every method would do to each layer of ``model``, and the model's costs.

    Returns:
        ``{"kind", "arch", "input_size", "rank", "macs", "macs_competition", "params",
        "plans_applied", "plans": {method: Plan}}``; ``kind`` and ``arch`` are those of the
        file the model was loaded from (None otherwise).
    """
    size = list(input_size)
    methods = method_choices() if methods is None else list(methods)
    with stage("planning"):
        plans = {m: make_plan(model, m, rank, size) for m in methods}
    first = plans[methods[0]]
    return {
        "kind": model_meta(model).get("kind"),
        "arch": model_arch(model),
        "input_size": size,
        "rank": rank,
        "macs": first.model_macs,
        "macs_competition": count_macs_competition(model, size),
        "params": first.model_params,
        "plans_applied": len(applied_plans(model)),
        "plans": plans,
    }
