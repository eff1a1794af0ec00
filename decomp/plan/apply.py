"""Apply a plan: build each planned factorization and swap it in by qualified name.

Residual and custom forwards keep working because only the planned layers are replaced
(``setattr`` on their parents), never a whole ``nn.Sequential``. A module reachable under
several names is replaced under all of them by the same new module.

A plan describes plain ``nn.Conv2d`` / ``nn.Linear`` layers. A model may hold other kinds of
layer that compute one (tensorly-torch's factorized layers): a *source adapter*, registered
with :func:`register_source`, gives the plain layer such a module computes, and apply puts
that in its place wherever the plan names it (factorized where the plan says so, plain where
it skips the layer). That is how a conversion from another library is recorded as a plan, and
rebuilt from a saved file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from torch import nn

from decomp.factorize import registry
from decomp.factorize.base import Factorized, Whitening
from decomp.factorize.padding import Padded, pad_module
from decomp.metrics import count_macs, count_params
from decomp.plan.forwards import padded_calls
from decomp.plan.model import LayerPlan, Plan
from decomp.plan.policy import factorized_plan
from decomp.plan.statistics import input_moments, whitenings
from decomp.plan.trace import dense_costs, trace_calls

PLANS_ATTR = "_decomp_plans"
INITS = ("decompose", "structure")

SourceAdapter = Callable[[nn.Module], nn.Module | None]
"""``adapter(module)``: the plain nn.Conv2d / nn.Linear that ``module`` computes (its weight,
bias and hyper-parameters), or None for a module the adapter does not know."""
_SOURCES: list[SourceAdapter] = []


def register_source(adapter: SourceAdapter) -> SourceAdapter:
    """Let plans name modules that are not plain layers but compute one (see the module
    docstring); registering the same adapter twice has no effect."""
    if adapter not in _SOURCES:
        _SOURCES.append(adapter)
    return adapter


def _plain_source(module: nn.Module) -> nn.Module | None:
    """The plain layer a registered adapter gives for ``module``; None for a plain or
    factorized module, or one that no adapter knows."""
    if isinstance(module, nn.Conv2d | nn.Linear | Factorized):
        return None
    return next((p for p in (adapt(module) for adapt in _SOURCES) if p is not None), None)


def _swap(model: nn.Module, lp: LayerPlan, new: nn.Module) -> None:
    for name in [lp.name, *lp.aliases]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _layer(model: nn.Module, name: str) -> nn.Module:
    module = _find(model, name)
    if module is None:
        raise ValueError(f"{name}: the plan names a layer this model does not have")
    return module


def _plain_layer(module: nn.Module, lp: LayerPlan) -> nn.Module:
    """The plain layer the plan factorizes at ``lp``: the module itself, or for a layer that is
    already factorized the plain layer it computes; a ValueError when the model does not fit."""
    if lp.previous_ranks:
        method = registry.get(lp.method)
        if not isinstance(module, method.module_types):
            raise ValueError(
                f"{lp.name}: the plan re-factorizes a {lp.method} module, "
                f"the model has {type(module).__name__}"
            )
        module = method.dense(module)
    elif (plain := _plain_source(module)) is not None:
        module = plain
    expected = nn.Linear if lp.kind == "linear" else nn.Conv2d
    if not isinstance(module, expected):
        raise ValueError(
            f"{lp.name}: the plan expects {expected.__name__}, "
            f"the model has {type(module).__name__}"
        )
    if list(module.weight.shape) != list(lp.shape):
        raise ValueError(
            f"{lp.name}: the plan expects weight shape {lp.shape}, "
            f"the model has {list(module.weight.shape)}"
        )
    return module


def apply(
    model: nn.Module,
    plan: Plan,
    inplace: bool = False,
    init: str = "decompose",
    progress: Callable[[str], None] | None = None,
    data: Iterable | None = None,
) -> nn.Module:
    """Build the factorized layers of ``plan`` and swap them in by qualified name.

    Args:
        model: the model the plan was made for (same layer names and shapes).
        plan: from :func:`decomp.plan` or :meth:`Plan.from_json` (possibly hand-edited).
        inplace: change ``model`` itself instead of a deep copy.
        init: "decompose" computes the factors from the weights; "structure" only builds the
            modules (uninitialised), for loading a saved state_dict.
        progress: called with each layer's name once it is done.
        data: for an output-aware plan that no longer holds its input statistics (one read
            from JSON), the calibration data to measure them again on (as for :func:`plan`).

    Returns:
        The compressed model; the plans applied to it are in :func:`applied_plans`.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {list(INITS)}")
    whitening = _whitening(model, plan, data) if init == "decompose" else {}
    target = model if inplace else copy.deepcopy(model)
    for lp in plan.layers:  # a skipped layer that is not plain becomes the plain layer it computes
        module = None if lp.method else _find(target, lp.name)
        if module is not None and (plain := _plain_source(module)) is not None:
            _swap(target, lp, plain.train(module.training))
    for lp in plan.decomposed:
        module = _layer(target, lp.name)
        layer = _plain_layer(module, lp)
        try:
            method = registry.get(lp.method)
            if init == "structure":
                new = method.build(layer, list(lp.ranks))
            elif lp.name in whitening:
                new = method.factorize(layer, list(lp.ranks), whitening=whitening[lp.name])
            else:
                new = method.factorize(layer, list(lp.ranks))
            if lp.pad is not None:
                new = Padded(pad_module(lp.pad, layer), new)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{lp.name}: {exc}") from exc
        _swap(target, lp, new.train(module.training))
        if progress is not None:
            progress(lp.name)
    setattr(target, PLANS_ATTR, [*applied_plans(target), plan.to_dict()])
    return target


