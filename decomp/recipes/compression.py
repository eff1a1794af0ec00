"""Compress a model file: plan (or a given plan), factorize, re-estimate batch norm, save.

- :func:`compress`: the ``decompose`` workflow, returning a :class:`CompressResult`.
- :func:`inspect_model`: what every method would do to each layer, without changing anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from decomp._utils import PathLike, plain
from decomp.batchnorm import calibrate, has_batchnorm
from decomp.checkpoint import load, model_arch, model_meta, recorded_input_size, save
from decomp.data import DataBundle, load_data
from decomp.metrics import count_macs, count_macs_competition, count_params
from decomp.plan import Plan, applied_plans, apply, method_choices, recount
from decomp.plan import plan as make_plan

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "tucker"
DEFAULT_RANK = "vbmf"
CALIBRATION_BATCHES = 30
"""Batches over which batch-norm statistics are re-estimated after a decomposition."""


Stage = Callable[[str], contextlib.AbstractContextManager[Any]]
"""Wraps a slow stage of :func:`compress` (``stage("planning")``), e.g. to show a spinner."""


def _no_stage(text: str) -> contextlib.AbstractContextManager[Any]:
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
            "plan": p.to_dict(),
        }


def _train_loader(data: str | DataBundle | Iterable, input_size: Sequence[int]) -> Iterable:
    if isinstance(data, str | os.PathLike):
        return load_data(str(data), tuple(input_size)).train_loader
    return data.train_loader if isinstance(data, DataBundle) else data


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
    data: str | DataBundle | Iterable | None = None,
    weigh_layers: bool = False,
    calibrate_batches: int = CALIBRATION_BATCHES,
    dry_run: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    progress: Callable[[str], None] | None = None,
    stage: Stage = _no_stage,
    source: PathLike | None = None,
) -> CompressResult:
    """Compress a model (or a model file) and save it as a decomp file, atomically.

    Plan (:func:`decomp.plan`) or take ``plan`` (its costs recounted on this model, its layers
    checked to fit before any work), factorize (:func:`decomp.apply`), re-estimate batch-norm
    statistics on ``data`` (no training), save with the decompose settings in the file's extra.

    Args:
        model: a model, or a file for :func:`decomp.load` (its metadata gives the input size
            and the source that is recorded).
        output: the decomp file to write; may be None with ``dry_run``.
        method, rank, exclude, force, target_macs: as in :func:`decomp.plan`; not used with
            ``plan``.
        latency: a latency budget instead, as :func:`decomp.plan` keywords (``target_latency``,
            ``runtime``, ``batch``, ``device``, ``threads``, ``latency_table``); the plan's
            latency record (measured landing) goes into the file's extra.
        input_size: ``(C, H, W)``; default: ``plan``'s, else what the model's file records.
        plan: a saved (possibly hand-edited) plan to apply instead of planning.
        data: a data spec, bundle or loader: batch norm is re-estimated on its training batches,
            and with ``weigh_layers`` a MACs budget weighs layers by measured damage on them.
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
    loader: list[Iterable] = []  # the training batches of ``data``, loaded once

    def batches() -> Iterable:
        if not loader:
            loader.append(_train_loader(data, size))
        return loader[0]

    if plan is not None:
        if plan.decomposed:  # fail before any output when the plan does not fit the model
            apply(net, plan, init="structure")
        p, macs_before = recount(net, replace(plan, input_size=size)), None
    else:
        weigh = batches() if weigh_layers else None
        with stage("planning" if weigh is None else "measuring layer importance and planning"):
            p = make_plan(
                net,
                method,
                rank,
                size,
                list(exclude),
                force,
                target_macs,
                weigh,
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
    compressed = apply(net, p, progress=progress)
    before = macs_before if macs_before is not None else count_macs(net, size)
    after = count_macs(compressed, size)
    calibrated = False
    if data is not None and calibrate_batches:
        if not has_batchnorm(compressed):
            logger.info("no batch-norm layers: nothing to calibrate")
        else:
            with stage(f"calibrating batch norm on {calibrate_batches} batches of {data}"):
                calibrate(compressed, batches(), batches=calibrate_batches)
            calibrated = True
    extra = {
        "decompose": {"method": p.method, "rank": p.rank, "input_size": size},
        **({"latency": plain(p.latency)} if getattr(p, "latency", None) else {}),
        "bn_calibrated": calibrated,
    }
    save(compressed, output, input_size=size, source=source, extra=extra)
    seconds = round(time.perf_counter() - start, 3)
    params = (count_params(net), count_params(compressed))
    return CompressResult(
        "written", p, source, str(output), size, before, after, *params, seconds, calibrated
    )


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
    stage: Stage = _no_stage,
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
