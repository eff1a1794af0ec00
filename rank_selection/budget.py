"""Global rank allocation: meet a total cost budget with the least summed (weighted) error.

Each layer offers a grid of rank tuples (one rank per factor mode), a cost for each tuple (MACs,
computed by the caller, who knows the layer's geometry) and an error estimate (from the singular
spectra, also the caller's). Starting from rank 1 everywhere, the allocator repeatedly takes the
step with the largest error reduction per unit of added cost that still fits, a greedy
marginal-analysis scheme in the spirit of bit allocation in transform coding (Shoham and Gersho,
"Efficient bit allocation for an arbitrary set of quantizers", IEEE TASSP 36(9), 1988). A layer
whose factorized cost reaches its dense cost is kept dense: that is cheaper and exact.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Ranks = tuple[int, ...]
DENSE: Ranks = ()  # the move that keeps a layer as it is
_TIE = itertools.count()


@dataclass(frozen=True)
class BudgetLayer:
    """One layer's options.

    Attributes:
        name: for messages.
        max_ranks: the largest rank of each mode.
        cost: ranks -> cost of the factorized layer (MACs).
        error: ranks -> damage estimate (e.g. relative squared reconstruction error).
        dense_cost: cost of leaving the layer as it is (error 0).
        weight: importance multiplier on the error.
        steps: rank increment per mode (coarser steps make big layers faster to allocate);
            None moves one rank at a time.
    """

    name: str
    max_ranks: Ranks
    cost: Callable[[Ranks], int]
    error: Callable[[Ranks], float]
    dense_cost: int
    weight: float = 1.0
    steps: Ranks | None = None


class BudgetError(ValueError):
    """The budget is below the floor (every layer at rank 1 plus the fixed cost)."""

    def __init__(self, budget: int, floor: int) -> None:
        self.budget, self.floor = budget, floor
        super().__init__(
            f"target of {budget:,} MACs is below the floor of {floor:,} MACs "
            "(every eligible layer at rank 1, the rest unchanged); ask for at least the floor"
        )


def floor_cost(layers: Sequence[BudgetLayer], fixed_cost: int) -> int:
    """The least total cost reachable: rank 1 in every mode (or dense, if that is cheaper)."""
    return fixed_cost + sum(
        min(lay.cost((1,) * len(lay.max_ranks)), lay.dense_cost) for lay in layers
    )


def allocate(layers: Sequence[BudgetLayer], budget: int, fixed_cost: int = 0) -> list[Ranks | None]:
    """Ranks for every layer (None = keep it dense) with total cost <= ``budget``.

    Args:
        layers: the layers that may be factorized.
        budget: the total cost allowed, ``fixed_cost`` included.
        fixed_cost: the cost of everything that is not in ``layers``.

    Raises:
        BudgetError: when even the floor exceeds the budget.
    """
    floor = floor_cost(layers, fixed_cost)
    if floor > budget:
        raise BudgetError(budget, floor)
    ranks: list[Ranks | None] = []
    total = fixed_cost
    for lay in layers:
        start = (1,) * len(lay.max_ranks)
        dense = lay.cost(start) >= lay.dense_cost
        ranks.append(None if dense else start)
        total += lay.dense_cost if dense else lay.cost(start)

    heap: list[tuple[float, int, int, Ranks, Ranks]] = []
    for i in range(len(layers)):
        _push_moves(heap, layers, ranks, i)
    while heap:
        _, _, i, start, new = heapq.heappop(heap)
        if ranks[i] != start:
            continue  # stale: the layer moved since this entry was pushed
        lay = layers[i]
        dense = new == DENSE or lay.cost(new) >= lay.dense_cost
        added = (lay.dense_cost if dense else lay.cost(new)) - lay.cost(start)
        if total + added > budget:
            continue
        total += added
        ranks[i] = None if dense else new
        if not dense:
            _push_moves(heap, layers, ranks, i)
    return ranks


def _push_moves(heap: list, layers: Sequence[BudgetLayer], ranks: list, i: int) -> None:
    """Queue one step up in each mode of layer ``i``, and going dense, keyed by the error drop
    per added cost (best first)."""
    lay, current = layers[i], ranks[i]
    if current is None:
        return  # dense: the end of this layer's moves
    steps = lay.steps or (1,) * len(lay.max_ranks)
    err, cost = lay.error(current), lay.cost(current)
    moves = [DENSE]
    for k, (r, top, step) in enumerate(zip(current, lay.max_ranks, steps, strict=True)):
        if r < top:
            moves.append(current[:k] + (min(top, r + step),) + current[k + 1 :])
    for new in moves:
        dense = new == DENSE or lay.cost(new) >= lay.dense_cost
        added = (lay.dense_cost if dense else lay.cost(new)) - cost
        gain = lay.weight * (err - (0.0 if dense else lay.error(new)))
        priority = -gain / added if added > 0 else -float("inf")
        heapq.heappush(heap, (priority, next(_TIE), i, current, new))
