"""decomp.recipes.compress_in_stages on tiny data: the geometric schedule, merged stages, and a
killed run (after a stage, or inside a stage's fine-tuning) resumed to exactly the weights of an
uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import decomp.train
from decomp.checkpoint import load
from decomp.data import load_data
from decomp.factorize import Factorized
from decomp.plan import applied_plans
from decomp.recipes import compress_in_stages, state_path
from decomp.recipes.staged import stage_budgets, stage_paths
from tests.conftest import DIGIT_CLASSES, tiny_net

SIZE = (1, 16, 16)
KWARGS = {"in_channels": 1, "width": 32, "num_classes": DIGIT_CLASSES}
ARCH = {"factory": "tests.conftest:tiny_net", "kwargs": KWARGS}
TARGET = 0.3


@pytest.fixture(scope="module")
def bundle(digits: Path) -> Any:
    return load_data(str(digits), SIZE, batch_size=32, workers=0)


def run(bundle: Any, output: Path, **options: Any) -> Any:
    """Two stages of two epochs down to 0.3 of the MACs, on one thread (the same float sums
    in every run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = {"stages": 2, "epochs_per_stage": 2, "calibrate_batches": 4, **options}
        target = settings.pop("target_macs", TARGET)
        model = tiny_net(**KWARGS)
        return compress_in_stages(
            model, bundle, target, output=output, arch=ARCH, input_size=SIZE, **settings
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole(bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return run(bundle, tmp_path_factory.mktemp("whole") / "small.pt")


def _state(path: str | Path) -> dict[str, torch.Tensor]:
    return load(path).state_dict()


def _same_weights(a: str | Path, b: str | Path) -> bool:
    x, y = _state(a), _state(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _ranks(path: str | Path) -> dict[str, tuple[int, ...]]:
    return {n: m.ranks for n, m in load(path).named_modules() if isinstance(m, Factorized)}


def _numbers(record: Any) -> dict[str, Any]:
    """A stage record without its timings, load and path."""
    return {k: v for k, v in record.to_dict().items() if k not in ("seconds", "load", "path")}


def test_schedule_and_files() -> None:
    assert stage_budgets(0.1, 2) == pytest.approx([math.sqrt(0.1), 0.1])
    assert stage_budgets(0.25, 1) == [0.25]
    paths = stage_paths("out/small.pt", 3)
    assert [p.name for p in paths] == ["small.stage1.pt", "small.stage2.pt", "small.pt"]
    assert state_path("out/small.pt").name == "small.pt.stages.json"
    for target, stages in ((0.0, 2), (1.5, 2), (0.5, 0)):
        with pytest.raises(ValueError):
            stage_budgets(target, stages)


def test_stages_spend_falling_budgets_and_merge(whole: Any) -> None:
    assert whole.finished and not whole.resumed and len(whole.stages) == 2
    assert whole.budgets == pytest.approx([math.sqrt(TARGET), TARGET])
    first, second = whole.stages
    for record in whole.stages:
        assert record.macs <= record.target_macs and record.epochs == 2
        assert 0 <= record.val_f1_calibrated <= 1 and record.test_f1 is not None
        assert record.val_f1 >= record.val_f1_calibrated  # the best epoch, epoch 0 included
        assert set(record.seconds) == {"plan", "calibrate", "finetune", "total"}
    assert second.macs < first.macs <= whole.original["macs"]
    assert second.target_macs == int(TARGET * whole.original["macs"])
    output = Path(whole.output)
    folder = output.parent
    assert first.path == str(folder / "small.stage1.pt") and second.path == str(output)
    assert sorted(p.name for p in folder.iterdir()) == [
        "small.pt",
        "small.pt.log.jsonl",
        "small.pt.stages.json",
        "small.stage1.pt",
        "small.stage1.pt.log.jsonl",
    ]  # the start files and training checkpoints are gone
    before, after = _ranks(first.path), _ranks(output)
    assert set(before) <= set(after)
    assert all(all(map(int.__le__, after[n], r)) for n, r in before.items())
    assert any(after[n] != r for n, r in before.items())  # re-factorized at lower ranks
    final = load(output)
    assert len(applied_plans(final)) == 2
    assert not any(
        isinstance(c, Factorized) for m in final.modules() if isinstance(m, Factorized)
        for c in m.modules() if c is not m
    )  # fmt: skip
    state = json.loads(Path(whole.state).read_text())
    assert state["status"] == "done" and state["current"] is None
    assert [s["stage"] for s in state["stages"]] == [1, 2]


def test_resume_after_a_stage_ends_with_the_same_weights(
    whole: Any, bundle: Any, tmp_path: Path
) -> None:
    output = tmp_path / "small.pt"
    part = run(bundle, output, max_stages_this_run=1)
    assert not part.finished and part.output is None and len(part.stages) == 1
    assert not output.exists() and (tmp_path / "small.stage1.pt").exists()
    rest = run(bundle, output, resume=True)
    assert rest.resumed and rest.finished and rest.output == str(output)
    assert _same_weights(output, whole.output)
    assert [_numbers(r) for r in rest.stages] == [_numbers(r) for r in whole.stages]


class Killed(Exception):
    """Stands for the process being killed."""


def test_resume_inside_fine_tuning_ends_with_the_same_weights(
    whole: Any, bundle: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = decomp.train.save_checkpoint_atomic
    calls = []

    def save_then_die(payload: dict, path: Any) -> None:
        save(payload, path)
        calls.append(path)
        if len(calls) == 3:  # stage 2, after its first epoch's checkpoint
            raise Killed

    monkeypatch.setattr(decomp.train, "save_checkpoint_atomic", save_then_die)
    output = tmp_path / "small.pt"
    with pytest.raises(Killed):
        run(bundle, output)
    monkeypatch.setattr(decomp.train, "save_checkpoint_atomic", save)
    state = json.loads(state_path(output).read_text())
    assert len(state["stages"]) == 1 and state["current"]["stage"] == 2
    assert (tmp_path / "small.stage2.start.pt").exists() and Path(f"{output}.ckpt").exists()
    rest = run(bundle, output, resume=True)
    assert rest.finished and _same_weights(output, whole.output)
    assert [_numbers(r) for r in rest.stages] == [_numbers(r) for r in whole.stages]


def test_refusals(whole: Any, bundle: Any, tmp_path: Path) -> None:
    output = Path(whole.output)
    with pytest.raises(ValueError, match="holds a staged run already"):
        run(bundle, output)
    with pytest.raises(ValueError, match=r"other settings \(stages 2 -> 3"):
        run(bundle, output, resume=True, stages=3)
    with pytest.raises(ValueError, match="nothing to resume: no state at"):
        run(bundle, tmp_path / "new.pt", resume=True)
    with pytest.raises(ValueError, match="unknown fit 'kernels'"):
        run(bundle, tmp_path / "new.pt", fit="kernels")
    with pytest.raises(ValueError, match="exceed the model's"):
        run(bundle, tmp_path / "new.pt", target_macs=10**12)
    with pytest.raises(ValueError, match="architecture reference"):
        compress_in_stages(tiny_net(**KWARGS), bundle, 0.5, output=tmp_path / "x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_data_is_read_as_the_model_file_records(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spec is read with the preprocessing the model was made with, as finetune reads it."""
    import decomp
    import decomp.recipes.staged as staged
    from decomp.data import Preprocessing

    recorded = Preprocessing(mean=(0.5,), std=(0.25,))
    path = decomp.save(
        tiny_net(**KWARGS),
        tmp_path / "m.pt",
        arch=ARCH,
        extra={"preprocessing": recorded.to_dict()},
    )
    seen: list[Any] = []

    def stop(*args: Any) -> None:
        seen.append(args[-1])
        raise RuntimeError("enough")

    monkeypatch.setattr(staged, "load_bundle", stop)
    for given in (None, Preprocessing(mean=(0.1,), std=(0.2,))):
        with pytest.raises(RuntimeError, match="enough"):
            compress_in_stages(
                path, str(digits), 0.5, output=tmp_path / "s.pt", input_size=SIZE,
                preprocessing=given,
            )  # fmt: skip
    assert seen == [recorded, Preprocessing(mean=(0.1,), std=(0.2,))]
