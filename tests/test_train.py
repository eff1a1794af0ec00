"""Tests of decomp.train: no re-init, learning, KD, resume, atomic files, DDP, calibrate."""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from decomp import train as train_mod
from decomp.train import (
    TrainConfig,
    calibrate,
    distillation_loss,
    load_checkpoint,
    lr_factor,
    save_checkpoint_atomic,
    train,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = 4


# --------------------------------------------------------------------------------------------------
# tiny task and network
# --------------------------------------------------------------------------------------------------


def make_data(n: int, seed: int) -> TensorDataset:
    """1x8x8 noise images; the label is the quadrant that holds a brighter 4x4 patch."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=gen)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    for i, label in enumerate(labels.tolist()):
        row, col = 4 * (label // 2), 4 * (label % 2)
        images[i, 0, row : row + 4, col : col + 4] += 0.8
    return TensorDataset(images, labels)


class TinyNet(nn.Module):
    """conv-BN-ReLU x2, 2x2 average pool, optional dropout, linear."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(self.pool(x).flatten(1)))


def loaders(seed: int = 0, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    train_loader = DataLoader(
        make_data(256, seed=0),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return train_loader, DataLoader(make_data(128, seed=1), batch_size=64)


def net(seed: int = 0, dropout: float = 0.0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(dropout)


def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Reference evaluation, independent of decomp.train: macro F1 (sklearn) and accuracy."""
    model.eval()
    with torch.no_grad():
        pairs = [(model(x).argmax(1), y) for x, y in loader]
    preds = torch.cat([p for p, _ in pairs])
    labels = torch.cat([y for _, y in pairs])
    f1 = f1_score(labels, preds, average="macro", labels=list(range(CLASSES)), zero_division=0)
    return {"f1": float(f1), "accuracy": float((preds == labels).float().mean())}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(model: nn.Module, epochs: int = 4, **kwargs) -> train_mod.TrainResult:
    train_loader, val_loader = loaders()
    config = TrainConfig(epochs=epochs, lr=0.05, schedule="onecycle", **kwargs)
    return train(model, train_loader, val_loader, config, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids OpenMP spin contention (100x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> TinyNet:
    model = net(seed=7)
    fit(model, epochs=6)
    return model


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


def test_epochs_zero_keeps_weights_and_evaluation(trained: TinyNet) -> None:
    model = copy.deepcopy(trained)
    before_state, before = snapshot(model), evaluate(model, loaders()[1])
    result = fit(model, epochs=0)
    assert states_equal(snapshot(model), before_state)
    assert evaluate(model, loaders()[1]) == before
    assert result.best_epoch == 0 and result.history[0]["epoch"] == 0
    assert result.history[0]["val_f1"] == pytest.approx(before["f1"], abs=1e-12)


def test_first_training_forward_uses_given_weights(trained: TinyNet) -> None:
    model, reference = copy.deepcopy(trained), copy.deepcopy(trained).train()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        if module.training and not seen:
            seen.append((inputs[0].detach().clone(), output.detach().clone()))

    model.register_forward_hook(hook)
    fit(model, epochs=1)
    with torch.no_grad():
        expected = reference(seen[0][0])
    assert torch.equal(seen[0][1], expected)


def test_training_learns_and_keeps_the_best_epoch() -> None:
    model = net(seed=3)
    chance = evaluate(model, loaders()[1])["accuracy"]
    model.train()
    model.drop.eval()
    result = fit(model, epochs=5)
    assert model.training and not model.drop.training  # the caller's flags are restored
    losses = [row["train_loss"] for row in result.history[1:]]
    assert losses[-1] < 0.7 * losses[0], losses
    after = evaluate(model, loaders()[1])
    assert after["accuracy"] > max(0.7, chance + 0.3)
    assert result.best_f1 == max(row["val_f1"] for row in result.history)
    assert after["f1"] == pytest.approx(result.best_f1, abs=1e-12)  # the model holds the best
    assert result.finished


def test_adamw_cosine_and_grad_clip_train() -> None:
    model = net(seed=4)
    train_loader, val_loader = loaders()
    config = TrainConfig(
        epochs=3, lr=3e-3, optimizer="adamw", schedule="cosine", grad_clip=1.0, weight_decay=0.01
    )
    result = train(model, train_loader, val_loader, config, progress=False)
    assert result.best_epoch > 0 and result.best_f1 > result.history[0]["val_f1"]


def test_knowledge_distillation_brings_student_to_teacher(trained: TinyNet) -> None:
    teacher, student = copy.deepcopy(trained), net(seed=11)
    teacher_state = snapshot(teacher)

    def kl_to_teacher() -> float:
        teacher.eval(), student.eval()
        with torch.no_grad():
            pairs = [(student(x), teacher(x)) for x, _ in loaders()[1]]
        s, t = torch.cat([p for p, _ in pairs]), torch.cat([q for _, q in pairs])
        kl = F.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean")
        return float(kl)

    before = kl_to_teacher()
    teacher.train()  # train() must put it in eval mode for the run, then restore this
    train_loader, val_loader = loaders()
    config = TrainConfig(epochs=4, lr=0.05, kd_alpha=1.0, kd_temperature=2.0, schedule="onecycle")
    train(student, train_loader, val_loader, config, teacher=teacher, progress=False)
    assert teacher.training  # mode restored
    assert states_equal(snapshot(teacher), teacher_state)  # never updated, BN stats included
    assert kl_to_teacher() < 0.5 * before


def test_distillation_loss_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    ce = F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, y), ce)
    assert torch.allclose(distillation_loss(s, y, t, alpha=0.0), ce)
    temp = 3.0
    p_t = (t / temp).softmax(1)
    kl = (p_t * (p_t.log() - (s / temp).log_softmax(1))).sum(1).mean()
    assert torch.allclose(distillation_loss(s, y, t, alpha=1.0, temperature=temp), temp**2 * kl)
    mixed = distillation_loss(s, y, t, alpha=0.25, temperature=temp)
    assert torch.allclose(mixed, 0.75 * ce + 0.25 * temp**2 * kl)
    assert distillation_loss(s, y, s.clone(), alpha=1.0).abs() < 1e-6


class Fuse(Dataset):
    """Wraps a data set and raises after ``fuse`` item reads: a job killed mid-epoch."""

    def __init__(self, data: Dataset, fuse: int) -> None:
        self.data, self.fuse, self.reads = data, fuse, 0

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        self.reads += 1
        if self.reads > self.fuse:
            raise RuntimeError("killed")
        return self.data[index]


def resume_config(path: Path, **kwargs) -> TrainConfig:
    return TrainConfig(
        epochs=3, lr=0.05, schedule="onecycle", checkpoint_path=path, seed=5, **kwargs
    )


@pytest.mark.parametrize("interruption", ["exception", "max_epochs_this_run"])
def test_resume_matches_an_uninterrupted_run(tmp_path: Path, interruption: str) -> None:
    train_loader, val_loader = loaders(seed=1)
    whole = net(seed=2, dropout=0.3)
    full = train(whole, train_loader, val_loader, resume_config(tmp_path / "a.pt"), progress=False)

    first = net(seed=2, dropout=0.3)
    if interruption == "exception":  # dies in the middle of epoch 2
        data = Fuse(make_data(256, seed=0), fuse=256 + 100)
        gen = torch.Generator().manual_seed(1)  # the same loader settings as the first run
        killer = DataLoader(data, batch_size=32, shuffle=True, generator=gen)
        with pytest.raises(RuntimeError, match="killed"):
            train(first, killer, val_loader, resume_config(tmp_path / "b.pt"), progress=False)
    else:
        config = resume_config(tmp_path / "b.pt", max_epochs_this_run=1)
        partial = train(first, *loaders(seed=1), config, progress=False)
        assert not partial.finished and len(partial.history) == 2
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 1

    again = net(seed=99, dropout=0.3)  # a fresh process: other weights, fresh loaders
    config = resume_config(tmp_path / "b.pt", resume=True)
    resumed = train(again, *loaders(seed=1), config, progress=False)
    assert resumed.finished
    assert states_equal(snapshot(again), snapshot(whole))
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in full.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip
    final_a, final_b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    assert states_equal(final_a["model"], final_b["model"])  # last epoch too, not only the best
    assert final_a["optimizer"]["state"].keys() == final_b["optimizer"]["state"].keys()


def test_without_validation_the_last_epoch_is_kept() -> None:
    model = net(seed=6)
    train_loader, _ = loaders()
    result = train(model, train_loader, None, TrainConfig(epochs=2, lr=0.05), progress=False)
    assert result.best_epoch == 2 and result.best_f1 != result.best_f1  # NaN
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[-1]["val_f1"] is None


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    model = net(seed=1)
    result = fit(model, epochs=1, checkpoint_path=tmp_path / "none.pt", resume=True)
    assert result.history[0]["epoch"] == 0 and (tmp_path / "none.pt").exists()


def test_checkpoint_and_log_files(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    model = net(seed=1)
    fit(model, epochs=2, checkpoint_path=folder / "ckpt.pt", log_path=folder / "log.jsonl")
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt.pt", "log.jsonl"]  # no temp files
    ckpt = torch.load(folder / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["epochs"] == 2
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "best", "history", "best_f1"):
        assert key in ckpt
    assert states_equal(ckpt["best"], snapshot(model))
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert set(rows[1]) == {"epoch", "train_loss", "val_f1", "val_accuracy", "lr", "seconds"}


def test_atomic_save_keeps_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint_atomic({"format": "x", "value": torch.ones(3)}, path)
    original = path.read_bytes()

    def half_write(obj: object, handle) -> None:
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_atomic({"value": torch.zeros(3)}, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_cpu_notice_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(train_mod, "_cpu_notice_given", False)
    with caplog.at_level(logging.INFO, logger="decomp.train"):
        fit(net(), epochs=0)
        fit(net(), epochs=0)
    assert caplog.text.count("no GPU found; training on the CPU") == 1


def test_config_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; expected one of \['adamw'"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="kd_alpha"):
        TrainConfig(kd_alpha=1.5)
    with pytest.raises(ValueError, match="checkpoint_path"):
        TrainConfig(resume=True)


def test_lr_schedules() -> None:
    cosine = [lr_factor("cosine", i, 100, warmup_steps=10) for i in range(100)]
    assert cosine[0] < cosine[5] < cosine[10] == 1.0 > cosine[50] > cosine[99] >= 0
    onecycle = [lr_factor("onecycle", i, 100) for i in range(100)]
    assert onecycle[0] == pytest.approx(1 / 25) and max(onecycle) == pytest.approx(1.0)
    assert onecycle[99] < 1e-3
    assert lr_factor("constant", 37, 100) == 1.0


# --------------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    command += ["--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port())]
    command += [str(REPO / "tests" / "_ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert not states_equal(reports[0]["initial"], reports[1]["initial"])
    assert states_equal(reports[0]["final"], reports[1]["final"])  # every tensor, BN stats too
    assert reports[0]["best_epoch"] == reports[1]["best_epoch"] > 0
    assert not states_equal(reports[0]["final"], reports[0]["initial"])
    losses = [row["train_loss"] for row in reports[0]["history"][1:]]
    assert losses[-1] < losses[0], losses
    rows = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0, 1, 2, 3]
    assert load_checkpoint(tmp_path / "ckpt.pt")["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt.pt",
        "log.jsonl",
        "rank0.pt",
        "rank1.pt",
    ]


# --------------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------------


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
    with caplog.at_level(logging.INFO, logger="decomp.train"):
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
