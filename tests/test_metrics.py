"""Tests for decomp.metrics: MAC counters, parameters, F1, the competition score, latency."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from decomp.metrics import (
    BASELINE_F1,
    BASELINE_MACS,
    classification_summary,
    competition_score,
    count_macs,
    count_macs_competition,
    count_params,
    evaluate_model,
    macro_f1,
    measure_latency,
)

# --------------------------------------------------------------------------- competition score

# Published leaderboard rows: (MACs, F1, score).
LEADERBOARD = [
    (2_295_497, 0.5112, 0.5539),
    (42_826_312, 0.7085, 3.2398),
    (1_862_490, 0.4892, 1.1343),
    (664_308, 0.4201, 1.0479),
]


@pytest.mark.parametrize("macs, f1, score", LEADERBOARD[1:])
def test_score_matches_leaderboard_with_published_constants(macs, f1, score):
    assert round(competition_score(macs, f1), 4) == score


def test_score_first_leaderboard_row_needs_a_different_f1_base():
    # 0.5112 is in the middle branch, so the row depends on F1_base. With the published 0.8342 it
    # gives 0.5528, with 0.836 0.5541; 0.5539 holds for F1_base in [0.83567, 0.83580].
    macs, f1, score = LEADERBOARD[0]
    assert round(competition_score(macs, f1), 4) == 0.5528
    assert round(competition_score(macs, f1, baseline_f1=0.836), 4) == 0.5541
    assert round(competition_score(macs, f1, baseline_f1=0.8357), 4) == score


def test_score_defaults_are_the_published_constants():
    assert BASELINE_MACS == 13_863_553
    assert BASELINE_F1 == 0.8342
    assert competition_score(BASELINE_MACS, BASELINE_F1) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "f1, f1_term",
    [
        (0.0, 1.0),
        (0.4999, 1.0),
        (0.5, 1 - 0.5 / 0.8),
        (0.7, 1 - 0.7 / 0.8),
        (0.8, 0.0),
        (0.9, 0.5 * (1 - 0.9 / 0.8)),
        (1.0, 0.5 * (1 - 1.0 / 0.8)),
    ],
)
def test_score_each_f1_branch(f1, f1_term):
    score = competition_score(250, f1, baseline_macs=1000, baseline_f1=0.8)
    assert score == pytest.approx(0.25 + f1_term, abs=1e-12)


def test_score_is_discontinuous_at_half():
    # Just below 0.5 the F1 term is 1; at 0.5 it drops to 1 - 0.5 / F1_base.
    below = competition_score(0, 0.4999)
    at = competition_score(0, 0.5)
    assert below == 1.0 and at == pytest.approx(1 - 0.5 / 0.8342)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"macs": -1, "f1": 0.9}, "macs"),
        ({"macs": math.nan, "f1": 0.9}, "macs"),
        ({"macs": math.inf, "f1": 0.9}, "macs"),
        ({"macs": 10, "f1": -0.01}, "f1"),
        ({"macs": 10, "f1": 1.01}, "f1"),
        ({"macs": 10, "f1": math.nan}, "f1"),
        ({"macs": 10, "f1": 0.9, "baseline_macs": 0}, "baseline_macs"),
        ({"macs": 10, "f1": 0.9, "baseline_macs": -5}, "baseline_macs"),
        ({"macs": 10, "f1": 0.9, "baseline_f1": 0.0}, "baseline_f1"),
        ({"macs": 10, "f1": 0.9, "baseline_f1": -0.5}, "baseline_f1"),
        ({"macs": 10, "f1": 0.9, "baseline_f1": 1.5}, "baseline_f1"),
    ],
)
def test_score_rejects_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        competition_score(**kwargs)


# --------------------------------------------------------------------------- MAC counters


class TinyNet(nn.Module):
    """conv (no bias) -> BN -> ReLU -> grouped strided conv (bias) -> max pool -> avg pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2, bias=True)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv1(x)))
        x = self.pool(self.conv2(x)) + 0.0  # a functional add: free for both counters
        return self.fc(torch.flatten(self.gap(x), 1))


