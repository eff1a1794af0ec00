"""The greedy allocator on small problems whose best answer is known."""

import itertools

import pytest

from rank_selection.budget import BudgetError, BudgetLayer, allocate, floor_cost


def linear_layer(name: str, top: int, unit_cost: int, tail: list[float]) -> BudgetLayer:
    """A layer whose cost grows by ``unit_cost`` per rank and whose error is ``tail[r]``."""
    return BudgetLayer(
        name,
        (top,),
        cost=lambda r: unit_cost * r[0],
        error=lambda r: tail[r[0]],
        dense_cost=unit_cost * top * 2,
        steps=(1,),
    )


def convex_tail(top: int, decay: float) -> list[float]:
    return [decay**r for r in range(top + 1)]


def best_by_search(layers, budget, fixed):
    """Exhaustive search over the rank grids (the dense option included)."""
    options = []
    for lay in layers:
        grid = [(r,) for r in range(1, lay.max_ranks[0] + 1)] + [None]
        options.append(grid)
    best = None
    for choice in itertools.product(*options):
        cost = fixed + sum(
            lay.dense_cost if c is None else lay.cost(c)
            for lay, c in zip(layers, choice, strict=True)
        )
        if cost > budget:
            continue
        err = sum(0.0 if c is None else lay.error(c) for lay, c in zip(layers, choice, strict=True))
        if best is None or err < best[0]:
            best = (err, choice)
    return best


@pytest.mark.parametrize("budget", [40, 60, 90])
def test_greedy_matches_exhaustive_search_on_convex_curves(budget):
    layers = [
        linear_layer("a", 6, 5, convex_tail(6, 0.5)),
        linear_layer("b", 6, 3, convex_tail(6, 0.7)),
        linear_layer("c", 6, 4, convex_tail(6, 0.6)),
    ]
    ranks = allocate(layers, budget, fixed_cost=10)
    cost = 10 + sum(
        lay.dense_cost if r is None else lay.cost(r) for lay, r in zip(layers, ranks, strict=True)
    )
    assert cost <= budget
    err = sum(0.0 if r is None else lay.error(r) for lay, r in zip(layers, ranks, strict=True))
    best_err, _ = best_by_search(layers, budget, 10)
    assert err <= best_err + 0.02, (ranks, err, best_err)


def test_more_budget_never_raises_the_error():
    layers = [
        linear_layer(n, 8, c, convex_tail(8, d))
        for n, c, d in [("a", 2, 0.5), ("b", 5, 0.8), ("c", 3, 0.6)]
    ]
    errors = []
    for budget in range(30, 140, 10):
        ranks = allocate(layers, budget)
        errors.append(
            sum(0.0 if r is None else lay.error(r) for lay, r in zip(layers, ranks, strict=True))
        )
    assert errors == sorted(errors, reverse=True)


def test_a_layer_that_would_cost_its_dense_price_is_kept_dense():
    lay = linear_layer("a", 10, 10, convex_tail(10, 0.9))  # dense costs 200 = rank 20
    cheap = BudgetLayer("b", (4,), lambda r: 100 * r[0], lambda r: 0.0, dense_cost=150)
    ranks = allocate([lay, cheap], 10_000)
    assert ranks[1] is None  # rank 2 would already cost more than dense


def test_budget_below_the_floor_names_it():
    layers = [linear_layer("a", 4, 10, convex_tail(4, 0.5))]
    assert floor_cost(layers, 5) == 15
    with pytest.raises(BudgetError, match="floor of 15 MACs"):
        allocate(layers, 14, fixed_cost=5)


def test_a_layer_dearer_at_rank_one_than_dense_stays_dense() -> None:
    cheap = BudgetLayer("cheap", (4,), lambda r: 10 * r[0], lambda r: 1.0 / r[0], 100, steps=(1,))
    dear = BudgetLayer("dear", (4,), lambda r: 50 + r[0], lambda r: 1.0 / r[0], 40, steps=(1,))
    # the dear layer starts (and stays) dense at 40; the cheap one spends the remaining 10
    assert allocate([cheap, dear], budget=60) == [(2,), None]
