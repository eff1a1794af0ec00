"""Tests of decomp.batchnorm: calibration touches only batch-norm statistics, exactly."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from decomp.batchnorm import (
    MIN_CALIBRATION_IMAGES,
    Calibration,
    calibrate,
    has_batchnorm,
    recalibrate,
)
from tests.tiny_task import TinyNet, evaluate, fit, loaders, make_data, net, snapshot, states_equal


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> TinyNet:
    model = net(seed=7)
    fit(model, epochs=6)
    return model


class Tagged(nn.Module):
    """A non-BN module with a buffer that calibration must not touch."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def calib_loader(shuffle: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    return DataLoader(make_data(256, seed=2), batch_size=32, shuffle=shuffle, generator=gen)


def test_calibrate_touches_only_batchnorm_buffers(trained: TinyNet) -> None:
    model = nn.Sequential(Tagged(), copy.deepcopy(trained), nn.Dropout(0.5))
    model.eval()
    model[2].train()  # mixed flags must come back as they were
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[0].momentum = 0.3
    params = {k: v.clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flags = [m.training for m in model.modules()]
    calibrate(model, calib_loader(), batches=4)
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    changed = {k for k, v in model.named_buffers() if not torch.equal(v, buffers[k])}
    bn_names = {k for k, _ in model.named_buffers() if ".bn" in k}
    assert changed == bn_names and "0.scale" in buffers
    assert [m.training for m in model.modules()] == flags
    assert [bn.momentum for bn in bns] == [0.3, 0.1]
    assert int(bns[0].num_batches_tracked) == 4


def test_calibrate_handles_every_batchnorm_kind() -> None:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 12), nn.BatchNorm1d(12), nn.SyncBatchNorm(12), nn.Linear(12, 4)
    )
    model.eval()
    calibrate(model, calib_loader(), batches=2)
    assert int(model[2].num_batches_tracked) == 2 and int(model[3].num_batches_tracked) == 2
    assert not model.training and model[3].momentum == 0.1


def test_calibrate_is_deterministic_and_averages_exactly(trained: TinyNet) -> None:
    a, b = copy.deepcopy(trained), copy.deepcopy(trained)
    calibrate(a, calib_loader(shuffle=True), batches=5)
    calibrate(b, calib_loader(shuffle=True), batches=5)
    assert states_equal(snapshot(a), snapshot(b))
    # with equal batches, momentum=None gives the plain mean of the BN inputs over the data
    model = copy.deepcopy(trained)
    calibrate(model, calib_loader(), batches=1000)
    model.eval()
    with torch.no_grad():
        pre_bn = torch.cat([model.conv1(x) for x, _ in calib_loader()])
    assert torch.allclose(model.bn1.running_mean, pre_bn.mean(dim=(0, 2, 3)), atol=1e-5)


def test_calibrate_recovers_a_decomposition_like_perturbation(trained: TinyNet) -> None:
    val = loaders()[1]
    original = evaluate(trained, val)["accuracy"]
    model = copy.deepcopy(trained)
    with torch.no_grad():  # a truncated factorization loses output energy: the stats go stale
        model.conv1.weight.mul_(0.3)
        model.conv2.weight.mul_(0.3)
    broken = evaluate(model, val)["accuracy"]
    calibrate(model, calib_loader(), batches=8)
    fixed = evaluate(model, val)["accuracy"]
    assert broken < original - 0.3, (broken, original)
    # a rescaled conv followed by re-estimated BN computes (almost) the original function
    assert fixed >= original - 0.03, (fixed, broken, original)


def test_calibrate_without_batchnorm_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 4))
    before = snapshot(model)
    with caplog.at_level(logging.INFO, logger="decomp.batchnorm"):
        assert calibrate(model, calib_loader()) is model
    assert states_equal(snapshot(model), before)
    assert "no batch-norm layers; nothing to calibrate" in caplog.text


def test_calibrate_empty_loader_restores_statistics(trained: TinyNet) -> None:
    model = copy.deepcopy(trained)
    before = snapshot(model)
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [], batches=3)
    assert states_equal(snapshot(model), before)
    assert model.bn1.momentum == 0.1