# Input (3, 8, 8): conv1 -> (8, 8, 8); conv2 -> (4, 4, 4); pool -> (4, 2, 2); gap -> (4, 1, 1).
CONV1 = 9 * 3 * 8 * (8 * 8)  # kh*kw * Cin * Cout * Hout*Wout
CONV2 = 9 * 8 * (4 // 2) * (4 * 4)  # groups=2: kh*kw * Cin * Cout/groups * Hout*Wout
CONV2_BIAS = 4 * (4 * 4)
BN_NUMEL = 8 * 8 * 8
POOL_IN, GAP_IN = 4 * 4 * 4, 4 * 2 * 2


def test_count_macs_thop_closed_form():
    expected = (
        CONV1  # conv: output numel * Cin/groups * kh*kw, no bias term
        + 4 * BN_NUMEL  # affine BN: 2 * numel(input), doubled
        + 0  # ReLU
        + CONV2  # the bias is not counted
        + 0  # max pool
        + (GAP_IN + 4)  # adaptive avg pool: one add per input, one divide per output
        + 4 * 10  # linear: in_features * numel(output), no bias term
    )
    assert count_macs(TinyNet(), (3, 8, 8)) == expected == 18_236


def test_count_macs_competition_closed_form():
    expected = (
        CONV1  # no bias
        + 2 * BN_NUMEL  # affine BN: numel(input) x2
        + 0  # ReLU ignored
        + CONV2
        + CONV2_BIAS  # Cout * Hout*Wout for the bias
        + POOL_IN  # max pool: numel(input)
        + GAP_IN  # adaptive avg pool: numel(input)
        + (4 * 10 + 10)  # linear: in*out + out
    )
    assert count_macs_competition(TinyNet(), (3, 8, 8)) == expected == 17_346


@pytest.mark.parametrize(
    "layer, size, thop_macs, ptflops_macs",
    [
        (nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8), 13_824, 13_824 + 8 * 64),
        (nn.Conv2d(4, 4, 3, groups=4, bias=False), (4, 6, 6), 4 * 16 * 9, 9 * 4 * 1 * 16),
        (nn.BatchNorm2d(8, affine=False), (8, 4, 4), 2 * 128, 128),
        (nn.Linear(6, 5, bias=False), (6,), 30, 30),
        (nn.AvgPool2d(2), (2, 4, 4), 32 + 8, 32),
        (nn.ReLU6(), (2, 4, 4), 0, 0),
    ],
    ids=["conv-bias", "depthwise", "bn-no-affine", "linear-no-bias", "avgpool", "relu6"],
)
def test_count_macs_single_layers(layer, size, thop_macs, ptflops_macs):
    assert count_macs(layer, size) == thop_macs
    assert count_macs_competition(layer, size) == ptflops_macs


class SubConv(nn.Conv2d):
    """A subclass: ptflops alone matches exact types only."""


def test_conv_subclass_counts_for_both_counters():
    # ptflops by itself counts a subclass as 0 (issue 16); the competition profile gives it
    # nn.Conv2d's rule, as thop does through the class hierarchy
    layer = SubConv(2, 2, 1, bias=False)
    assert count_macs_competition(layer, (2, 4, 4)) == 2 * 2 * 16
    assert count_macs(layer, (2, 4, 4)) == 2 * 2 * 16


def test_counters_leave_the_model_untouched():
    model = TinyNet().train()
    model.bn.eval()  # a mixed-mode model must come back mixed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (3, 8, 8))
    count_macs_competition(model, (3, 8, 8))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and not model.bn.training and model.conv1.training
    for module in model.modules():
        assert not hasattr(module, "total_ops") and not hasattr(module, "__flops__")
        assert not module._forward_hooks


