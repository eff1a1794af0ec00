"""The training side of the command line on tiny data: train, decompose with a budget and
calibration, finetune, evaluate."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import decomp
from decomp.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's 8x8 digits 0-3 as an ImageFolder with train/ and val/."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    x, y = load_digits(n_class=4, return_X_y=True)
    for split, idx in {"train": range(0, 200), "val": range(200, 260)}.items():
        for i in idx:
            folder = root / split / str(y[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (x[i].reshape(8, 8) * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


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
    assert not torch.equal(  # calibration moved the batch-norm statistics
        base.stem[1].running_mean, small.stem[1].running_mean
    )


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
    result = run("evaluate", tuned, "--data", digits, "--no-latency", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert 0.0 <= metrics["f1"] <= 1.0 and metrics["macs"] > 0 and metrics["macs_competition"] > 0


def test_target_below_the_floor_is_one_clear_line(trained, tmp_path):
    result = run("decompose", trained, "--target-macs", "10", "-o", tmp_path / "x.pt")
    assert result.exit_code == 1
    assert "below the floor" in result.output and not (tmp_path / "x.pt").exists()
