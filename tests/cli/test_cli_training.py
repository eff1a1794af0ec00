"""The training side of the command line on tiny data: train, decompose with a budget and
calibration, finetune, evaluate."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import decomp
from decomp.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "base.pt"
    result = run(
        "train",
        "--arch",
        "tests.conftest:tiny_net",
        "--arch-kwargs",
        '{"num_classes": 4}',
        "--data",
        digits,
        "--epochs",
        "2",
        "--input-size",
        "3,16,16",
        "--output",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["best_epoch"] >= 0
    return out


def test_decompose_with_budget_and_calibration(trained, digits, tmp_path):
    out = tmp_path / "small.pt"
    result = run(
        "decompose",
        trained,
        "--method",
        "auto",
        "--target-macs",
        "0.5",
        "--data",
        digits,
        "--calibrate-batches",
        "3",
        "--output",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    base, small = decomp.load(trained), decomp.load(out)
    before = decomp.count_macs(base, (3, 16, 16))
    after = decomp.count_macs(small, (3, 16, 16))
    assert 0.95 * 0.5 * before <= after <= 0.5 * before
    assert torch.load(out, weights_only=True)["extra"]["bn_calibrated"] is True
    layers = decomp.applied_plans(small)[-1]["layers"]
    assert all(lp["importance"] is None for lp in layers)  # spectra only unless asked
    assert not torch.equal(  # calibration moved the batch-norm statistics
        base.stem[1].running_mean, small.stem[1].running_mean
    )


def test_decompose_with_measured_layer_weights(trained, digits, tmp_path):
    out = tmp_path / "weighed.pt"
    args = ["decompose", trained, "--method", "auto", "--target-macs", "0.5", "--weigh-layers"]
    result = run(*args, "--output", out)
    assert result.exit_code == 1 and not out.exists()
    assert "--weigh-layers needs --target-macs and --data" in result.output
    result = run(*args, "--data", digits, "--output", out, "--json")
    assert result.exit_code == 0, result.output
    layers = decomp.applied_plans(decomp.load(out))[-1]["layers"]
    assert any(lp["importance"] is not None for lp in layers)


def test_finetune_and_evaluate(trained, digits, tmp_path):
    small = tmp_path / "small.pt"
    assert run("decompose", trained, "--rank", "ratio:0.5", "-o", small).exit_code == 0
    tuned = tmp_path / "tuned.pt"
    result = run(
        "finetune",
        small,
        "--data",
        digits,
        "--teacher",
        trained,
        "--epochs",
        "1",
        "--output",
        tuned,
        "--json",
    )
    assert result.exit_code == 0, result.output
    extra = torch.load(tuned, weights_only=True)["extra"]
    assert extra["bn_calibrated"] is True and extra["calibration_batches"] == 30
    result = run("evaluate", tuned, "--data", digits, "--no-latency", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert 0.0 <= metrics["f1"] <= 1.0 and metrics["macs"] > 0 and metrics["macs_competition"] > 0


def test_target_below_the_floor_is_one_clear_line(trained, tmp_path):
    result = run("decompose", trained, "--target-macs", "10", "-o", tmp_path / "x.pt")
    assert result.exit_code == 1
    assert "below the floor" in result.output and not (tmp_path / "x.pt").exists()
