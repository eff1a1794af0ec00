"""decomp.demo end to end on tiny data: results.json, the plot, the cached baseline, the tables."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from rich.console import Console

from decomp.checkpoint import load, model_meta
from decomp.cli.render import demo_table, evaluation_table
from decomp.data import load_data, make_loader
from decomp.data.fashion_mnist import TensorImageDataset
from decomp.demo import DEFAULT_RECIPE, RECIPES, TARGET_MACS_RATIO, TARGETS, demo_config, run_demo
from decomp.evaluate import val_f1
from decomp.recipes import baseline_config
from decomp.recipes.training import without_augmentation

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (1, 16, 16)
ENTRY_KEYS = {
    "f1",
    "accuracy",
    "per_class_f1",
    "confusion_matrix",
    "macs",
    "macs_competition",
    "params",
    "competition_score",
    "latency",
}


def _demo(out: Path, digits: Path, **more) -> dict:
    return run_demo(
        out,
        epochs=1,
        finetune_epochs=1,
        rank=more.pop("rank", "ratio:0.5"),
        data=str(digits),
        arch="tests.conftest:tiny_net",
        arch_kwargs={"in_channels": 1},
        input_size=SIZE,
        batch_size=32,
        calibration_batches=2,
        latency_repeats=2,
        **more,
    )


def test_run_demo_writes_results_and_reuses_its_baseline(digits, tmp_path, caplog):
    out = tmp_path / "demo"
    events: list[tuple[str, int, int | None]] = []
    first = _demo(out, digits, progress=lambda *event: events.append(event))
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "done" and saved["baseline"]["f1"] == first["baseline"]["f1"]
    for name in ("baseline", "decomposed", "finetuned"):
        assert ENTRY_KEYS <= saved[name].keys(), name
    dec = saved["decomposed"]
    assert {"f1_before_calibration", "f1_after_calibration"} <= dec.keys()
    assert dec["macs"] < saved["baseline"]["macs"] and dec["plan"]["layers"]
    assert {"config", "timings", "versions", "machine", "summary"} <= saved.keys()
    assert saved["baseline"]["reused"] is False and "baseline" in saved["timings"]
    assert (out / "f1_vs_macs.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.ckpt")), "training checkpoints are removed once saved"

    baseline = load(out / "baseline.pt")
    meta = model_meta(baseline)
    assert meta["input_size"] == list(SIZE) and meta["class_names"] == ["0", "1", "2", "3"]

    # no re-initialisation: the reloaded decomposed file predicts exactly as before, and
    # fine-tuning starts from the validation F1 the decomposed model had
    assert dec["reload"]["max_logit_diff_after_reload"] == 0.0
    assert dec["reload"]["finetune_start_val_f1"] == dec["val_f1"]
    assert saved["finetuned"]["history"][0]["val_f1"] == dec["val_f1"]
    bundle = load_data(str(digits), SIZE, batch_size=32, workers=0)
    assert val_f1(load(out / "decomposed.pt"), bundle) == dec["val_f1"]

    with caplog.at_level(logging.INFO, logger="decomp.recipes"):
        second = _demo(out, digits)
    assert second["baseline"]["reused"] is True
    assert any("reusing the cached baseline" in r.getMessage() for r in caplog.records)
    assert second["baseline"]["f1"] == first["baseline"]["f1"]
    assert second["decomposed"]["f1"] == first["decomposed"]["f1"], "calibration is seeded"
    _check_records(saved, events)

    console = Console(file=io.StringIO(), width=200)
    console.print(demo_table(second))
    console.print(evaluation_table(second["finetuned"]))
    text = console.file.getvalue()
    assert "before BN calibration" in text and "fine-tuned" in text and "ptflops" in text


STAGES = [
    "data",
    "baseline",
    "evaluate_baseline",
    "decompose",
    "evaluate_before_calibration",
    "calibrate",
    "evaluate_decomposed",
    "save_and_reload",
    "finetune",
    "evaluate_finetuned",
    "report",
]


def _check_records(saved: dict, events: list[tuple[str, int, int | None]]) -> None:
    """Times, load, targets and the progress the demo reported, for the quick recipe."""
    assert saved["config"]["recipe"] == "quick" and saved["config"]["augment"] is False
    assert list(saved["timings"]) == [*STAGES, "total"] == list(saved["cpu_seconds"])
    assert saved["timings"]["total"] >= sum(saved["timings"][s] for s in STAGES) * 0.99
    assert all(v >= 0 for v in saved["cpu_seconds"].values())
    load = saved["load"]
    assert {"start", "latest", "interval_s", "samples_1min", "mean_1min", "max_1min"} <= load.keys()
    assert load["samples_1min"] and len(load["start"]) == 3, "sampled at least once, at the start"
    summary = saved["summary"]
    for name in ("baseline", "decomposed", "finetuned"):
        assert summary["models"][name] == {k: saved[name][k] for k in ("f1", "macs", "params")}
    assert summary["total_seconds"] <= saved["timings"]["total"]
    assert list(summary["targets"]) == list(TARGETS) and len(TARGETS) == 4
    assert summary["targets"]["macs_at_most_half"] == (summary["macs_ratio"] <= 0.5)
    drop = saved["baseline"]["f1"] - saved["finetuned"]["f1"]
    assert summary["targets"]["f1_drop_at_most_0.5_points"] == (drop <= 0.005)
    assert summary["targets"]["baseline_f1_at_least_0.91"] == (saved["baseline"]["f1"] >= 0.91)
    # every stage reports its start (0 done), counts its batches or layers up to the total it
    # announced, and its end
    by_stage: dict[str, list[tuple[int, int | None]]] = {}
    for stage, done, total in events:
        by_stage.setdefault(stage, []).append((done, total))
    assert list(by_stage) == STAGES
    for stage, steps in by_stage.items():
        assert steps[0][0] == 0 and steps[-1][0] == steps[-1][1], (stage, steps)
        counted = [done for done, _ in steps[:-1]]
        assert counted == sorted(counted) and max(counted) <= steps[-1][1], (stage, steps)
    train, val = 5, 2  # batches of 32: 160 training and 40 validation digits
    assert by_stage["baseline"][0][1] == (train + val) + val
    assert by_stage["baseline"][-2][0] == by_stage["baseline"][-1][1], "every batch counted"
    assert by_stage["decompose"][0] == (0, None) and by_stage["decompose"][-1][1] == len(
        saved["decomposed"]["plan"]["layers"]
    )


def test_a_macs_budget_halves_the_macs(digits, tmp_path) -> None:
    results = _demo(tmp_path / "demo", digits, rank=None, target_macs=0.5)
    assert results["config"]["target_macs"] == 0.5
    ratio = results["decomposed"]["macs"] / results["baseline"]["macs"]
    assert 0.4 < ratio <= 0.5 and results["summary"]["targets"]["macs_at_most_half"]


def test_recipes_give_the_demo_its_settings() -> None:
    quick, full = demo_config("quick"), demo_config("full")
    assert (quick.epochs, quick.augment, quick.target_macs, quick.finetune_epochs) == (
        4,
        False,
        TARGET_MACS_RATIO,
        2,
    )
    assert (full.epochs, full.augment, full.target_macs, full.finetune_epochs) == (12, True, 0.5, 2)
    assert demo_config().recipe == DEFAULT_RECIPE == "quick"
    mixed = demo_config("quick", epochs=6, augment=True, rank=None, seed=3)
    assert (mixed.epochs, mixed.augment, mixed.target_macs, mixed.seed) == (6, True, 0.5, 3)
    ranked = demo_config("quick", rank="ratio:0.5")  # a rank given replaces the recipe's budget
    assert (ranked.rank, ranked.target_macs) == ("ratio:0.5", None)
    assert demo_config("full", target_macs=0.3).target_macs == 0.3
    assert demo_config("full", rank="vbmf:0.6").target_macs is None
    with pytest.raises(
        ValueError, match=r"unknown recipe 'fast'; expected one of \['full', 'quick'\]"
    ):
        demo_config("fast")
    assert set(RECIPES) == {"quick", "full"}


def _first_batches(loader) -> list[torch.Tensor]:
    """The first batch twice: same order, other draws of the global generator."""
    batches = []
    for torch_seed in (0, 1):
        loader.generator.manual_seed(0)
        torch.manual_seed(torch_seed)
        batches.append(next(iter(loader))[0])
    return batches


def test_the_quick_recipe_trains_on_images_as_they_are(digits) -> None:
    bundle = load_data(str(digits), SIZE, batch_size=40, workers=0)
    plain = without_augmentation(bundle)
    assert plain.train_loader.dataset.transform is bundle.val_loader.dataset.transform
    assert without_augmentation(plain) is plain, "already plain: nothing to do"
    assert not torch.equal(*_first_batches(bundle.train_loader)), "flips and shifts differ"
    assert torch.equal(*_first_batches(plain.train_loader))
    # in-memory images (Fashion-MNIST's kind of data set) have a switch instead
    images = torch.randint(0, 255, (64, 1, 16, 16), dtype=torch.uint8)
    memory = TensorImageDataset(images, torch.zeros(64, dtype=torch.long), 1, (0.5,), (0.25,), True)
    loader = make_loader(memory, 32, True, 0)
    in_memory = dataclasses.replace(bundle, train_loader=loader)
    assert not torch.equal(*_first_batches(in_memory.train_loader))
    plain = without_augmentation(in_memory)
    assert plain.train_loader.dataset.augment is False and memory.augment is True
    assert torch.equal(*_first_batches(plain.train_loader))
    # a cached baseline trained with augmentation is not one trained without
    args = ("tests.conftest:tiny_net", None, "digits", SIZE, 1, 32, 0.1, 0, None, None)
    assert baseline_config(*args)["recipe"] != baseline_config(*args, augment=False)["recipe"]
    assert baseline_config(*args) == baseline_config(*args, augment=True)


def test_demo_command_passes_the_recipe_and_shows_times_and_targets(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import decomp.cli.training as cli_training
    from decomp.cli import app

    calls = []
    results = {
        "timings": {"data": 1.0, "baseline": 300.0, "total": 301.0},
        "summary": {"targets": dict.fromkeys(TARGETS, True) | {"macs_at_most_half": False}},
    }

    def fake_demo(*args, **kwargs):
        calls.append((args, kwargs))
        kwargs["progress"]("baseline", 0, 10)
        return results

    monkeypatch.setattr(cli_training, "run_demo", fake_demo)
    monkeypatch.setattr(cli_training, "demo_table", lambda r: "the table")
    out = tmp_path / "d"
    result = CliRunner().invoke(app, ["demo", "--recipe", "full", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    ((args, kwargs),) = calls
    assert kwargs["recipe"] == "full" and args[1:4] == (None, None, None), "the recipe's"
    assert "5.0 min in all (data 1 s, baseline 300 s)" in result.output
    assert "MACs at most half: NOT met" in result.output
    assert "baseline F1 at least 0.91: met" in result.output
    bad = CliRunner().invoke(app, ["demo", "--recipe", "fast"])
    assert bad.exit_code == 2
    budget = CliRunner().invoke(app, ["demo", "--target-macs", "0.3", "--output-dir", str(out)])
    assert budget.exit_code == 0 and calls[-1][1]["target_macs"] == 0.3
    assert CliRunner().invoke(app, ["demo", "--target-macs", "1.5"]).exit_code == 2
