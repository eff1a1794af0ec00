"""Tests of decomp.train: no re-init, learning, KD, resume, atomic files, DDP."""

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
from torch import nn
from torch.utils.data import DataLoader, Dataset

from decomp import devices
from decomp.train import TrainConfig, load_checkpoint, save_checkpoint_atomic, train
from tests.tiny_task import (
    TinyNet,
    evaluate,
    fit,
    loaders,
    make_data,
    net,
    snapshot,
    states_equal,
)

REPO = Path(__file__).resolve().parents[1]


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

    def half_write(obj: object, tmp: Path) -> None:
        Path(tmp).write_bytes(b"half a checkpoint")
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
    monkeypatch.setattr(devices, "_notices_given", set())
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
