"""Spending a global budget (MACs, or measured latency) over the layers' error curves.

Each eligible layer gets an error-versus-rank curve from the singular spectra of its unfoldings
(one Gram eigendecomposition per mode): the dropped share of the kernel's energy in each mode,
added over the modes (exact for SVD by Eckart-Young, the HOSVD bound for Tucker-2). The ranks
walk the method's :class:`~decomp.factorize.registry.RankGrid`, so each layer has one curve, the
shape that the greedy marginal allocation of :func:`rank_selection.budget.allocate` needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from decomp.factorize.base import Whitening
from decomp.factorize.linalg import gram_eigh
from decomp.factorize.registry import Call, Method, RankGrid
from decomp.latency import LatencyTable, snapped_grid
from decomp.plan.importance import output_damage
from decomp.plan.model import LayerPlan
from decomp.plan.policy import Candidate
from rank_selection import evbmf_spectrum
from rank_selection.budget import BudgetLayer, allocate

GRID = 64
"""About how many points each layer's curve has (a method's grid may be shorter)."""
NOISE_WEIGHT = 0.01
"""What a squared singular value below the EVBMF threshold counts for in a MACs budget's error,
relative to one above it (chosen on the validation split, see docs/budget.md)."""
PROBES = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
"""Fractions of a layer's grid at which a budget with data measures the output damage."""


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


@dataclass
class Mode:
    """The spectrum of one unfolding (dim_i x rest): ``tails[r]`` is the share of the weighted
    energy beyond the first r singular values (r = 0..dim_i), and ``basis(r)`` gives the
    leading r left singular vectors."""

    tails: np.ndarray
    basis: Callable[[int], torch.Tensor]


def spectral_mode(matrix: torch.Tensor) -> Mode:
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

    return Mode(tails, basis)


@dataclass
class Curve:
    """One eligible layer's options for the allocator: grid step k -> ranks, and the estimated
    relative squared error there. ``scale`` maps k to a measured weight (damage per unit of
    estimated error); 1 without data."""

    lp: LayerPlan
    module: nn.Module
    layer: nn.Module
    method: Method
    modes: list[Mode]
    grid: RankGrid
    whitening: Whitening | None = None
    scale: Callable[[int], float] = lambda k: 1.0

    def ranks(self, k: int) -> list[int]:
        return self.grid.ranks(k)

    def spectral_error(self, k: int) -> float:
        return float(sum(m.tails[r] for m, r in zip(self.modes, self.ranks(k), strict=True)))

    def error(self, k: tuple[int]) -> float:
        return self.scale(k[0]) * self.spectral_error(k[0])

    def projection(self, k: int) -> torch.Tensor:
        """The kernel projected on the leading singular vectors of each mode at step k (in
        the whitened space of an output-aware curve, then mapped back)."""
        weight = self.layer.weight.detach()
        w = fitted_weight(weight, self.whitening)
        for i, (mode, rank) in enumerate(zip(self.modes, self.ranks(k), strict=True)):
            basis = mode.basis(rank)
            w = torch.tensordot(basis @ basis.T, w.to(basis.dtype).movedim(i, 0), dims=1)
            w = w.movedim(0, i)
        if self.whitening is not None:
            w = _input_product(w, self.whitening.inv_root)
        return w.to(weight.dtype)


