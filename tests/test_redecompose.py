"""Decomposing a decomposed model merges instead of nesting: a factorized layer is re-factorized
at lower ranks of its own method, and the file records every stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import decomp
from decomp.factorize import Factorized
from decomp.plan import Skip
from tests.conftest import TinyNet

SIZE = (3, 16, 16)


def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(width=32).eval()


def factorized(model: torch.nn.Module) -> dict[str, Factorized]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Factorized)}


def no_nesting(model: torch.nn.Module) -> bool:
    return not any(
        isinstance(c, Factorized)
        for m in factorized(model).values()
        for c in m.modules()
        if c is not m
    )


def test_second_decomposition_lowers_ranks_in_place() -> None:
    once = decomp.decompose(tiny(), "auto", "ratio:0.5", SIZE, force=True)
    first = {n: m.ranks for n, m in factorized(once).items()}
    p = decomp.plan(once, "auto", "ratio:0.25", SIZE)
    again = {lp.name: lp for lp in p.decomposed}
    assert set(again) == set(first)  # every factorized layer, nothing inside one
    for name, lp in again.items():
        assert lp.previous_ranks == list(first[name])
        assert all(r <= q for r, q in zip(lp.ranks, lp.previous_ranks, strict=True))
        assert sum(lp.ranks) < sum(lp.previous_ranks), name
    twice = decomp.apply(once, p)
    assert no_nesting(twice)
    assert {n: list(m.ranks) for n, m in factorized(twice).items()} == {
        n: lp.ranks for n, lp in again.items()
    }
    assert decomp.count_macs(twice, SIZE) == p.macs_after < p.model_macs
    assert decomp.count_params(twice) == p.params_after
    assert [q["rank"] for q in decomp.applied_plans(twice)] == ["ratio:0.5", "ratio:0.25"]


@pytest.mark.parametrize("method", ["tucker", "svd"])
def test_refactorizing_at_the_same_ranks_is_exact(method: str) -> None:
    once = decomp.decompose(tiny(), method, "ratio:0.5", SIZE, force=True)
    p = decomp.plan(once, method, "ratio:0.5", SIZE, force=True)
    assert p.decomposed and all(lp.ranks == lp.previous_ranks for lp in p.decomposed)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        ref = once(x)
        out = decomp.apply(once, p)(x)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def test_ranks_never_grow_and_same_ranks_are_not_worth_it() -> None:
    once = decomp.decompose(tiny(), "tucker", "ratio:0.25", SIZE, force=True)
    p = decomp.plan(once, "tucker", "ratio:0.75", SIZE)
    redo = [lp for lp in p.layers if lp.previous_ranks]
    assert redo and all(lp.skip is Skip.NO_SAVING for lp in redo)


def test_another_method_leaves_factorized_layers_alone() -> None:
    once = decomp.decompose(tiny(), "tucker", "ratio:0.5", SIZE, force=True)
    p = decomp.plan(once, "cp", 4, SIZE)
    redo = {lp.name: lp for lp in p.layers if lp.previous_ranks}
    assert redo and all(lp.method is None for lp in redo.values())
    assert all("factorized by tucker" in lp.reason for lp in redo.values())


def test_budget_spends_across_stages() -> None:
    model = tiny()
    once = decomp.decompose(model, "auto", input_size=SIZE, target_macs=0.5)
    target = int(0.25 * decomp.count_macs(model, SIZE))
    p = decomp.plan(once, "auto", input_size=SIZE, target_macs=target)
    assert 0.9 * target <= p.macs_after <= target
    twice = decomp.apply(once, p)
    assert no_nesting(twice) and decomp.count_macs(twice, SIZE) == p.macs_after


def test_cp_layers_get_a_lower_rank() -> None:
    once = decomp.decompose(tiny(), "cp", 12, SIZE, force=True)
    p = decomp.plan(once, "cp", 6, SIZE)
    assert p.decomposed and all(
        lp.ranks == [6] and lp.previous_ranks == [12] for lp in p.decomposed
    )
    assert no_nesting(decomp.apply(once, p))


def test_every_stage_is_saved_and_rebuilt(tmp_path: Path) -> None:
    once = decomp.decompose(tiny(), "auto", "ratio:0.5", SIZE, force=True)
    twice = decomp.decompose(once, "auto", "ratio:0.25", SIZE)
    arch = {"factory": "tests.conftest:TinyNet", "kwargs": {"width": 32}}
    path = decomp.save(twice, tmp_path / "twice.pt", arch=arch)
    loaded = decomp.load(path)
    assert len(decomp.applied_plans(loaded)) == 2 and no_nesting(loaded)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), twice(x))


def test_output_aware_budget_refits_factorized_layers() -> None:
    data = [torch.randn(8, *SIZE, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = tiny()
    once = decomp.decompose(model, "auto", input_size=SIZE, target_macs=0.6, data=data)
    target = int(0.3 * decomp.count_macs(model, SIZE))
    p = decomp.plan(once, "auto", input_size=SIZE, target_macs=target, data=data)
    redone = [lp for lp in p.decomposed if lp.previous_ranks]
    assert redone and all(lp.fit == "outputs" for lp in redone)  # a factorized conv's inputs
    assert all(sum(lp.ranks) <= sum(lp.previous_ranks) for lp in redone)
    twice = decomp.apply(once, p)
    assert no_nesting(twice) and decomp.count_macs(twice, SIZE) == p.macs_after <= target
