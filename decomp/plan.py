"""Plan and apply: decide per layer what to do, then do it.

``plan()`` traces one forward pass, looks at every nn.Conv2d and nn.Linear and decides, without
changing the model, which factorization it gets, at which ranks, what it costs before and after
(MACs as thop counts them, params), or why it is left alone. ``apply()`` builds the factorized
modules and swaps them in by qualified name, so residual and custom forwards keep working. The
layer policy lives here and nowhere else.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from decomp.factorize import (
    Factorized,
    build_cp,
    build_svd,
    build_tucker2,
    cp,
    svd,
    tucker2,
)
from decomp.factorize.linalg import gram_eigh, singular_values
from rank_selection import RankSpec, evbmf_spectrum, parse_rank_spec
from rank_selection.budget import BudgetLayer, allocate

logger = logging.getLogger(__name__)

METHODS = ("auto", "cp", "svd", "tucker")
PLAN_FORMAT = 1
_FACTORIZE = {"tucker": tucker2, "cp": cp, "svd": svd}
_BUILD = {"tucker": build_tucker2, "cp": build_cp, "svd": build_svd}
_PLANS_ATTR = "_decomp_plans"


@dataclass
class LayerPlan:
    """What happens to one layer. ``method`` is None when it is skipped, with ``reason``.

    ``ranks`` is ``[r_out, r_in]`` for tucker, ``[R]`` for cp and svd. MACs count every call of
    the layer in one batch-1 forward pass, the way thop counts them (no bias terms).
    """

    name: str
    kind: str
    shape: list[int]
    method: str | None = None
    ranks: list[int] = field(default_factory=list)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    reason: str = ""
    aliases: list[str] = field(default_factory=list)
    importance: float | None = None
    """With a MACs budget and data: the mean weight the layer's error curve was given (measured
    output damage per unit of estimated error, relative to the mean over every layer's probes;
    see :mod:`decomp.importance`). None otherwise."""


@dataclass
class Plan:
    """The per-layer decisions for one model: plain data, JSON round-trip."""

    method: str
    rank: str
    input_size: list[int]
    layers: list[LayerPlan]
    model_macs: int = 0
    model_params: int = 0
    format: int = PLAN_FORMAT

    @property
    def decomposed(self) -> list[LayerPlan]:
        """The layers that get a factorization."""
        return [layer for layer in self.layers if layer.method]

    @property
    def macs_after(self) -> int:
        """Model MACs once applied (thop's count)."""
        return self.model_macs - sum(lp.macs_before - lp.macs_after for lp in self.decomposed)

    @property
    def params_after(self) -> int:
        """Model parameters once applied."""
        return self.model_params - sum(lp.params_before - lp.params_after for lp in self.decomposed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a Plan, with a clear ValueError when the data is not one."""
        if not isinstance(data, dict) or "layers" not in data:
            raise ValueError("not a decomp plan: expected an object with 'layers'")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise ValueError(f"plan format {data.get('format')!r}; this decomp reads {PLAN_FORMAT}")
        try:
            layers = [LayerPlan(**layer) for layer in data["layers"]]
            plan = cls(**{**data, "layers": layers})
        except TypeError as exc:
            raise ValueError(f"not a decomp plan: {exc}") from None
        for layer in plan.decomposed:
            if layer.method not in _FACTORIZE:
                raise ValueError(
                    f"{layer.name}: unknown method {layer.method!r}; "
                    f"expected one of {sorted(_FACTORIZE)}"
                )
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)


# ----------------------------------------------------------------------------- tracing


@dataclass
class _Call:
    """Input and output shapes of one call of a layer in the traced forward pass."""

    inp: tuple[int, ...]
    out: tuple[int, ...]


@torch.no_grad()
def trace_calls(model: nn.Module, input_size: Sequence[int]) -> dict[nn.Module, list[_Call]]:
    """Shapes seen by every Conv2d and Linear in one eval-mode forward pass at batch 1."""
    calls: dict[nn.Module, list[_Call]] = {}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls.setdefault(module, []).append(_Call(tuple(args[0].shape), tuple(output.shape)))

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    flags = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    kwargs = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    try:
        model.eval()
        model(torch.zeros(1, *input_size, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags.items():
            m.training = flag
    return calls


# ------------------------------------------------------------------------- costs


def _conv_macs(calls: list[_Call], c_out: int, c_in: int, kh: int, kw: int) -> int:
    return sum(c.out[2] * c.out[3] * c_out * c_in * kh * kw for c in calls)


def _costs_after(
    layer: nn.Module, method: str, ranks: list[int], calls: list[_Call]
) -> tuple[int, int]:
    """(MACs, params) of the factorized layer, in closed form."""
    bias = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bias = bias if layer.bias is not None else 0
    if isinstance(layer, nn.Linear):
        (r,) = ranks
        rows = sum(_numel(c.out) // layer.out_features for c in calls)
        size = r * (layer.in_features + layer.out_features)
        return rows * size, size + bias
    c_out, c_in, (kh, kw) = layer.out_channels, layer.in_channels, layer.kernel_size
    out_hw = sum(c.out[2] * c.out[3] for c in calls)
    in_hw = sum(c.inp[2] * c.inp[3] for c in calls)
    if method == "svd":
        (r,) = ranks
        return out_hw * r * (c_in + c_out), r * (c_in + c_out) + bias
    if method == "tucker":
        r_out, r_in = ranks
        macs = in_hw * r_in * c_in + out_hw * (r_out * r_in * kh * kw + c_out * r_out)
        return macs, c_in * r_in + r_in * r_out * kh * kw + r_out * c_out + bias
    (r,) = ranks  # cp: the kx1 conv runs at the output height and the input width
    mid_hw = sum(c.out[2] * c.inp[3] for c in calls)
    macs = in_hw * r * c_in + mid_hw * r * kh + out_hw * r * (kw + c_out)
    return macs, r * (c_in + kh + kw + c_out) + bias


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _costs_before(layer: nn.Module, calls: list[_Call]) -> tuple[int, int]:
    params = sum(p.numel() for p in layer.parameters(recurse=False))
    if isinstance(layer, nn.Linear):
        return sum(_numel(c.out) * layer.in_features for c in calls), params
    kh, kw = layer.kernel_size
    c_in = layer.in_channels // layer.groups
    return _conv_macs(calls, layer.out_channels, c_in, kh, kw), params


# ------------------------------------------------------------------------ policy


def _method_for(layer: nn.Module, requested: str) -> tuple[str | None, str]:
    """The factorization a layer gets under ``requested``, or None and the reason."""
    if isinstance(layer, nn.Linear):
        if requested in ("svd", "auto"):
            return "svd", ""
        return None, f"linear layer: {requested} applies to kxk convs; use svd or auto"
    if layer.groups != 1:
        kind = "depthwise" if layer.groups == layer.in_channels else "grouped"
        return None, f"{kind} conv (groups={layer.groups})"
    pointwise = layer.kernel_size == (1, 1)
    if requested == "auto":
        return ("svd" if pointwise else "tucker"), ""
    if pointwise and requested != "svd":
        return None, f"1x1 conv: {requested} applies to kxk kernels; use svd or auto"
    if not pointwise and requested == "svd":
        return None, "kxk conv: svd applies to linear and 1x1 layers; use tucker, cp or auto"
    return requested, ""


def _unfoldings(weight: torch.Tensor) -> list[torch.Tensor]:
    """Mode-0 (Cout x Cin*k*k) and mode-1 (Cin x Cout*k*k) unfoldings of a conv kernel."""
    return [
        weight.reshape(weight.shape[0], -1),
        weight.transpose(0, 1).reshape(weight.shape[1], -1),
    ]


def select_ranks(layer: nn.Module, method: str, spec: RankSpec) -> list[int]:
    """Ranks for ``layer`` under ``spec``: [r_out, r_in] for tucker, [R] for cp and svd.

    Each mode's rank comes from the singular values of that mode's unfolding; CP takes the
    larger of the two channel-mode ranks.
    """
    weight = layer.weight.detach()
    if method == "svd":
        matrices = [weight.reshape(weight.shape[0], -1)]
    else:
        matrices = _unfoldings(weight)
    ranks = [spec.select(_spectrum(m, spec), tuple(m.shape)) for m in matrices]
    if method == "cp":
        return [0] if min(ranks) == 0 else [max(ranks)]
    return ranks


def _spectrum(matrix: torch.Tensor, spec: RankSpec) -> np.ndarray:
    """Singular values of ``matrix``, or none when ``spec`` only needs its shape."""
    if not spec.needs_spectrum:
        return np.zeros(0)
    return singular_values(matrix).cpu().numpy()


def _dense_plan(name: str, layer: nn.Module, calls: list[_Call], reason: str = "") -> LayerPlan:
    """The plan entry of a layer left as it is (costs before = after)."""
    macs, params = _costs_before(layer, calls)
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    return LayerPlan(
        name, kind, list(layer.weight.shape), None, [], macs, macs, params, params, reason
    )


def _decide(
    lp: LayerPlan,
    layer: nn.Module,
    method: str,
    ranks: list[int],
    calls: list[_Call],
    force: bool,
    source: str,
) -> None:
    """Fill ``lp`` with ``method`` at ``ranks``, or the reason it is left alone."""
    if 0 in ranks:
        lp.reason = f"{source} gives rank 0 (noise-like weights); use vbmf:WF, ratio:F or energy:E"
        return
    macs_after, params_after = _costs_after(layer, method, ranks, calls)
    if macs_after >= lp.macs_before and not force:
        lp.reason = (
            f"{method} at ranks {ranks} would not cut MACs ({lp.macs_before:,} -> {macs_after:,})"
        )
        return
    lp.method, lp.ranks, lp.macs_after, lp.params_after = method, ranks, macs_after, params_after


def parse_macs_target(target: float | int | str, model_macs: int) -> int:
    """A MACs budget: a fraction in (0, 1] of ``model_macs``, or a count (5000000, "5M", "1.2G")."""
    value: float | int | None = None
    if isinstance(target, int | float) and not isinstance(target, bool):
        value = target
    elif isinstance(target, str):
        text = target.strip().upper()
        scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:])
        try:
            value = (
                float(text[:-1]) * scale
                if scale
                else (int(text) if text.isdigit() else float(text))
            )
        except ValueError:
            value = None
    if isinstance(value, float) and 0 < value <= 1:
        return int(value * model_macs)
    if value is not None and value >= 1 and float(value).is_integer():
        return int(value)
    raise ValueError(
        f"bad MACs target {target!r}; expected a fraction in (0, 1] like 0.25, "
        "or a count like 5000000 or 5M"
    )


NOISE_WEIGHT = 0.01
"""What a squared singular value below the EVBMF threshold counts for in a MACs budget's error,
relative to one above it (chosen on the validation split, see the README)."""


@dataclass
class _Mode:
    """The spectrum of one unfolding (channels x rest): tails[r] = the share of the weighted
    energy beyond the first r singular values (r = 0..channels), and the leading left singular
    vectors."""

    tails: np.ndarray
    basis: Callable[[int], torch.Tensor]


def _mode(matrix: torch.Tensor) -> _Mode:
    """The budget's view of one unfolding. EVBMF splits its spectrum into signal and noise; the
    noise components count :data:`NOISE_WEIGHT` of their energy, so the allocator spends MACs on
    what the layer learned before the rest of its random initialisation."""
    values, vectors, left = gram_eigh(matrix)
    s2 = values.cpu().numpy()
    signal = evbmf_spectrum(np.sqrt(s2), tuple(matrix.shape)).rank
    energy = np.zeros(matrix.shape[0])
    energy[: len(s2)] = s2
    total = energy.sum() or 1.0
    energy[signal:] *= NOISE_WEIGHT
    kept = energy.sum()
    tails = np.concatenate([[kept], kept - np.cumsum(energy)]).clip(min=0) / total

    def basis(rank: int) -> torch.Tensor:
        v = vectors[:, :rank]
        if left:
            return v
        u = matrix.to(v.dtype) @ v  # left vectors from right ones: A v_i = s_i u_i
        return u / u.norm(dim=0).clamp_min(torch.finfo(u.dtype).tiny)

    return _Mode(tails, basis)


GRID = 64  # a Tucker-2 layer's budget ranks move along (ceil(k/64 Cout), ceil(k/64 Cin))
PROBES = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
"""Fractions of a layer's grid at which a budget with data measures the output damage."""


@dataclass
class _Curve:
    """One eligible layer's options for the allocator: grid step k (1..steps) -> ranks, and the
    estimated relative squared error there (exact for SVD by Eckart-Young, the HOSVD bound, the
    two dropped shares added, for Tucker-2). ``scale`` maps k to a measured weight (damage per
    unit of estimated error); 1 without data."""

    lp: LayerPlan
    module: nn.Module
    method: str
    modes: list[_Mode]
    steps: int
    scale: Callable[[int], float] = lambda k: 1.0

    def ranks(self, k: int) -> list[int]:
        if self.method == "svd":
            return [k]
        return [max(1, -(-k * (len(m.tails) - 1) // self.steps)) for m in self.modes]

    def spectral_error(self, k: int) -> float:
        return float(sum(m.tails[r] for m, r in zip(self.modes, self.ranks(k), strict=True)))

    def error(self, k: tuple[int]) -> float:
        return self.scale(k[0]) * self.spectral_error(k[0])

    def projection(self, k: int) -> torch.Tensor:
        """The kernel projected on the leading singular vectors of each mode at step k."""
        weight = self.module.weight.detach()
        ranks = self.ranks(k)
        out = self.modes[0].basis(ranks[0])
        w = weight.reshape(weight.shape[0], -1).to(out.dtype)
        w = out @ (out.T @ w)
        if self.method != "svd":
            inp = self.modes[1].basis(ranks[1])
            w = torch.einsum("ij,ojs->ois", inp @ inp.T, w.reshape(*weight.shape[:2], -1))
        return w.reshape(weight.shape).to(weight.dtype)


def _curve(lp: LayerPlan, module: nn.Module, method: str) -> _Curve:
    weight = module.weight.detach()
    if method == "svd":
        modes = [_mode(weight.reshape(weight.shape[0], -1))]
        steps = min(weight.shape[0], _numel(weight.shape[1:]))
    else:
        modes = [_mode(m) for m in _unfoldings(weight)]
        steps = min(GRID, max(len(m.tails) - 1 for m in modes))
    return _Curve(lp, module, method, modes, steps)


def _budget_ranks(curves: list[_Curve], calls: dict, budget: int, model_macs: int) -> list:
    """Ranks for the eligible layers that fit ``budget`` MACs with the least estimated error.

    The error of a layer is estimated from the spectra of its unfoldings (cheap: one Gram
    eigendecomposition per mode), times its measured scale when data was given. Tucker-2 ranks
    move together along a grid of fractions of (Cout, Cin), so that each layer has one
    error-versus-MACs curve, the shape a greedy marginal allocation needs.
    """
    entries = []
    for c in curves:

        def cost(k: tuple[int], c: _Curve = c) -> int:
            return _costs_after(c.module, c.method, c.ranks(k[0]), calls[c.module])[0]

        step = (max(1, c.steps // GRID),)
        entries.append(
            BudgetLayer(c.lp.name, (c.steps,), cost, c.error, c.lp.macs_before, steps=step)
        )
    fixed = model_macs - sum(c.lp.macs_before for c in curves)
    chosen = allocate(entries, budget, fixed_cost=fixed)
    return [None if k is None else c.ranks(k[0]) for c, k in zip(curves, chosen, strict=True)]


def _measure(model: nn.Module, curves: list[_Curve], data: Iterable, batches: int) -> None:
    """Give every curve a measured scale: at the grid points of :data:`PROBES` its kernel alone
    is replaced by the projection there and the output damage is measured (see
    :mod:`decomp.importance`); the scale is damage / estimated error, relative to the mean over
    all probes, interpolated linearly in k between probes and held beyond them. A probe that
    changes nothing leaves the mean; no scale falls below 1e-3 of it."""
    from decomp.importance import output_damage

    points = [sorted({max(1, round(f * c.steps)) for f in PROBES}) for c in curves]
    layers = [c.module for c, ks in zip(curves, points, strict=True) for _ in ks]
    probes = [c.projection(k) for c, ks in zip(curves, points, strict=True) for k in ks]
    damage = iter(output_damage(model, layers, probes, data, batches))
    ratios = []
    for c, ks in zip(curves, points, strict=True):
        errors = [c.spectral_error(k) for k in ks]
        ratios.append([next(damage) / e if e > 0 else None for e in errors])
    measured = [r for rs in ratios for r in rs if r is not None]
    mean = sum(measured) / len(measured) if measured and sum(measured) > 0 else 1.0
    for c, ks, rs in zip(curves, points, ratios, strict=True):
        values = [1.0 if r is None else max(r / mean, 1e-3) for r in rs]
        c.scale = lambda k, ks=ks, vs=values: float(np.interp(k, ks, vs))
        c.lp.importance = float(np.mean(values))


def _targets(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Every Conv2d / Linear with all the qualified names it is reachable under."""
    names: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Conv2d | nn.Linear):
            names.setdefault(module, []).append(name)
    return names


def _inside_factorized(model: nn.Module) -> set[nn.Module]:
    return {
        child
        for module in model.modules()
        if isinstance(module, Factorized)
        for child in module.children()
    }


def plan(
    model: nn.Module,
    method: str = "tucker",
    rank: str | int | float | RankSpec = "vbmf",
    input_size: Sequence[int] = (3, 32, 32),
    exclude: Iterable[str] = (),
    force: bool = False,
    target_macs: float | int | str | None = None,
    data: Iterable | None = None,
    importance_batches: int = 4,
) -> Plan:
    """Decide, per layer and without changing ``model``, how it is factorized.

    Args:
        model: any nn.Module taking a (1, *input_size) tensor.
        method: "tucker", "cp", "svd" or "auto" (tucker for kxk convs, svd for 1x1 and linear).
        rank: a rank spec (see rank_selection): "vbmf", "vbmf:0.6", "ratio:0.5", "energy:0.95", 16.
        input_size: (C, H, W) of one input, used to trace spatial sizes.
        exclude: fnmatch patterns of qualified names to leave alone.
        force: factorize layers even where that would not cut MACs.
        target_macs: a MACs budget for the whole model: a fraction of its MACs (0.25), or a
            count (5_000_000, "5M"). Ranks are then allocated across layers by
            :func:`rank_selection.budget.allocate` and ``rank`` is not used.
        data: with ``target_macs``, batches (images, or ``(images, labels)``) on which each
            layer's output damage per unit of estimated error is measured
            (:mod:`decomp.importance`) and used to weight its error; without data every layer
            weighs the same.
        importance_batches: how many batches of ``data`` to use.

    Returns:
        The Plan; layers that are left alone carry the reason.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    if target_macs is not None and method == "cp":
        raise ValueError("target_macs works with tucker, svd and auto; CP has no cheap error curve")
    if data is not None and target_macs is None:
        raise ValueError("data weighs the layers of a MACs budget; pass target_macs too")
    spec = parse_rank_spec(rank)
    input_size = _check_input_size(input_size)
    exclude = list(exclude)
    from decomp.metrics import count_macs, count_params

    calls = trace_calls(model, input_size)
    inner = _inside_factorized(model)
    layers, eligible = [], []
    for module, names in _targets(model).items():
        hit = next((p for p in exclude if any(fnmatch.fnmatchcase(n, p) for n in names)), None)
        lp = _dense_plan(names[0], module, calls.get(module, []))
        lp.aliases = names[1:]
        layers.append(lp)
        if hit is not None:
            lp.reason = f"excluded by {hit!r}"
        elif module in inner:
            lp.reason = "already factorized"
        elif module not in calls:
            lp.reason = "not called in the forward pass"
        else:
            chosen, lp.reason = _method_for(module, method)
            if chosen is not None:
                eligible.append((lp, module, chosen))
    model_macs = count_macs(model, tuple(input_size))
    if target_macs is None:
        ranks = [select_ranks(module, chosen, spec) for _, module, chosen in eligible]
        source = str(spec)
    else:
        budget = parse_macs_target(target_macs, model_macs)
        curves = [_curve(lp, m, method) for lp, m, method in eligible]
        if data is not None and curves:
            _measure(model, curves, data, importance_batches)
        ranks = _budget_ranks(curves, calls, budget, model_macs)
        source = f"target-macs:{target_macs}"
    for (lp, module, chosen), r in zip(eligible, ranks, strict=True):
        if r is None:
            lp.reason = "kept dense by the MACs budget"
        else:
            _decide(lp, module, chosen, r, calls[module], force, source)
    result = Plan(method, source, list(input_size), layers, model_macs, count_params(model))
    logger.info("plan: %d of %d layers factorized", len(result.decomposed), len(layers))
    return result


def _check_input_size(input_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(d, int) and d > 0 for d in size):
        raise ValueError(
            f"input_size must be three positive integers (C, H, W); got {input_size!r}"
        )
    return size  # type: ignore[return-value]


# ------------------------------------------------------------------------- apply


def _check_fits(module: nn.Module, lp: LayerPlan) -> None:
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


def apply(
    model: nn.Module,
    plan: Plan,
    inplace: bool = False,
    init: str = "decompose",
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """Build the factorized layers of ``plan`` and swap them in by qualified name.

    Args:
        model: the model the plan was made for (same layer names and shapes).
        plan: from :func:`plan` or :meth:`Plan.from_json` (possibly hand-edited).
        inplace: change ``model`` itself instead of a deep copy.
        init: "decompose" computes the factors from the weights; "structure" only builds the
            modules (uninitialised), for loading a saved state_dict.
        progress: called with each layer's name once it is done.

    Returns:
        The compressed model; the plans applied to it are in :func:`applied_plans`.
    """
    if init not in ("decompose", "structure"):
        raise ValueError(f"unknown init {init!r}; expected one of ['decompose', 'structure']")
    target = model if inplace else copy.deepcopy(model)
    make = _FACTORIZE if init == "decompose" else _BUILD
    for lp in plan.decomposed:
        module = _get(target, lp.name)
        _check_fits(module, lp)
        try:
            new = make[lp.method](module, lp.ranks if lp.method == "tucker" else lp.ranks[0])
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{lp.name}: {exc}") from exc
        new.train(module.training)
        for name in [lp.name, *lp.aliases]:
            parent, _, child = name.rpartition(".")
            setattr(target.get_submodule(parent), child, new)
        if progress is not None:
            progress(lp.name)
    setattr(target, _PLANS_ATTR, [*applied_plans(target), plan.to_dict()])
    return target


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{name}: the plan names a layer this model does not have") from None


def recount(model: nn.Module, p: Plan) -> Plan:
    """``p`` with every cost measured again on ``model``: after a plan's ranks were edited by
    hand, its per-layer MACs and params (and the totals) describe the edited ranks."""
    from decomp.metrics import count_macs, count_params

    calls = trace_calls(model, p.input_size)
    layers = []
    for lp in p.layers:
        module = _get(model, lp.name)
        layer_calls = calls.get(module, [])
        macs, params = _costs_before(module, layer_calls)
        after = _costs_after(module, lp.method, lp.ranks, layer_calls) if lp.method else None
        macs_after, params_after = after or (macs, params)
        layers.append(
            replace(
                lp,
                macs_before=macs,
                macs_after=macs_after,
                params_before=params,
                params_after=params_after,
            )
        )
    size = tuple(p.input_size)
    return replace(
        p, layers=layers, model_macs=count_macs(model, size), model_params=count_params(model)
    )


def applied_plans(model: nn.Module) -> list[dict[str, Any]]:
    """The plans applied to ``model`` so far, oldest first, as plain dicts."""
    return list(getattr(model, _PLANS_ATTR, []))


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
    importance_batches: int = 4,
) -> nn.Module:
    """``apply(model, plan(model, ...))``: a compressed copy of ``model`` (see :func:`plan`)."""
    p = plan(model, method, rank, input_size, exclude, force, target_macs, data, importance_batches)
    return apply(model, p, inplace=inplace, progress=progress)
