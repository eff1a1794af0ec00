"""The layer policy: which layers a plan looks at, which method each gets, and whether the
factorization is worth it. This is the only place that decides; the methods only answer what
they accept and what they cost.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from decomp.factorize import registry
from decomp.factorize.base import Factorized
from decomp.factorize.linalg import singular_values
from decomp.factorize.registry import Call, Method
from decomp.plan.model import LayerPlan, Skip
from decomp.plan.trace import TARGET_TYPES, dense_costs
from rank_selection import RankSpec


@dataclass
class Candidate:
    """A layer a method will factorize: its plan entry, the module that the surgery replaces,
    the plain layer whose weight is factorized (the module itself, or for an already
    factorized module the plain layer it computes) and the method."""

    lp: LayerPlan
    module: nn.Module
    layer: nn.Module
    method: Method


def targets(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Every Conv2d / Linear and every factorized module, with all the qualified names it is
    reachable under."""
    names: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, TARGET_TYPES) or registry.method_of(module):
            names.setdefault(module, []).append(name)
    return names


def inside_factorized(model: nn.Module) -> set[nn.Module]:
    """The layers that are already parts of a factorized module."""
    return {
        child
        for module in model.modules()
        if isinstance(module, Factorized)
        for child in module.children()
    }


def dense_plan(name: str, layer: nn.Module, calls: Sequence[Call]) -> LayerPlan:
    """The plan entry of a layer as it is (costs before = after), before any decision."""
    macs, params = dense_costs(layer, calls)
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    return LayerPlan(name, kind, list(layer.weight.shape), None, [], macs, macs, params, params)


def factorized_plan(
    name: str, module: Factorized, dense: nn.Module, calls: dict[nn.Module, list[Call]]
) -> LayerPlan:
    """The plan entry of an already factorized module as it is: the costs of its layers, the
    shape of the weight they compute, the ranks it has."""
    macs = sum(dense_costs(child, calls.get(child, []))[0] for child in module.children())
    params = sum(p.numel() for p in module.parameters())
    lp = dense_plan(name, dense, [])
    lp.macs_before = lp.macs_after = macs
    lp.params_before = lp.params_after = params
    lp.previous_ranks = list(module.ranks)
    return lp


def refactor_method(module: Factorized, requested: str) -> tuple[Method | None, str]:
    """An already factorized module is re-factorized by its own method (under that method's
    name or auto), or left alone."""
    own = registry.method_of(module)
    if requested in (own.name, registry.AUTO):
        return own, ""
    return None, f"factorized by {own.name}; decompose again with {own.name} or auto"


def first_match(names: Iterable[str], patterns: Sequence[str]) -> str | None:
    """The first fnmatch pattern that matches any of ``names``, or None."""
    return next((p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)), None)


def method_for(layer: nn.Module, requested: str) -> tuple[Method | None, Skip | None, str]:
    """The method a layer gets under ``requested`` (a method's name or ``auto``), or None with
    the kind of reason and the sentence."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        kind = "depthwise" if layer.groups == layer.in_channels else "grouped"
        return None, Skip.GROUPED, f"{kind} conv (groups={layer.groups})"
    if requested == registry.AUTO:
        method = registry.auto_method(layer)
        if method is None:
            return None, Skip.LAYER_KIND, "no method auto may pick applies to this layer"
        return method, None, ""
    method = registry.get(requested)
    why = method.accepts(layer)
    if why is None:
        return method, None, ""
    others = [m for m in registry.names() if registry.get(m).accepts(layer) is None]
    return None, Skip.LAYER_KIND, f"{why}; use {' or '.join([*others, registry.AUTO])}"


def select_ranks(
    layer: nn.Module, method: Method, spec: RankSpec, cap: Sequence[int] = ()
) -> list[int]:
    """Ranks for ``layer`` under ``spec``: one per unfolding from its singular values, combined
    into the method's ranks (see :class:`~decomp.factorize.registry.Method`); never above
    ``cap`` (the ranks an already factorized layer has)."""
    matrices = method.unfoldings(layer.weight.detach())
    ranks = method.combine([spec.select(_spectrum(m, spec), tuple(m.shape)) for m in matrices])
    return [min(r, c) for r, c in zip(ranks, cap, strict=True)] if cap else ranks


def _spectrum(matrix, spec: RankSpec) -> np.ndarray:
    """Singular values of ``matrix``, or none when ``spec`` only needs its shape."""
    if not spec.needs_spectrum:
        return np.zeros(0)
    return singular_values(matrix).cpu().numpy()


def decide(
    lp: LayerPlan,
    layer: nn.Module,
    method: Method,
    ranks: list[int],
    calls: Sequence[Call],
    force: bool,
    source: str,
) -> None:
    """Fill ``lp`` with ``method`` at ``ranks``, or the reason it is left alone: a rank of 0,
    or a factorization that would not cut MACs (unless ``force``)."""
    if 0 in ranks:
        lp.skip_as(
            Skip.RANK_ZERO,
            f"{source} gives rank 0 (noise-like weights); use vbmf:WF, ratio:F or energy:E",
        )
        return
    macs_after, params_after = method.costs(layer, ranks, calls)
    if macs_after >= lp.macs_before and not force:
        lp.skip_as(
            Skip.NO_SAVING,
            f"{method.name} at ranks {ranks} would not cut MACs "
            f"({lp.macs_before:,} -> {macs_after:,})",
        )
        return
    lp.method, lp.ranks, lp.macs_after, lp.params_after = (
        method.name,
        ranks,
        macs_after,
        params_after,
    )
    lp.skip, lp.reason = None, ""
