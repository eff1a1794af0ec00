"""Layer importance from labelled batches, and its use by the MACs budget."""

import pytest
import torch
from torch import nn

import decomp
from decomp.plan.importance import output_damage
from tests.conftest import tiny_net

SIZE = (3, 16, 16)


def batches(n: int = 4, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *SIZE, generator=g), torch.randint(0, 10, (size,), generator=g))] * n


class TwoBranches(nn.Module):
    """Two convs of one shape on the same input; the second branch is scaled down by ``quiet``,
    so it barely moves the loss."""

    def __init__(self, quiet: float = 1e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.loud = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.soft = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.soft.weight.data.copy_(self.loud.weight.data)
        self.mix = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.fc = nn.Linear(32, 10)
        self.quiet = quiet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.loud(x)) + self.quiet * torch.relu(self.soft(x))
        return self.fc(torch.relu(self.mix(h)).mean(dim=(2, 3)))


def test_damage_leaves_the_model_as_it_was_and_measures_the_swap():
    model = tiny_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [model.conv1, model.conv1, model.fc]
    probes = [model.conv1.weight.detach().clone(), torch.zeros_like(model.conv1.weight)]
    probes.append(model.fc.weight.detach() * 0.5)
    damage = output_damage(model, layers, probes, batches(), batches=3)
    assert damage[0] == pytest.approx(0.0, abs=1e-6)  # the same weight changes nothing
    assert damage[1] > 0 and damage[2] > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN buffers too: eval mode
    assert model.training and all(m.training for m in model.modules())


def test_damage_is_deterministic_and_zero_for_an_unused_layer():
    model = TwoBranches(quiet=0.0)
    layers = [model.loud, model.soft]
    probes = [torch.zeros_like(model.loud.weight)] * 2
    first = output_damage(model, layers, probes, batches())
    assert first == output_damage(model, layers, probes, batches())
    assert first[1] == 0.0 < first[0]


def test_damage_needs_batches():
    model = tiny_net()
    with pytest.raises(ValueError, match="no batches"):
        output_damage(model, [model.fc], [model.fc.weight], [])
    with pytest.raises(ValueError, match="batches must be >= 1"):
        output_damage(model, [model.fc], [model.fc.weight], batches(), batches=0)


def test_budget_with_data_keeps_more_rank_where_the_loss_is_sensitive():
    model = TwoBranches()
    blind = decomp.plan(model, "tucker", input_size=SIZE, target_macs=0.5)
    ranks = {lp.name: lp.ranks for lp in blind.layers}
    assert ranks["loud"] == ranks["soft"]  # same weights, same shape: the spectra cannot tell
    assert all(lp.importance is None for lp in blind.layers)

    informed = decomp.plan(
        model,
        "tucker",
        input_size=SIZE,
        target_macs=0.5,
        data=batches(),
        fit="weights",
        weigh_layers=True,
    )
    by_name = {lp.name: lp for lp in informed.layers}
    assert by_name["loud"].importance > 10 * by_name["soft"].importance

    def kept(lp):  # (r_out, r_in); a layer kept dense keeps its full ranks
        return lp.ranks or lp.shape[:2]

    loud, soft = kept(by_name["loud"]), kept(by_name["soft"])
    assert all(a >= b for a, b in zip(loud, soft, strict=True)) and sum(loud) > sum(soft)
    budget = int(0.5 * informed.model_macs)
    assert 0.95 * budget <= informed.macs_after <= budget
    assert decomp.Plan.from_json(informed.to_json()) == informed


def test_weighing_layers_without_a_budget_is_refused():
    with pytest.raises(ValueError, match="pass data and target_macs"):
        decomp.plan(TwoBranches(), "tucker", "ratio:0.5", SIZE, data=batches(), weigh_layers=True)