def _input_product(weight: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``weight`` with its input mode (dimension 1) multiplied by ``matrix`` (Cin x Cin)."""
    return torch.tensordot(weight.movedim(1, -1), matrix.to(weight.dtype), dims=1).movedim(-1, 1)


def fitted_weight(weight: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
    """What a factorization fits: the weight, or with ``whitening`` the weight seen through its
    inputs' statistics (``W x_1 root``), whose spectra are those of the layer's outputs."""
    return weight if whitening is None else _input_product(weight.double(), whitening.root)


def curve(candidate: Candidate, whitening: Whitening | None = None, align: int = 1) -> Curve:
    """The error curve of a candidate layer under its method, in output space with
    ``whitening``; a ValueError if the method has none. An already factorized layer's ranks
    stop at the ranks it has. With ``align`` > 1 the ranks are snapped up to its multiples
    (:func:`decomp.latency.snapped_grid`: a latency budget gives ranks the runtime runs well)."""
    layer, method, cap = candidate.layer, candidate.method, candidate.lp.previous_ranks
    grid = method.grid(layer, GRID)
    if grid is None:
        raise ValueError(
            f"{method.name} has no error curve for a budget; use a method with one or auto"
        )
    if cap:
        grid = replace(grid, ranks=lambda k, ranks=grid.ranks: list(map(min, ranks(k), cap)))
    grid = snapped_grid(grid, align)
    fitted = fitted_weight(layer.weight.detach(), whitening)
    modes = [spectral_mode(m) for m in method.unfoldings(fitted)]
    return Curve(candidate.lp, candidate.module, layer, method, modes, grid, whitening)


def budget_ranks(
    curves: list[Curve], calls: dict[nn.Module, list[Call]], budget: int, model_macs: int
) -> list[list[int] | None]:
    """Ranks for the eligible layers that fit ``budget`` MACs with the least estimated error
    (None: keep the layer dense). The rest of the model's MACs are a fixed cost."""
    costs = [
        lambda k, c=c: c.method.costs(c.layer, c.ranks(k[0]), calls[c.module])[0] for c in curves
    ]
    fixed = model_macs - sum(c.lp.macs_before for c in curves)
    chosen = _allocate(curves, costs, [c.lp.macs_before for c in curves], budget, fixed)
    return [None if k is None else c.ranks(k[0]) for c, k in zip(curves, chosen, strict=True)]


def _allocate(
    curves: list[Curve],
    costs: list[Callable[[tuple[int]], float]],
    dense: list[float],
    budget: float,
    fixed: float,
) -> list[tuple[int] | None]:
    """The grid step of every curve (None: dense) from the greedy marginal allocation of
    ``budget`` (step -> ``costs``, ``dense`` for a layer left as it is, ``fixed`` for the rest
    of the model)."""
    entries = [
        BudgetLayer(c.lp.name, (c.grid.steps,), cost, c.error, d, steps=(c.grid.increment,))
        for c, cost, d in zip(curves, costs, dense, strict=True)
    ]
    return allocate(entries, budget, fixed_cost=fixed)


class LatencyModel:
    """The whole model's latency as a budget sees it:
    ``remainder + scale * (the candidate layers' latencies in the table)``.

    With ``scale`` 1 the remainder is the measured baseline less the candidates' dense
    latency (the rest of the network and the runtime's overheads, a fixed cost).
    :meth:`calibrate` fits ``scale`` and the remainder on a second measured model (every
    candidate at its lowest ranks): layers timed alone can run faster or slower than inside the
    network (caches at large batches in eager PyTorch; fusion across layers in ONNX Runtime).
    A candidate that is slower at its lowest ranks than as it is stays as it is (the allocator
    starts every layer at its lowest ranks).
    """

    def __init__(
        self,
        curves: list[Curve],
        calls: dict[nn.Module, list[Call]],
        table: LatencyTable,
        baseline_ms: float,
    ) -> None:
        self.curves, self.baseline_ms, self.scale = curves, baseline_ms, 1.0
        self.dense = [before_ms(table, c, calls[c.module]) for c in curves]
        self.costs = [
            lambda k, c=c: table.layer_ms(c.layer, c.method, c.ranks(k[0]), calls[c.module])
            for c in curves
        ]
        self.open = [
            i for i, (t, d) in enumerate(zip(self.costs, self.dense, strict=True)) if t((1,)) < d
        ]

    @property
    def remainder_ms(self) -> float:
        return self.baseline_ms - self.scale * sum(self.dense)

    def _layers_ms(self, steps: Sequence[tuple[int] | None]) -> float:
        return sum(
            d if k is None else t(k) for k, d, t in zip(steps, self.dense, self.costs, strict=True)
        )

    def predicted_ms(self, steps: Sequence[tuple[int] | None]) -> float:
        """The modelled latency with each candidate at its grid step (None: as it is)."""
        return self.remainder_ms + self.scale * self._layers_ms(steps)

    def lowest(self) -> list[tuple[int] | None]:
        """Every candidate that may be factorized at its lowest ranks, the others as they are."""
        return [(1,) if i in self.open else None for i in range(len(self.curves))]

    @property
    def floor_ms(self) -> float:
        return self.predicted_ms(self.lowest())

    def calibrate(self, floor_ms: float) -> None:
        """Fit ``scale`` so that the model predicts the measured latency ``floor_ms`` of the
        :meth:`lowest` model as well as the baseline (kept at 1 when the fit is degenerate)."""
        saved = sum(self.dense) - self._layers_ms(self.lowest())
        scale = (self.baseline_ms - floor_ms) / saved if saved > 0 else 0.0
        self.scale = scale if 0.2 <= scale <= 5.0 else 1.0

    def spend(self, budget_ms: float) -> list[tuple[int] | None]:
        """The grid step of every candidate (None: as it is) that fits ``budget_ms`` with the
        least estimated error (:func:`rank_selection.budget.allocate`)."""
        if budget_ms < self.floor_ms:
            raise ValueError(floor_message(budget_ms, self.floor_ms, self.baseline_ms))
        closed = sum(self.dense) - sum(self.dense[i] for i in self.open)
        cap = (budget_ms - self.remainder_ms) / self.scale - closed
        cap += 1e-9 * abs(cap)  # a budget at the floor is not refused for float rounding
        found = _allocate(
            [self.curves[i] for i in self.open],
            [self.costs[i] for i in self.open],
            [self.dense[i] for i in self.open],
            cap,
            0.0,
        )
        steps: list[tuple[int] | None] = [None] * len(self.curves)
        for i, k in zip(self.open, found, strict=True):
            steps[i] = k
        return steps

    def ranks(self, steps: Sequence[tuple[int] | None]) -> list[list[int] | None]:
        return [
            None if k is None else c.ranks(k[0]) for c, k in zip(self.curves, steps, strict=True)
        ]


def floor_message(budget_ms: float, floor_ms: float, baseline_ms: float) -> str:
    """The error for a latency target below what the layers can reach."""
    if floor_ms >= baseline_ms * 0.999:
        return (
            f"target latency {budget_ms:.4g} ms is below the measured {baseline_ms:.4g} ms, and "
            "no eligible layer runs faster factorized at any measured rank on this runtime and "
            "batch (see decomp profile): the floor is the model as it is"
        )
    return (
        f"target latency {budget_ms:.4g} ms ({budget_ms / baseline_ms:.3f} of the measured "
        f"{baseline_ms:.4g} ms) is below the floor of {floor_ms:.4g} ms "
        f"({floor_ms / baseline_ms:.3f} of it: every eligible layer at its lowest ranks or as "
        f"it is where that is faster, the rest of the network as it is); ask for at least "
        f"{math.ceil(floor_ms / baseline_ms * 100) / 100:.2f}"
    )


def before_ms(table: LatencyTable, c: Curve, calls: list[Call]) -> float:
    """The measured latency of a candidate as it is: its dense layer, or for an already
    factorized one its method at the ranks it has."""
    if c.lp.previous_ranks:
        return table.layer_ms(c.layer, c.method, c.lp.previous_ranks, calls)
    return table.dense_ms(c.layer, c.method, calls)


def measure(model: nn.Module, curves: list[Curve], data: Iterable, batches: int) -> None:
    """Give every curve a measured scale: at the grid points of :data:`PROBES` its kernel alone
    is replaced by the projection there and the output damage is measured (see
    :mod:`decomp.plan.importance`); the scale is damage / estimated error, relative to the mean
    over all probes, interpolated linearly in k between probes and held beyond them. A probe
    that changes nothing leaves the mean; no scale falls below 1e-3 of it. Already factorized
    layers have no single kernel to swap and keep scale 1."""
    curves = [c for c in curves if c.module is c.layer]
    points = [sorted({max(1, round(f * c.grid.steps)) for f in PROBES}) for c in curves]
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