def _whitening(model: nn.Module, plan: Plan, data: Iterable | None) -> dict[str, Whitening]:
    """The input statistics of the plan's output-aware layers: kept by the plan, else measured
    on ``data`` (on the original model, before any layer is replaced)."""
    wanted = [lp for lp in plan.decomposed if lp.fit == "outputs"]
    kept = plan.whitening or {}
    if all(lp.name in kept for lp in wanted):
        return kept
    if data is None:
        missing = next(lp.name for lp in wanted if lp.name not in kept)
        raise ValueError(
            f"{missing}: the plan fits the layer's outputs on calibration data; pass that "
            "data to apply (data=...)"
        )
    modules = [_layer(model, lp.name) for lp in wanted]
    moments, _, _ = input_moments(model, modules, data, plan.fit_batches)
    found = whitenings(moments)
    return {lp.name: found[m] for lp, m in zip(wanted, modules, strict=True)}


def applied_plans(model: nn.Module) -> list[dict[str, Any]]:
    """The plans applied to ``model`` so far, oldest first, as plain dicts."""
    return list(getattr(model, PLANS_ATTR, []))


def recount(model: nn.Module, p: Plan) -> Plan:
    """``p`` with every cost measured again on ``model``: after a plan's ranks were edited by
    hand, its per-layer MACs and params (and the totals) describe the edited ranks."""
    calls = trace_calls(model, p.input_size)
    layers = []
    for lp in p.layers:
        module = _layer(model, lp.name)
        layer_calls = calls.get(module, [])
        if lp.previous_ranks:
            layer = _plain_layer(module, lp)
            now = factorized_plan(lp.name, module, layer, calls)
            macs, params = now.macs_before, now.params_before
        else:
            layer = module
            macs, params = dense_costs(module, layer_calls)
        after = (macs, params)
        if lp.method:
            seen = padded_calls(layer, lp.pad, layer_calls)
            after = registry.get(lp.method).costs(layer, lp.ranks, seen)
        layers.append(
            replace(
                lp,
                macs_before=macs,
                macs_after=after[0],
                params_before=params,
                params_after=after[1],
            )
        )
    size = tuple(p.input_size)
    return replace(
        p, layers=layers, model_macs=count_macs(model, size), model_params=count_params(model)
    )
