"""Plan and apply: decide per layer what to do, then do it.

``plan()`` traces one forward pass, looks at every nn.Conv2d and nn.Linear and decides, without
changing the model, which factorization it gets, at which ranks, what it costs before and after
(MACs as thop counts them, params), or why it is left alone. ``apply()`` builds the factorized
modules and swaps them in by qualified name. The pieces:

- :mod:`~decomp.plan.model`: Plan and LayerPlan, plain data with a JSON round trip;
- :mod:`~decomp.plan.trace`: the traced forward pass and the dense costs;
- :mod:`~decomp.plan.policy`: which layers, which method, is it worth it;
- :mod:`~decomp.plan.forwards`: conv subclasses whose forward decomp can carry over;
- :mod:`~decomp.plan.budget`: spending a MACs or latency budget over the layers' error curves;
- :mod:`~decomp.plan.latency_budget`: a latency target's landing, checked by measuring;
- :mod:`~decomp.plan.statistics`: the inputs' statistics behind output-aware fitting;
- :mod:`~decomp.plan.importance`: measured output damage per layer;
- :mod:`~decomp.plan.apply`: the surgery, and recounting an edited plan.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from decomp import latency
from decomp._utils import check_input_size
from decomp.factorize import registry
from decomp.factorize.base import Whitening
from decomp.metrics import count_macs, count_params
from decomp.plan import budget, forwards, policy, statistics
from decomp.plan.apply import applied_plans, apply, recount
from decomp.plan.latency_budget import LatencyBudget
from decomp.plan.model import PLAN_FORMAT, LayerPlan, Plan, Skip
from decomp.plan.policy import select_ranks
from decomp.plan.statistics import FIT_BATCHES
from decomp.plan.trace import trace_calls
from rank_selection import MIN_RANK, MIN_RANK_FRACTION, RankSpec, parse_rank_spec

__all__ = [
    "PLAN_FORMAT",
    "LayerPlan",
    "Plan",
    "Skip",
    "applied_plans",
    "apply",
    "candidate_calls",
    "decompose",
    "method_choices",
    "plan",
    "recount",
    "select_ranks",
    "trace_calls",
]

logger = logging.getLogger(__name__)

FITS = ("weights", "outputs")


def method_choices() -> list[str]:
    """The methods a plan accepts: every registered one, then ``auto``."""
    return registry.choices()


def plan(
    model: nn.Module,
    method: str = "tucker",
    rank: str | int | float | RankSpec = "vbmf",
    input_size: Sequence[int] = (3, 32, 32),
    exclude: Iterable[str] = (),
    force: bool = False,
    target_macs: float | int | str | None = None,
    data: Iterable | None = None,
    *,
    fit: str | None = None,
    fit_batches: int = FIT_BATCHES,
    weigh_layers: bool = False,
    importance_batches: int = 4,
    target_latency: float | str | None = None,
    runtime: str = "torch",
    device: str = "cpu",
    batch: int = 1,
    threads: int | None = None,
    latency_table: latency.LatencyTable | str | os.PathLike[str] | None = None,
    check_landing: bool = True,
) -> Plan:
    """Decide, per layer and without changing ``model``, how it is factorized.

    Args:
        model: any nn.Module taking a (1, *input_size) tensor.
        method: a registered method ("tucker", "cp", "svd", ...) or "auto" (per layer, the
            accepting method of lowest priority: tucker for kxk convs, svd for 1x1 and linear).
        rank: a rank spec (see rank_selection): "vbmf", "vbmf:0.6", "ratio:0.5", "energy:0.95", 16.
        input_size: (C, H, W) of one input, used to trace spatial sizes.
        exclude: fnmatch patterns of qualified names to leave alone.
        force: factorize layers even where that would not cut MACs.
        target_macs: a MACs budget for the whole model: a fraction of its MACs (0.25), or a
            count (5_000_000, "5M"). Ranks are then allocated across layers by
            :func:`rank_selection.budget.allocate` and ``rank`` is not used.
        data: calibration batches (images, or ``(images, labels)``; a DataLoader or a list:
            it is read more than once). With data, the layers that a method can fit to their
            outputs (tucker, svd) are: their inputs' statistics are measured on
            ``fit_batches`` batches (:mod:`decomp.plan.statistics`), the factors fit the
            outputs on them, and a budget's error curves are in output space.
        fit: "outputs" (the default with data) or "weights" (the default without).
        fit_batches: how many batches of ``data`` the input statistics use.
        weigh_layers: with ``target_macs`` and ``data``, also weight each layer's estimated
            error by the output damage measured on ``importance_batches`` batches
            (:mod:`decomp.plan.importance`; slower, and it did not help in the benchmarks).
        importance_batches: how many batches of ``data`` the damage measurement uses.
        target_latency: a latency budget instead of a MACs one: a fraction of the model's
            measured latency (0.5) or a time ("3ms"), on ``runtime`` ("torch" eager or
            "onnxruntime"), ``device``, ``batch`` and ``threads``. The per-layer latencies come
            from ``latency_table`` (a :class:`~decomp.latency.LatencyTable` or its JSON file;
            what it lacks is measured, see :func:`decomp.latency.profile`), ranks snap to the
            runtime's multiple (:func:`~decomp.latency.align_for`), and a layer that is not faster
            factorized stays dense (``Skip.NOT_FASTER``). With ``check_landing`` the
            planned model is built (shapes only), timed paired with the original, and the
            budget corrected until it lands within the target's
            :data:`~decomp.plan.latency_budget.LANDING` (at most ``LANDING_ROUNDS`` tries);
            the plan's ``latency`` attribute (this process only, not in its JSON) records the
            measurements.

    Returns:
        The Plan; layers that are left alone carry the reason. An output-aware plan keeps the
        input statistics for :func:`apply` in this process (never in its JSON).
    """
    registry.check_choice(method)
    fit = fit or ("outputs" if data is not None else "weights")
    _check_options(method, target_macs, data, fit, weigh_layers, target_latency)
    spec = parse_rank_spec(rank)
    input_size = check_input_size(input_size)
    exclude = list(exclude)

    calls = trace_calls(model, input_size)
    layers, eligible = _candidates(model, method, exclude, calls)
    whitening, images, seen = {}, 0, 0
    if fit == "outputs":
        whitening, images, seen = _measure_inputs(model, eligible, data, fit_batches)
    model_macs = count_macs(model, tuple(input_size))
    params = count_params(model)

    def decided(ranks: list, source: str, dense: Callable | None, measured: bool = False) -> Plan:
        """The plan at ``ranks`` (None: ``dense(candidate)`` gives the skip); with ``measured``
        latency is the judge, so a factorization is not refused for its MACs."""
        for c, r in zip(eligible, ranks, strict=True):
            if r is None:
                c.lp.skip_as(*dense(c))
            else:
                judge = force or measured
                policy.decide(c.lp, c.layer, c.method, r, calls[c.module], judge, source)
        return Plan(method, source, list(input_size), layers, model_macs, params)

    if target_latency is not None:
        table = latency.profile(
            model,
            method,
            input_size,
            runtime=runtime,
            device=device,
            batch=batch,
            threads=threads,
            table=latency_table,
            exclude=exclude,
        )
        curves = [
            budget.curve(c, whitening.get(c.module), latency.align_for(runtime, batch))
            for c in eligible
        ]
        if weigh_layers and curves:
            budget.measure(model, curves, data, importance_batches)
        spend = LatencyBudget(model, input_size, curves, calls, table, decided)
        result = spend.plan(target_latency, check_landing)
    elif target_macs is None:
        ranks = [select_ranks(c.layer, c.method, spec, c.lp.previous_ranks) for c in eligible]
        result = decided(ranks, str(spec), None)
    else:
        total = budget.parse_macs_target(target_macs, model_macs)
        curves = [budget.curve(c, whitening.get(c.module)) for c in eligible]
        if weigh_layers and curves:
            budget.measure(model, curves, data, importance_batches)
        ranks = budget.budget_ranks(curves, calls, total, model_macs)
        result = decided(
            ranks,
            f"target-macs:{target_macs}",
            lambda c: (Skip.BUDGET, "kept dense by the MACs budget"),
        )
    result.fit, result.fit_batches, result.fit_images = fit, seen, images
    budgeted = target_macs is not None or target_latency is not None
    result.notes = _notes(result, None if budgeted else spec)
    kept = {
        c.lp.name: whitening[c.module] for c in eligible if c.lp.method and c.module in whitening
    }
    result.whitening = kept or None
    logger.info("plan: %d of %d layers factorized", len(result.decomposed), len(layers))
    return result


def _notes(result: Plan, spec: RankSpec | None) -> list[str]:
    """The plan-wide facts a reader needs: the floor under vbmf ranks, what was fitted."""
    notes = []
    if spec is not None and spec.name == "vbmf":
        notes.append(
            f"{spec} ranks are at least rank_selection.min_rank: {MIN_RANK_FRACTION} of each "
            f"mode's size, and {MIN_RANK} where what EVBMF discards does not look like noise; a "
            "rank of 0 still means the weights look like noise"
        )
    if result.fit == "outputs":
        fitted = sum(lp.fit == "outputs" for lp in result.decomposed)
        notes.append(
            f"{fitted} of {len(result.decomposed)} factorized layers fit their outputs on "
            f"{result.fit_images} calibration images ({result.fit_batches} batches); the rest "
            "fit their weights"
        )
    return notes


def candidate_calls(
    model: nn.Module, method: str, input_size: Sequence[int], exclude: Iterable[str] = ()
) -> list[tuple[policy.Candidate, list]]:
    """The layers a plan with ``method`` would factorize, each with the calls its plain layer
    sees (batch 1): what :func:`decomp.latency.profile` measures."""
    registry.check_choice(method)
    calls = trace_calls(model, check_input_size(input_size))
    _, eligible = _candidates(model, method, list(exclude), calls)
    return [(c, calls[c.module]) for c in eligible]


def _candidates(
    model: nn.Module, method: str, exclude: list[str], calls: dict[nn.Module, list]
) -> tuple[list[LayerPlan], list[policy.Candidate]]:
    """Every layer's plan entry, and the layers a method will factorize. The calls of those
    are replaced by what their plain layers see (inputs grown by carried-over padding)."""
    inner = policy.inside_factorized(model)
    layers, eligible = [], []
    for module, names in policy.targets(model).items():
        own = registry.method_of(module)
        layer = own.dense(module) if own else module
        if own:
            lp = policy.factorized_plan(names[0], module, layer, calls)
        else:
            lp = policy.dense_plan(names[0], module, calls.get(module, []))
        lp.aliases = names[1:]
        layers.append(lp)
        hit = policy.first_match(names, exclude)
        if hit is not None:
            lp.skip_as(Skip.EXCLUDED, f"excluded by {hit!r}")
        elif module in inner:
            lp.skip_as(Skip.FACTORIZED, "already factorized")
        elif module not in calls:
            lp.skip_as(Skip.NOT_CALLED, "not called in the forward pass")
        elif own:
            chosen, reason = policy.refactor_method(module, method)
            if chosen is None:
                lp.skip_as(Skip.LAYER_KIND, reason)
            else:
                eligible.append(policy.Candidate(lp, module, layer, chosen))
        else:
            lp.pad, custom = forwards.recognise(module, calls[module][0])
            chosen, skip, reason = policy.method_for(module, method)
            if custom:
                lp.skip_as(Skip.CUSTOM_FORWARD, custom)
            elif chosen is None:
                lp.skip_as(skip, reason)
            else:
                eligible.append(policy.Candidate(lp, module, layer, chosen))
                calls[module] = forwards.padded_calls(module, lp.pad, calls[module])
    return layers, eligible


def _check_options(
    method: str,
    target_macs: object,
    data: object,
    fit: str,
    weigh_layers: bool,
    target_latency: object = None,
) -> None:
    if target_macs is not None and target_latency is not None:
        raise ValueError("give target_macs or target_latency, not both")
    target = "target_macs" if target_latency is None else "target_latency"
    budgeted = target_macs is not None or target_latency is not None
    if budgeted and method != registry.AUTO and not registry.get(method).budgets:
        able = [m for m in registry.names() if registry.get(m).budgets]
        raise ValueError(
            f"{target} works with {', '.join([*able, registry.AUTO])}; "
            f"{method} has no error curve for a budget"
        )
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; expected one of {list(FITS)}")
    if fit == "outputs" and data is None:
        raise ValueError("fit='outputs' fits the layers' outputs on calibration data; pass data")
    if weigh_layers and (data is None or not budgeted):
        raise ValueError(
            "weigh_layers measures output damage for a budget; pass data and target_macs "
            "(or target_latency)"
        )


def _measure_inputs(
    model: nn.Module, eligible: list[policy.Candidate], data: Iterable, batches: int
) -> tuple[dict[nn.Module, Whitening], int, int]:
    """The whitening of every eligible layer that its method can fit to its outputs (and that
    is small enough, see :data:`~decomp.plan.statistics.MAX_FEATURES`); marks them. Also the
    images and batches the statistics saw."""
    fitted = [
        c
        for c in eligible
        if c.method.fits_outputs and statistics.input_features(c.layer) <= statistics.MAX_FEATURES
    ]
    if not fitted:
        return {}, 0, 0
    modules = [c.module for c in fitted]
    moments, images, seen = statistics.input_moments(model, modules, data, batches)
    for c in fitted:
        if c.module in moments:
            c.lp.fit = "outputs"
    return statistics.whitenings(moments), images, seen


def decompose(
    model: nn.Module,
    method: str = "tucker",
    rank: str | int | float | RankSpec = "vbmf",
    input_size: Sequence[int] = (3, 32, 32),
    exclude: Iterable[str] = (),
    force: bool = False,
    inplace: bool = False,
    progress: Callable[[str], None] | None = None,
    target_macs: float | int | str | None = None,
    data: Iterable | None = None,
    **options: object,
) -> nn.Module:
    """``apply(model, plan(model, ...))``: a compressed copy of ``model`` (see :func:`plan`;
    ``options`` are its keyword-only arguments: fit, fit_batches, weigh_layers, ...)."""
    p = plan(model, method, rank, input_size, exclude, force, target_macs, data, **options)
    return apply(model, p, inplace=inplace, progress=progress)