def test_has_batchnorm(trained: TinyNet) -> None:
    assert has_batchnorm(trained)
    untracked = nn.BatchNorm2d(2, track_running_stats=False)
    assert not has_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), untracked))


# ------------------------------------------------------------------- what calibrate accepts


def _calibrated(trained: TinyNet, data, **kwargs) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(trained)
    calibrate(model, data, **kwargs)
    return snapshot(model)


def test_calibrate_accepts_what_a_user_has_at_hand(trained: TinyNet) -> None:
    """A DataLoader, a list or generator of image batches or of (images, labels), one tensor:
    the same batches give the same statistics, whatever carries them."""
    images = make_data(96, seed=2).tensors[0]  # (96, 1, 8, 8)
    labels = torch.zeros(96, dtype=torch.long)
    reference = _calibrated(trained, DataLoader(make_data(96, seed=2), batch_size=32))
    pairs = [(x, y) for x, y in zip(images.split(32), labels.split(32), strict=True)]
    for data in (
        list(images.split(32)),
        pairs,
        [list(pair) for pair in pairs],
        (x for x in images.split(32)),
        images,
    ):
        assert states_equal(_calibrated(trained, data, batch_size=32), reference)


def test_calibrate_splits_one_tensor_into_batches_of_the_given_size(trained: TinyNet) -> None:
    images = make_data(96, seed=2).tensors[0]
    by_40 = _calibrated(trained, images, batch_size=40)  # 40 + 40 + 16 images
    assert int(by_40["bn1.num_batches_tracked"]) == 3
    assert states_equal(by_40, _calibrated(trained, list(images.split(40))))
    first_two = _calibrated(trained, images, batches=2, batch_size=40)
    assert states_equal(first_two, _calibrated(trained, images[:80], batch_size=40))
    # the default split: 128 images a batch
    assert int(_calibrated(trained, make_data(300, 3).tensors[0])["bn1.num_batches_tracked"]) == 3


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (torch.randn(1, 8, 8), "a 3-D float32 tensor of shape (1, 8, 8)"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "a 4-D uint8 tensor of shape (4, 1, 8, 8)"),
        ({"images": torch.randn(4, 1, 8, 8)}, "a dict"),
        ("train/", "a str"),
        (7, "an int"),
        (make_data(8, seed=0), "a TensorDataset (wrap it in a DataLoader)"),
        ([torch.randn(1, 8, 8)] * 2, "batch 0: a 3-D float32 tensor of shape (1, 8, 8)"),
        ([{"image": torch.randn(4, 1, 8, 8)}], "batch 0: a dict"),
        ([(torch.randn(4, 1, 8, 8), 0), ("x", 1)], "batch 1: a str"),
    ],
)
def test_calibrate_refuses_anything_else_naming_it(trained: TinyNet, data, named: str) -> None:
    model = copy.deepcopy(trained)
    before = snapshot(model)
    with pytest.raises(TypeError) as info:
        calibrate(model, data)
    message = str(info.value)
    assert message.endswith(f"got {named}"), message
    assert "DataLoader" in message and "(N, C, H, W)" in message
    assert states_equal(snapshot(model), before), "statistics are put back"
    assert model.bn1.momentum == 0.1


def test_calibrate_refuses_a_data_bundle_with_a_hint(trained: TinyNet) -> None:
    class DataBundle:  # what decomp.data.load_data returns, stripped down
        train_loader = calib_loader()

    with pytest.raises(TypeError, match=r"got a DataBundle \(pass its train_loader\)$"):
        calibrate(copy.deepcopy(trained), DataBundle())


def test_recalibrate_says_what_it_used_and_warns_on_few_images(
    trained: TinyNet, caplog: pytest.LogCaptureFixture
) -> None:
    model = copy.deepcopy(trained)
    images = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING, logger="decomp"):
        done = recalibrate(model, images, batches=30, batch_size=16)
    assert done == Calibration(layers=2, batches=3, images=40)
    assert "only 40 images are unsound" in caplog.text
    caplog.clear()
    many = torch.randn(MIN_CALIBRATION_IMAGES, 1, 8, 8)
    with caplog.at_level(logging.WARNING, logger="decomp"):
        assert recalibrate(model, many, batches=30).images == MIN_CALIBRATION_IMAGES
    assert "unsound" not in caplog.text
