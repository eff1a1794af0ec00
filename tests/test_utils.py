"""decomp._utils: atomic writes, a model's device, training flags, input sizes, records."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from decomp._utils import (
    atomic_write,
    atomic_write_text,
    batch_images,
    check_input_size,
    environment,
    model_device,
    model_dtype,
    parse_input_size,
    plain,
    training_flags,
)


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_atomic_write_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    assert atomic_write_text(target, "new") == target
    assert target.read_text() == "new" and _files(tmp_path) == {"a.txt"}


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def half(tmp: Path) -> None:
        tmp.write_text("half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half)
    assert target.read_text() == "old" and _files(tmp_path) == {"a.txt"}


def test_interrupted_write_leaves_no_temp(tmp_path: Path) -> None:
    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.pt", interrupted)
    assert _files(tmp_path) == set()


def test_atomic_write_respects_the_umask_and_makes_parents_on_request(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a" / "b.json", "{}", parents=True)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "c.json", "{}")


def test_model_device_and_dtype() -> None:
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_dtype(nn.ReLU()) == torch.float32
    net = nn.Sequential(nn.Embedding(3, 2), nn.Linear(2, 2)).double()
    assert model_dtype(net) == torch.float64 and model_device(net).type == "cpu"


def test_training_flags_come_back_exactly() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2)).train()
    net[1].eval()
    teacher = nn.Linear(2, 2).eval()
    before = [m.training for m in [*net.modules(), teacher]]
    with training_flags(net, teacher, train=False):
        assert not any(m.training for m in net.modules())
        teacher.train()
    assert [m.training for m in [*net.modules(), teacher]] == before
    with pytest.raises(RuntimeError), training_flags(net):
        net.eval()
        raise RuntimeError("boom")
    assert [m.training for m in [*net.modules(), teacher]] == before


def test_batch_images() -> None:
    x = torch.zeros(2, 3)
    assert batch_images(x) is x
    assert batch_images((x, torch.zeros(2))) is x and batch_images([x]) is x


@pytest.mark.parametrize("text", ["3,64", "3,a,64", "0,32,32", "3,32,32,1"])
def test_parse_input_size_rejects_with_one_message(text: str) -> None:
    with pytest.raises(ValueError, match=rf"bad --input-size '{text}': expected C,H,W"):
        parse_input_size(text)


def test_parse_input_size_forms() -> None:
    assert parse_input_size("3,32,32") == parse_input_size(" 3x32x32 ") == (3, 32, 32)
    assert parse_input_size(None) is None


def test_check_input_size() -> None:
    assert check_input_size([3, 32, 32]) == (3, 32, 32)
    assert check_input_size((np.int64(1), 8, 8), channels=(1, 3)) == (1, 8, 8)
    assert check_input_size((30,), dims=None) == (30,)
    for bad in [(3, 32), (3, 0, 8), (3, 32.5, 32), (True, 8, 8), None, ()]:
        with pytest.raises(ValueError, match=r"bad input_size .*: expected C,H,W"):
            check_input_size(bad)
    with pytest.raises(ValueError, match="with C 1 or 3"):
        check_input_size((4, 32, 32), channels=(1, 3))
    with pytest.raises(ValueError, match="expected positive integers"):
        check_input_size((3, -1), dims=None)


def test_environment_records_versions_and_machine() -> None:
    env = environment()
    assert {"torch", "torchvision", "decomp", "python", "numpy", "thop", "ptflops", "tensorly",
            "scikit-learn"} <= set(env["versions"])  # fmt: skip
    assert env["versions"]["torch"] and env["versions"]["numpy"]
    assert {"platform", "cpu", "cpu_count", "torch_threads", "cuda", "load_average",
            "timestamp"} <= set(env["machine"])  # fmt: skip
    assert env["machine"]["timestamp"].endswith("+00:00")
    json.dumps(env, allow_nan=False)


def test_plain_is_strict_json() -> None:
    value = {
        1: (np.float32(0.5), torch.tensor(2), float("nan")),
        "p": Path("a/b"),
        "arr": np.arange(3),
        "inf": math.inf,
    }
    assert plain(value) == {"1": [0.5, 2, None], "p": "a/b", "arr": [0, 1, 2], "inf": None}
    assert json.loads(json.dumps(plain(value), allow_nan=False)) == plain(value)
    assert plain(True) is True