def test_count_macs_follows_model_dtype():
    model = TinyNet().double()
    assert count_macs(model, (3, 8, 8)) == 18_236


@pytest.mark.parametrize("size", [(), (3, 0, 8), (3, -1, 8)])
def test_count_macs_rejects_bad_input_size(size):
    with pytest.raises(ValueError, match="input_size"):
        count_macs(TinyNet(), size)


def test_count_params_counts_shared_tensors_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2, bias=False))
    assert count_params(model) == (16 + 4) + 8


# --------------------------------------------------------------------------- F1 and summaries

Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 0, 2]
# class 0: P 1/2, R 1/2 -> 1/2; class 1: P 2/3, R 1 -> 4/5; class 2: P 1, R 1/2 -> 2/3;
# class 3 never occurs -> 0, and it still counts in the mean
F1_BY_HAND = (1 / 2 + 4 / 5 + 2 / 3 + 0) / 4


def test_macro_f1_by_hand_counts_absent_classes_as_zero():
    assert macro_f1(Y_TRUE, Y_PRED, 4) == pytest.approx(F1_BY_HAND)
    assert macro_f1(torch.tensor(Y_TRUE), torch.tensor(Y_PRED), 3) == pytest.approx(
        (1 / 2 + 4 / 5 + 2 / 3) / 3
    )


def test_classification_summary_fields():
    summary = classification_summary(Y_TRUE, Y_PRED, 4, class_names=["a", "b", "c", "d"])
    assert summary["f1"] == pytest.approx(F1_BY_HAND)
    assert summary["accuracy"] == pytest.approx(4 / 6)
    assert summary["per_class_f1"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 2 / 3, "d": 0.0})
    assert summary["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert summary["num_samples"] == 6
    assert list(classification_summary(Y_TRUE, Y_PRED, 3)["per_class_f1"]) == ["0", "1", "2"]


@pytest.mark.parametrize(
    "y_true, y_pred, num_classes, names, match",
    [
        ([0, 1], [0], 2, None, "length"),
        ([0, 3], [0, 1], 3, None, "outside"),
        ([0, 1], [0, -1], 3, None, "outside"),
        ([], [], 3, None, "empty"),
        ([0, 1], [0, 1], 2, ["a"], "class names"),
        ([0, 1], [0, 1], 0, None, "num_classes"),
    ],
)
def test_classification_summary_rejects_bad_labels(y_true, y_pred, num_classes, names, match):
    with pytest.raises(ValueError, match=match):
        classification_summary(y_true, y_pred, num_classes, names)


# --------------------------------------------------------------------------- latency, evaluation


def test_measure_latency_positive_and_restores_modes():
    model = TinyNet().train()
    model.bn.eval()
    result = measure_latency(model, (3, 8, 8), batch_size=2, warmup=1, repeats=3)
    assert result["median_ms"] > 0 and result["p90_ms"] >= result["median_ms"] * 0.999
    assert result["repeats"] == 3 and result["batch_size"] == 2 and result["device"] == "cpu"
    assert model.training and model.conv1.training and not model.bn.training


def test_measure_latency_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(TinyNet(), (3, 8, 8), repeats=0)


def test_evaluate_model_on_a_known_classifier():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    model.train()
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    inputs = nn.functional.one_hot(labels, 3).float()
    predicted = labels.clone()
    predicted[-1] = 1  # one wrong: the input says 1, the target says 2
    inputs[-1] = nn.functional.one_hot(torch.tensor(1), 3).float()
    loader = [(inputs[:4], labels[:4]), (inputs[4:], labels[4:])]
    summary = evaluate_model(model, loader, class_names=["x", "y", "z"])
    assert summary == classification_summary(labels, predicted, 3, ["x", "y", "z"])
    assert summary["num_samples"] == 7 and model.training


def test_evaluate_model_rejects_an_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        evaluate_model(nn.Linear(3, 3), [])
