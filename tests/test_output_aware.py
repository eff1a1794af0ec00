"""Output-aware factorization: with calibration data, Tucker-2 and SVD fit the layer's outputs
on that data (inputs whitened by their second moment) instead of its weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import decomp
from decomp.factorize.base import Whitening
from decomp.factorize.svd import svd_factors
from decomp.factorize.tucker import tucker2_factors
from decomp.plan import Plan, statistics

SIZE = (8, 12, 12)


def correlated_inputs(n: int, channels: int = 8, signal: int = 2, seed: int = 0) -> torch.Tensor:
    """Images whose channels live near a ``signal``-dimensional subspace, as learned feature
    maps do: mixing matrix times a few latent maps, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, signal, generator=torch.Generator().manual_seed(99))
    latent = torch.randn(n, signal, *SIZE[1:], generator=g)
    return torch.einsum("cs,nshw->nchw", mix, latent) + 0.01 * torch.randn(
        n, channels, *SIZE[1:], generator=g
    )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.point = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.point(torch.relu(self.conv(x))).mean((2, 3)))


def batches(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(correlated_inputs(16, seed=seed + i), torch.zeros(16)) for i in range(n)]


def moment(x: torch.Tensor) -> torch.Tensor:
    rows = x.movedim(1, -1).reshape(-1, x.shape[1]).double()
    return rows.T @ rows / len(rows)


def test_whitening_roots() -> None:
    m = moment(correlated_inputs(8))
    w = Whitening.from_moment(m, damping=1e-2)
    damped = m + 1e-2 * m.diagonal().mean() * torch.eye(8, dtype=m.dtype)
    torch.testing.assert_close(w.root @ w.root, damped)
    torch.testing.assert_close(w.root @ w.inv_root, torch.eye(8, dtype=m.dtype))


def test_full_rank_is_exact_with_whitening() -> None:
    w = torch.randn(16, 8, 3, 3)
    white = Whitening.from_moment(moment(correlated_inputs(8)))
    f = tucker2_factors(w, (16, 8), whitening=white)
    assert ((f.reconstruct() - w).norm() / w.norm()) < 1e-5
    m = torch.randn(6, 8)
    s = svd_factors(m, 6, whitening=white)
    assert ((s.reconstruct() - m).norm() / m.norm()) < 1e-5


def test_output_aware_fits_outputs_better_on_held_out_data() -> None:
    conv = Net().conv
    train, test = correlated_inputs(32, seed=1), correlated_inputs(32, seed=2)
    white = Whitening.from_moment(moment(train))
    with torch.no_grad():
        ref = nn.functional.conv2d(test, conv.weight, padding=1)
        errors = {}
        for name, w in (("weights", None), ("outputs", white)):
            kernel = tucker2_factors(conv.weight, (16, 2), whitening=w).reconstruct()
            out = nn.functional.conv2d(test, kernel, padding=1)
            errors[name] = ((out - ref).norm() / ref.norm()).item()
    # the inputs span about 2 channel directions: 2 input ranks fitted to them lose almost
    # nothing, 2 chosen from the weights alone lose most of the output
    assert errors["outputs"] < 0.05 < 0.5 < errors["weights"], errors


def test_plan_with_data_fits_outputs_and_says_so() -> None:
    model = Net().eval()
    p = decomp.plan(model, "auto", "ratio:0.5", SIZE, data=batches(), force=True)
    # the batches and images the data held (up to the 8 batches asked for)
    assert p.fit == "outputs" and p.fit_batches == 4 and p.fit_images == 4 * 16
    assert {lp.fit for lp in p.decomposed} == {"outputs"}
    weights = decomp.plan(
        model, "auto", "ratio:0.5", SIZE, data=batches(), fit="weights", force=True
    )
    assert weights.fit == "weights" and weights.whitening is None

    x = correlated_inputs(16, seed=7)
    with torch.no_grad():
        ref = model(x)
        err = {
            q.fit: ((decomp.apply(model, q)(x) - ref).norm() / ref.norm()).item()
            for q in (p, weights)
        }
    assert err["outputs"] < err["weights"], err


def test_a_plan_read_back_from_json_needs_the_data_again() -> None:
    model = Net().eval()
    p = decomp.plan(model, "tucker", "ratio:0.5", SIZE, data=batches(), force=True)
    text = p.to_json()
    assert "whitening" not in text and '"fit": "outputs"' in text
    again = Plan.from_json(text)
    with pytest.raises(ValueError, match="pass that data to apply"):
        decomp.apply(model, again)
    x = correlated_inputs(4, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(
            decomp.apply(model, again, data=batches())(x), decomp.apply(model, p)(x)
        )


def test_budget_curves_in_output_space_meet_the_budget() -> None:
    model = Net().eval()
    p = decomp.plan(model, "auto", input_size=SIZE, target_macs=0.4, data=batches())
    budget = int(0.4 * p.model_macs)
    assert p.decomposed and p.macs_after <= budget
    assert decomp.count_macs(decomp.apply(model, p), SIZE) == p.macs_after


def test_wide_layers_fall_back_to_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statistics, "MAX_FEATURES", 10)
    p = decomp.plan(Net().eval(), "auto", "ratio:0.5", SIZE, data=batches(), force=True)
    fits = {lp.name: lp.fit for lp in p.decomposed}
    assert fits == {"conv": "outputs", "point": "weights", "fc": "weights"}


def test_fitting_outputs_needs_data() -> None:
    with pytest.raises(ValueError, match="pass data"):
        decomp.plan(Net(), "tucker", input_size=SIZE, fit="outputs")
    with pytest.raises(ValueError, match="unknown fit"):
        decomp.plan(Net(), "tucker", input_size=SIZE, data=batches(), fit="activations")


def test_the_plan_states_its_fit_and_the_vbmf_floor() -> None:
    p = decomp.plan(Net().eval(), "auto", "vbmf:0.5", SIZE, data=batches(), force=True)
    assert any("min_rank" in n for n in p.notes)
    assert any(f"on {p.fit_images} calibration images" in n for n in p.notes)
    assert Plan.from_json(p.to_json()).notes == p.notes
    ratio = decomp.plan(Net().eval(), "auto", "ratio:0.5", SIZE)
    assert ratio.notes == []
